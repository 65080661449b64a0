"""DeepSpeed-Ulysses sequence parallelism, written directly with torch.distributed.

A sequence-parallel (SP) group of ``sp`` ranks reads the same sample. When the sample has a
document longer than ``L / sp`` tokens, each rank takes a contiguous ``L / sp`` chunk; attention
all-to-alls q/k/v from sequence-sharded to head-sharded, runs document-masked attention over the
whole sequence with the global document boundaries, and all-to-alls the output back. Everything
else (MLP, norms, the loss) stays local to the chunk. Functional collectives carry gradients
(the backward of an all-to-all is the inverse all-to-all) and trace under ``torch.compile``.
We use torch.distributed directly rather than DeepSpeed's ``DistributedAttention``: the same
code then serves the FSDP2 and DeepSpeed engines, and KV heads can travel unexpanded.

When no document is longer than ``L / sp`` — the 64K documents packed into a 512K sample — SP is
switched off for that sample: its documents are split between the ranks *at document boundaries*
(never inside a document: ProLong's issue #17) and each rank attends locally, with no all-to-all.

Key/value heads travel unexpanded when ``sp`` divides their count (4× less traffic than
expanding Llama-3's 8 KV heads to 32); when ``sp`` exceeds it, each KV head is repeated just enough
for every rank to get one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as funcol

from prolong.parallel.dims import ParallelDims, kv_expansion


@dataclass(frozen=True, eq=False)
class SequenceParallel:
    """A sequence-parallel group, as document attention sees it (prolong.model.attention calls
    :meth:`scatter_heads` and :meth:`heads_to_seq` around its kernel)."""

    group: dist.ProcessGroup
    size: int
    rank: int  # within the group

    def scatter_heads(self, q, k, v):
        return scatter_heads(q, k, v, self)

    def heads_to_seq(self, o):
        return heads_to_seq(o, self)


def build_group(world, dims: ParallelDims) -> SequenceParallel:
    """The ("dp", "sp") device mesh: SP groups are ``sp`` consecutive ranks (one node's GPUs, so the
    all-to-alls stay on NVLink). FSDP shards over all ranks — the flattened dp × sp mesh, as
    torchtitan does for context parallelism — so SP costs no extra parameter memory."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(world.device.type, (dims.dp, dims.sp), mesh_dim_names=("dp", "sp"))
    return SequenceParallel(group=mesh["sp"].get_group(), size=dims.sp, rank=mesh["sp"].get_local_rank())


def check_model_heads(config, dims: ParallelDims) -> int:
    """Fail before training starts (not inside the first forward) when the heads cannot be split."""
    heads = config.num_attention_heads
    return dims.kv_expansion(heads, getattr(config, "num_key_value_heads", None) or heads)


def seq_to_heads(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[B, H, L/sp, D] (this rank's tokens, all heads) → [B, H/sp, L, D] (all tokens, this rank's heads)."""
    b, h, lc, d = x.shape
    send = x.reshape(b, sp.size, h // sp.size, lc, d).transpose(0, 1).contiguous()  # [dest, B, h, Lc, D]
    recv = funcol.all_to_all_single(send, None, None, sp.group)  # [source chunk, B, h, Lc, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // sp.size, sp.size * lc, d)


def heads_to_seq(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """[B, H/sp, L, D] → [B, H, L/sp, D]: the inverse of :func:`seq_to_heads`."""
    b, hs, length, d = x.shape
    lc = length // sp.size
    send = x.reshape(b, hs, sp.size, lc, d).permute(2, 0, 1, 3, 4).contiguous()  # [dest chunk, B, h, Lc, D]
    recv = funcol.all_to_all_single(send, None, None, sp.group)  # [source head block, B, h, Lc, D]
    return recv.transpose(0, 1).reshape(b, sp.size * hs, lc, d)


def scatter_heads(q, k, v, sp: SequenceParallel):
    """q/k/v of this rank's chunk → full-sequence q/k/v of this rank's heads (KV expanded if needed)."""
    repeat = kv_expansion(q.shape[1], k.shape[1], sp.size)
    if repeat > 1:
        k, v = (t.repeat_interleave(repeat, dim=1) for t in (k, v))
    return seq_to_heads(q, sp), seq_to_heads(k, sp), seq_to_heads(v, sp)


# ---------------------------------------------------------------- splitting a sample between the ranks


def needs_sequence_parallel(doc_lengths: list[int], seq_len: int, sp: int) -> bool:
    return max(doc_lengths) > seq_len // sp


def document_groups(doc_lengths: list[int], sp: int) -> list[tuple[int, int]]:
    """Split documents into ``sp`` contiguous, non-empty groups of about equal tokens, never inside a
    document. Returns [first_doc, end_doc) per rank."""
    if len(doc_lengths) < sp:
        raise ValueError(f"{len(doc_lengths)} documents cannot be shared by {sp} ranks without splitting one")
    bounds = [0]
    for n in doc_lengths:
        bounds.append(bounds[-1] + n)
    total = bounds[-1]
    cuts = [0]
    for k in range(1, sp):
        target = k * total / sp
        lo, hi = cuts[-1] + 1, len(doc_lengths) - (sp - k)  # keep every group non-empty
        cuts.append(min(range(lo, hi + 1), key=lambda i: abs(bounds[i] - target)))
    cuts.append(len(doc_lengths))
    return [(cuts[i], cuts[i + 1]) for i in range(sp)]
