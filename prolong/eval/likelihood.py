"""Likelihood on long documents, three views of whether a model uses its context:

* perplexity, the paper's PG19 view (§2): the loss on the *last* ``last`` tokens of
  ``length``-token documents, each predicted with the whole document before it;
* perplexity as LongLoRA's eval.py measures it (its Table 1): documents as one token stream,
  ``seq_len``-token windows every ``sliding_window`` tokens, each window's loss on all its tokens;
* loss by token position: the mean loss in equal spans of positions over whole documents — the
  standard long-context diagnostic. A model that uses long context predicts later tokens better,
  so the curve falls with position; one that does not stays flat once its window is full.

Documents shorter than ``length`` tokens are skipped (counted; LongLoRA's view has no such limit).
Full attention throughout: the model as HF loads it, never the S²-Attn of LongLoRA's training. Logits exist one chunk at a time
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
    hidden, x = _hidden_batch(model, torch.tensor([ids], device=device))
    return hidden[0], x[0]


def _hidden_batch(model, x: torch.Tensor):
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    return backbone(input_ids=x, use_cache=False).last_hidden_state, x


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


# eval.py reports ``2.71828 ** val_loss``, not exp(): kept, so its numbers are reproduced to the digit
LONGLORA_E = 2.71828


def token_stream(tokenizer, texts, max_docs: int) -> tuple[list[int], int]:
    """Up to ``max_docs`` documents as one stream, each document's tokens followed by EOS, the
    layout of the .bin files eval.py reads (landmark-attention's prepare.py, which LongLoRA's
    evaluation is based on: encode_ordinary, then the end-of-text token). Returns (stream, documents)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    stream, docs = [], 0
    for text in texts:
        if docs >= max_docs:
            break
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        docs += 1
    return stream, docs


def window_starts(n_tokens: int, seq_len: int, sliding_window: int) -> list[int]:
    """eval.py's ``get_as_batch``: a window every ``sliding_window`` tokens while one more token than
    the window remains, the last of those dropped (its ``all_ix.pop()``)."""
    return list(range(0, n_tokens - seq_len, sliding_window))[:-1]


@torch.no_grad()
def sliding_window_perplexity(model, stream: list[int], *, seq_len: int, sliding_window: int, batch_size: int,
                              device) -> dict:
    """LongLoRA's ``evaluate``: each window's mean loss over its ``seq_len − 1`` next-token targets
    (HF's ``labels=input_ids``), averaged within batches of ``batch_size`` windows and then over
    batches; perplexity ``2.71828 ** loss``."""
    starts = window_starts(len(stream), seq_len, sliding_window)
    if not starts:
        raise ValueError(f"{seq_len} tokens a window needs more than {seq_len + sliding_window} tokens of "
                         f"documents; the source gives {len(stream)}")
    weight = model.get_output_embeddings().weight
    data = torch.tensor(stream, device=device)
    batch_losses = []
    for b in range(0, len(starts), batch_size):
        x = torch.stack([data[i:i + seq_len] for i in starts[b:b + batch_size]])
        hidden, _ = _hidden_batch(model, x)
        total = chunked_cross_entropy_sum(hidden[:, :-1], weight, x[:, 1:], chunk_size=4096)
        batch_losses.append(float(total) / (x.shape[0] * (seq_len - 1)))
    loss = sum(batch_losses) / len(batch_losses)
    return {"seq_len": seq_len, "windows": len(starts), "loss": loss, "perplexity": LONGLORA_E ** loss}
