"""Next-token targets and the token-averaged, chunked cross-entropy.

* Targets never cross a document boundary: the last token of a document predicts nothing.
  For SFT, only tokens under the loss mask (assistant turns) are targets.
* The loss of an optimizer step is Σ token losses / (valid tokens across all ranks and all
  accumulation steps) — exactly the mean over the step's tokens, however they are spread (§A.3).
  Each micro-batch therefore returns a *sum*; the trainer divides by the global count.
* Logits exist one chunk of positions at a time: the forward pass computes each chunk's loss
  *and* its gradients (softmax − one-hot, in place), keeps ∂/∂hidden and ∂/∂weight, and frees the
  chunk — the full [tokens × vocab] matrix (Llama-3's 128K vocabulary × 64K tokens: 32 GB in fp32)
  never exists, and backward only scales the stored gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ CE(hidden @ weightᵀ, targets) with gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        same_dtype = hidden.dtype == torch.float32
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            h, t = hidden[start:start + chunk_size], targets[start:start + chunk_size]
            rows = torch.arange(len(t), device=t.device)
            logits = (h @ weight.t()).float()  # the only [chunk × vocab] buffer; everything below is in place
            target_logit = logits[rows, t]
            row_max = logits.amax(dim=-1)
            probs = logits.sub_(row_max[:, None]).exp_()
            row_sum = probs.sum(dim=-1)
            total += (row_max + row_sum.log() - target_logit).sum()  # logsumexp − target logit
            if need_h or need_w:
                probs.div_(row_sum[:, None])
                probs[rows, t] -= 1.0  # ∂CE/∂logits = softmax − one-hot
                g = probs.to(hidden.dtype)
                if need_h:
                    torch.mm(g, weight, out=grad_h[start:start + chunk_size])
                if need_w:
                    if same_dtype:
                        grad_w.addmm_(g.t(), h)
                    else:
                        grad_w += (g.t() @ h).float()
            del logits, probs
        # Kept as attributes, not saved tensors, so backward can hand them over without a copy.
        ctx.grads = (grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        # the stored gradients are scaled in place and released: this graph back-propagates once
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        return (grad_h.mul_(grad_output.to(grad_h.dtype)) if grad_h is not None else None,
                grad_w.mul_(grad_output.to(grad_w.dtype)) if grad_w is not None else None, None, None)


def chunked_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              chunk_size: int = 8192) -> torch.Tensor:
    """Σ cross-entropy over positions whose target is not IGNORE.

    hidden: [..., d] final hidden states; weight: [vocab, d] output embedding; targets: [...].
    Only positions with a target are projected, `chunk_size` at a time.
    """
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    keep = targets != IGNORE
    if not bool(keep.all()):  # SFT masks, document ends: project only positions with a target
        hidden, targets = hidden[keep], targets[keep]
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # cast once here; the chunks then run without autocast
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        with torch.autocast(device, enabled=False):
            return chunked_cross_entropy_sum(hidden, weight, targets, chunk_size)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_size):
        logits = (hidden[start:start + chunk_size] @ weight.t()).float()
        total = total + F.cross_entropy(logits, targets[start:start + chunk_size], reduction="sum")
    return total
