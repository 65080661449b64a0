"""Next-token targets and the token-averaged, chunked cross-entropy.

* Targets never cross a document boundary: the last token of a document predicts nothing.
  For SFT, only tokens under the loss mask (assistant turns) are targets.
* The loss of an optimizer step is Σ token losses / (valid tokens across all ranks and all
  accumulation steps) — exactly the mean over the step's tokens, however they are spread (§A.3).
  Each micro-batch therefore returns a *sum*; the trainer divides by the global count.
* Logits are computed a chunk of positions at a time and recomputed in backward, so the full
  [tokens × vocab] matrix never exists (Llama-3's 128K vocabulary × 64K tokens would be 32 GB).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def next_token_targets(input_ids: torch.Tensor, doc_lengths: list[list[int]], mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, seq] targets: token t+1 of the same document, else IGNORE (and IGNORE off-mask)."""
    targets = torch.full_like(input_ids, IGNORE)
    targets[:, :-1] = input_ids[:, 1:]
    for b, lengths in enumerate(doc_lengths):
        end = 0
        for n in lengths:
            end += n
            targets[b, end - 1] = IGNORE  # the last token of a document has no next token in it
    if mask is not None:
        shifted = torch.zeros_like(mask, dtype=torch.bool)
        shifted[:, :-1] = mask[:, 1:].bool()  # a target counts when the predicted token is trained on
        targets = targets.masked_fill(~shifted, IGNORE)
    return targets


def _chunk_loss_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = hidden @ weight.t()
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_size: int = 8192) -> torch.Tensor:
    """Σ cross-entropy over positions whose target is not IGNORE.

    hidden: [..., d] final hidden states; weight: [vocab, d] output embedding; targets: [...].
    Only positions with a target are projected, `chunk_size` at a time, each chunk under activation
    checkpointing so that its logits are freed after forward and rebuilt in backward.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE
    hidden, targets = hidden[keep], targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            total = total + checkpoint(_chunk_loss_sum, h, weight, t, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(h, weight, t)
    return total


def count_targets(targets: torch.Tensor) -> int:
    return int((targets != IGNORE).sum())
