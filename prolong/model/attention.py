"""Document-masked attention: tokens attend only within their own document (paper §A.3, Table 9).

Document boundaries travel from the loader to attention as ``cu_seq_lens`` (cumulative document
lengths over the flattened batch, flash-attn's convention) passed through the HF model's forward
kwargs. The model code stays untouched: we register one attention function with transformers'
``AttentionInterface`` and pick a backend for it once per process:

* ``flash`` — flash-attn's varlen kernel (GPU, when flash-attn is installed);
* ``flex``  — FlexAttention with a block-sparse document mask (GPU; its backward does not run on CPU);
* ``sdpa``  — PyTorch SDPA per document, short documents batched by padded length. Exact on any
  device, costs about Σ len² rather than L², and is the CPU path.

Each backend attends causally within segments given as cumulative offsets; LongLoRA's S²-Attn
(``s2_group_size``, training only) is two such segmentations, groups and half-shifted groups cut at
document boundaries, for the two halves of the heads — so it runs on every backend.

Registering our own name also makes transformers skip building a dense L×L mask (it only builds
masks for the implementations it knows), which at 512K tokens would not fit in memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "prolong_document"
BACKENDS = ("sdpa", "flex", "flash")
_state = {"backend": "sdpa"}


@dataclass(frozen=True)
class DocumentLayout:
    """Where documents start and end in a (batch, seq_len) block of tokens."""

    cu_seqlens: torch.Tensor  # int32 [n_docs + 1], offsets into the flattened batch
    max_seqlen: int
    position_ids: torch.Tensor  # [batch, seq_len], restarting at 0 in each document
    # Ulysses: cu_seqlens cover the whole sequence, position_ids only this rank's chunk
    sequence_parallel: object | None = None

    @classmethod
    def from_lengths(cls, lengths: list[list[int]], device: torch.device | str = "cpu") -> "DocumentLayout":
        """`lengths[b]` are the document lengths of sample b; each sample's lengths sum to seq_len."""
        flat = [n for sample in lengths for n in sample if n > 0]
        totals = {sum(sample) for sample in lengths}
        if len(totals) != 1:
            raise ValueError(f"samples of one batch must have equal length, got {sorted(totals)}")
        cu = torch.zeros(len(flat) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(flat, dtype=torch.int32), 0)
        positions = torch.cat([torch.arange(n) for n in flat]).view(len(lengths), -1)
        return cls(cu_seqlens=cu.to(device), max_seqlen=max(flat), position_ids=positions.to(device))

    def model_kwargs(self) -> dict:
        """Keyword arguments for an HF model's forward (flash-attn naming, understood by all backends)."""
        kwargs = {"position_ids": self.position_ids, "cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                  "max_length_q": self.max_seqlen, "max_length_k": self.max_seqlen}
        if self.sequence_parallel is not None:
            kwargs["sequence_parallel"] = self.sequence_parallel
        return kwargs


def flash_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(requested: str = "auto", device: torch.device | str = "cpu") -> str:
    """Pick and remember the backend; 'auto' prefers flash-attn, then FlexAttention, on GPUs."""
    on_gpu = torch.device(device).type == "cuda"
    if requested == "auto":
        backend = "flash" if on_gpu and flash_available() else "flex" if on_gpu else "sdpa"
    else:
        backend = requested
    if backend == "flash" and not flash_available():
        raise RuntimeError("model.attention: flash needs a CUDA GPU with flash-attn installed")
    if backend == "flex" and not on_gpu:
        raise RuntimeError("model.attention: flex needs a GPU (FlexAttention's backward does not run on CPU)")
    if backend not in BACKENDS:
        raise RuntimeError(f"model.attention: unknown backend {backend!r}")
    _state["backend"] = backend
    log.info("document attention backend: %s", backend)
    return backend


def current_backend() -> str:
    return _state["backend"]


# Short documents are padded up to one of these lengths so that many share one SDPA call.
# Padding sits at the end of each document: under causal attention no real token attends a pad,
# and pad outputs are dropped, so results and gradients are exact. Longer documents run alone.
_BUCKETS = [8 * i for i in range(1, 9)] + [int(64 * 2 ** (i / 2)) for i in range(1, 11)]  # ≤ 2048


def _bucket(n: int) -> int:
    return next((b for b in _BUCKETS if b >= n), n)


def _sdpa_documents(q, k, v, cu: list[int], scale, groups: int) -> torch.Tensor:
    """q/k/v: [heads, tokens, dim] over the flattened batch → [heads, tokens, dim]."""
    out = torch.empty_like(q)
    by_len: dict[int, list[tuple[int, int]]] = {}
    for start, end in zip(cu[:-1], cu[1:]):
        by_len.setdefault(_bucket(end - start), []).append((start, end - start))
    for width, docs in by_len.items():
        starts = torch.tensor([s for s, _ in docs], device=q.device)
        lengths = torch.tensor([n for _, n in docs], device=q.device)
        offsets = torch.arange(width, device=q.device)
        real = offsets[None, :] < lengths[:, None]  # [docs, width]
        # pads repeat the document's first token; they are never attended by real tokens
        idx = (starts[:, None] + torch.where(real, offsets[None, :], 0)).reshape(-1)
        qs, ks, vs = (t.index_select(1, idx).unflatten(1, (len(docs), width)).transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=groups > 1)
        o = o.transpose(0, 1).flatten(1, 2)  # [heads, docs·width, dim]
        keep = real.reshape(-1)
        out.index_copy_(1, idx[keep], o[:, keep])
    return out


_flex: dict = {"fn": None, "masks": {}}


def _flex_documents(q, k, v, cu: torch.Tensor, scale, groups: int) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if _flex["fn"] is None:  # uncompiled, flex_attention falls back to a slow reference path
        _flex["fn"] = torch.compile(flex_attention, dynamic=False)
    total = q.shape[1]
    masks = _flex["masks"]  # one block mask per segmentation of a micro-batch (two with S²), shared by every layer
    if id(cu) not in masks or masks[id(cu)][0] is not cu:
        if len(masks) >= 2:
            masks.clear()
        doc_ids = torch.bucketize(torch.arange(total, device=q.device), cu[1:].to(q.device), right=True)

        def document_causal(b, h, q_idx, kv_idx):
            return (doc_ids[q_idx] == doc_ids[kv_idx]) & (q_idx >= kv_idx)

        masks[id(cu)] = (cu, create_block_mask(document_causal, None, None, total, total, device=q.device))
    out = _flex["fn"](q[None], k[None], v[None], block_mask=masks[id(cu)][1], scale=scale, enable_gqa=groups > 1)
    return out[0]


def _flash_documents(q, k, v, cu: torch.Tensor, max_len: int, scale) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    # flash-attn wants [tokens, heads, dim] and handles grouped KV heads natively
    o = flash_attn_varlen_func(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), cu, cu, max_len, max_len,
                               causal=True, softmax_scale=scale)
    return o.transpose(0, 1)


_s2: dict = {"key": None, "value": None}


def s2_segments(cu: torch.Tensor, batch: int, length: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LongLoRA's shifted sparse attention as two segmentations of the flattened batch: groups of
    ``group`` tokens from each sample's start, and groups shifted by half a group (for the second
    half of the heads) — each cut further at document boundaries, so a token attends only within its
    own document *and* its own group. The shifted groups' boundaries are offset, as in LongLoRA's
    flash-attn variant, rather than the sequence rolled: nothing wraps around a sample's end."""
    if _s2["key"] == (id(cu), batch, length, group) and _s2["value"][0] is cu:
        return _s2["value"][1]  # every layer of one micro-batch asks again
    starts = (torch.arange(batch) * length)[:, None]
    base = cu.detach().cpu().long()

    def cut_at(offsets: torch.Tensor) -> torch.Tensor:
        return torch.unique(torch.cat([base, (starts + offsets[None]).flatten()])).to(torch.int32).to(cu.device)

    out = cut_at(torch.arange(0, length, group)), cut_at(torch.arange(group // 2, length, group))
    _s2.update(key=(id(cu), batch, length, group), value=(cu, out))
    return out


def _attend(q, k, v, cu: torch.Tensor, max_len: int, scale) -> torch.Tensor:
    """[heads, tokens, dim] → [heads, tokens, dim], causal within each segment of ``cu`` (``max_len``:
    at least the longest segment)."""
    backend, groups = _state["backend"], q.shape[0] // k.shape[0]
    if backend == "flash":
        return _flash_documents(q, k, v, cu, max_len, scale)
    if backend == "flex":
        return _flex_documents(q, k, v, cu, scale, groups)
    return _sdpa_documents(q, k, v, cu.tolist(), scale, groups)


def _s2_attend(q, k, v, cu: torch.Tensor, batch: int, length: int, group: int, scale) -> torch.Tensor:
    plain, shifted = s2_segments(cu, batch, length, group)
    heads, kv_heads = q.shape[0], k.shape[0]
    if kv_heads % 2:  # grouped KV heads that do not split in two: one KV head per query head
        k, v = (t.repeat_interleave(heads // kv_heads, dim=0) for t in (k, v))
        kv_heads = heads
    h, kh = heads // 2, kv_heads // 2
    return torch.cat([_attend(q[:h], k[:kh], v[:kh], plain, group, scale),
                      _attend(q[h:], k[kh:], v[kh:], shifted, group, scale)], dim=0)


def document_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                       cu_seq_lens_q=None, max_length_q=None, sequence_parallel=None, s2_group_size=None, **kwargs):
    """transformers attention function: [batch, heads, len, dim] in → [batch, len, heads, dim] out.

    With ``sequence_parallel`` the inputs hold this rank's chunk of the sequence; the object's
    ``scatter_heads``/``heads_to_seq`` (Ulysses all-to-alls, prolong.parallel.ulysses) turn them into
    the whole sequence for a subset of heads and back. The model layer knows only that interface.
    """
    if sequence_parallel is not None:
        query, key, value = sequence_parallel.scatter_heads(query, key, value)
    batch, heads, length, dim = query.shape
    if cu_seq_lens_q is None:
        # no layout (e.g. generation): plain causal attention over each sample
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                             is_causal=attention_mask is None and length > 1, scale=scaling,
                                             enable_gqa=key.shape[1] != heads)
        return out.transpose(1, 2).contiguous(), None
    if key.shape[2] != length:
        raise RuntimeError("document attention does not support a KV cache; call the model with use_cache=False")
    # [batch, heads, len, dim] → [heads, batch·len, dim]: documents are spans of the flattened batch
    q, k, v = (t.transpose(0, 1).reshape(t.shape[1], batch * length, dim) for t in (query, key, value))
    if s2_group_size:
        if sequence_parallel is not None:
            raise RuntimeError("S²-Attn does not combine with sequence parallelism")
        o = _s2_attend(q, k, v, cu_seq_lens_q, batch, length, int(s2_group_size), scaling)
    else:
        o = _attend(q, k, v, cu_seq_lens_q, int(max_length_q) if max_length_q is not None else length, scaling)
    o = o.reshape(heads, batch, length, dim).transpose(0, 1)  # [batch, heads, len, dim]
    if sequence_parallel is not None:
        o = sequence_parallel.heads_to_seq(o)  # back to this rank's chunk, all heads
    return o.transpose(1, 2).contiguous(), None


def register() -> str:
    """Make ``attn_implementation="prolong_document"`` available to transformers models."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, document_attention)
    return ATTN_IMPLEMENTATION
