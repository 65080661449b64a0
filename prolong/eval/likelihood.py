"""Likelihood on long documents, two views of whether a model uses its context:

* perplexity, the paper's PG19 view (§2): the loss on the *last* ``last`` tokens of
  ``length``-token documents, each predicted with the whole document before it;
* loss by token position: the mean loss in equal spans of positions over whole documents — the
  standard long-context diagnostic. A model that uses long context predicts later tokens better,
  so the curve falls with position; one that does not stays flat once its window is full.

Documents shorter than ``length`` tokens are skipped (counted). Logits exist one chunk at a time
(``prolong.train.loss``), so 64K-token documents with a 128K vocabulary fit.
"""

from __future__ import annotations

import math

import torch

from prolong.train.loss import chunked_cross_entropy_sum


def _documents(tokenizer, texts, length: int, max_docs: int):
    """The first ``length`` tokens (BOS first) of up to ``max_docs`` texts that have as many."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    docs, skipped = [], 0
    for text in texts:
        if len(docs) >= max_docs:
            break
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            skipped += 1
            continue
        docs.append(ids[:length])
    if not docs:
        raise ValueError(f"no document has {length} tokens ({skipped} shorter ones skipped)")
    return docs, skipped


def _hidden(model, ids: list[int], device):
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    x = torch.tensor([ids], device=device)
    return backbone(input_ids=x, use_cache=False).last_hidden_state[0], x[0]


@torch.no_grad()
def loss_by_position(model, tokenizer, texts, *, length: int, buckets: int, max_docs: int, device) -> dict:
    """Mean token loss in ``buckets`` equal spans of positions 1..length-1 (position 0 has no target)."""
    docs, skipped = _documents(tokenizer, texts, length, max_docs)
    weight = model.get_output_embeddings().weight
    width = length // buckets
    sums = [0.0] * buckets
    counts = [0] * buckets
    for ids in docs:
        hidden, x = _hidden(model, ids, device)
        for b in range(buckets):
            start, end = max(1, b * width), (b + 1) * width  # targets at positions start..end-1
            total = chunked_cross_entropy_sum(hidden[start - 1:end - 1], weight, x[start:end], chunk_size=4096)
            sums[b] += float(total)
            counts[b] += end - start
    losses = [s / c for s, c in zip(sums, counts)]
    return {"length": length, "documents": len(docs), "skipped_short": skipped,
            "buckets": [{"start": b * width, "end": (b + 1) * width, "loss": loss} for b, loss in enumerate(losses)],
            "first": losses[0], "last": losses[-1]}


@torch.no_grad()
def long_document_loss(model, tokenizer, texts, *, length: int, last: int, max_docs: int, device) -> dict:
    if not 0 < last < length:
        raise ValueError(f"last: {last} must be between 0 and length {length}")
    docs, skipped = _documents(tokenizer, texts, length, max_docs)
    weight = model.get_output_embeddings().weight
    losses = []
    for ids in docs:
        hidden, x = _hidden(model, ids, device)
        total = chunked_cross_entropy_sum(hidden[length - last - 1:length - 1], weight, x[length - last:], chunk_size=4096)
        losses.append(float(total) / last)
    mean = sum(losses) / len(losses)
    return {"length": length, "last": last, "documents": len(losses), "skipped_short": skipped,
            "loss": mean, "perplexity": math.exp(mean), "per_document": losses}
