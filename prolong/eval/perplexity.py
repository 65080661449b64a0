"""Perplexity on long documents, the paper's PG19 view (§2): the loss on the *last* ``last`` tokens of
``length``-token documents, each predicted with the whole document before it. A model that uses
long context gets lower loss there than one that only sees a local window.

Documents shorter than ``length`` tokens are skipped (counted). Logits exist one chunk at a time
(``prolong.train.loss``), so 64K-token documents with a 128K vocabulary fit.
"""

from __future__ import annotations

import math

import torch

from prolong.train.loss import chunked_cross_entropy_sum


@torch.no_grad()
def long_document_loss(model, tokenizer, texts, *, length: int, last: int, max_docs: int, device) -> dict:
    if not 0 < last < length:
        raise ValueError(f"last: {last} must be between 0 and length {length}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    losses, skipped = [], 0
    backbone = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    weight = model.get_output_embeddings().weight
    for text in texts:
        if len(losses) >= max_docs:
            break
        ids = bos + tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) < length:
            skipped += 1
            continue
        x = torch.tensor([ids[:length]], device=device)
        hidden = backbone(input_ids=x, use_cache=False).last_hidden_state[0]
        targets = x[0, length - last:]
        total = chunked_cross_entropy_sum(hidden[length - last - 1:length - 1], weight, targets, chunk_size=4096)
        losses.append(float(total) / last)
    if not losses:
        raise ValueError(f"no document has {length} tokens ({skipped} shorter ones skipped)")
    mean = sum(losses) / len(losses)
    return {"length": length, "last": last, "documents": len(losses), "skipped_short": skipped,
            "loss": mean, "perplexity": math.exp(mean), "per_document": losses}
