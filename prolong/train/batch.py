"""Micro-batches: MDS samples → tensors, document layout, targets, and the reordering cost."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prolong.errors import DataError
from prolong.model.attention import DocumentLayout
from prolong.train.loss import next_token_targets


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [batch, seq_len] int64
    targets: torch.Tensor  # [batch, seq_len] int64, IGNORE where no loss
    doc_lengths: list[list[int]]
    n_targets: int
    # set by shard() when this rank holds a chunk of a sequence-parallel sample
    sequence_parallel: object | None = None
    chunk: tuple[int, int] | None = None
    shared: bool = False  # shard() split the sample between a sequence-parallel group
    sample_cost: int | None = None  # Σ len² of the whole samples: the reordering key every rank agrees on

    def __post_init__(self):
        if self.sample_cost is None:
            self.sample_cost = sum(n * n for sample in self.doc_lengths for n in sample)

    @property
    def attention_cost(self) -> int:
        """Σ len² over documents: what document-masked attention costs (paper §A.3 reordering key).
        A sequence-parallel chunk counts its share."""
        cost = sum(n * n for sample in self.doc_lengths for n in sample)
        return cost // self.sequence_parallel.size if self.sequence_parallel is not None else cost

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def layout(self, device) -> DocumentLayout:
        full = DocumentLayout.from_lengths(self.doc_lengths, device=device)
        if self.sequence_parallel is None:
            return full
        start, end = self.chunk
        return DocumentLayout(cu_seqlens=full.cu_seqlens, max_seqlen=full.max_seqlen,
                              position_ids=full.position_ids[:, start:end], sequence_parallel=self.sequence_parallel)

    def to(self, device) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.targets.to(device), self.doc_lengths, self.n_targets,
                          self.sequence_parallel, self.chunk, self.shared, self.sample_cost)

    def shard(self, sp) -> "MicroBatch":
        """This rank's part of a sample shared by a sequence-parallel group (prolong.parallel.ulysses).

        A document longer than L/sp: a contiguous chunk of L/sp tokens, attention across the group.
        Otherwise: whole documents only (split at document boundaries), attention local.
        """
        from prolong.parallel.ulysses import document_groups, needs_sequence_parallel

        if self.input_ids.shape[0] != 1:
            raise ValueError("sequence parallelism takes one sequence per micro-batch")
        lengths, seq_len = self.doc_lengths[0], self.input_ids.shape[1]
        if needs_sequence_parallel(lengths, seq_len, sp.size):
            start, end = sp.rank * seq_len // sp.size, (sp.rank + 1) * seq_len // sp.size
            targets = self.targets[:, start:end]
            return MicroBatch(self.input_ids[:, start:end], targets, self.doc_lengths,
                              int((targets >= 0).sum()), sp, (start, end), True, self.sample_cost)
        first, end_doc = document_groups(lengths, sp.size)[sp.rank]
        start, end = sum(lengths[:first]), sum(lengths[:end_doc])
        targets = self.targets[:, start:end]
        return MicroBatch(self.input_ids[:, start:end], targets, [lengths[first:end_doc]], int((targets >= 0).sum()),
                          shared=True, sample_cost=self.sample_cost)


def shard_batches(batches, sp):
    """This rank's part of each micro-batch of a sequence-parallel group (all of it without SP)."""
    for mb in batches:
        yield mb if sp is None else mb.shard(sp)


def doc_lengths_of(sample: dict, seq_len: int) -> list[int]:
    if sample.get("indices") is None:  # released packed data without spans: one document (ProLong's rule)
        return [seq_len]
    spans = np.asarray(sample["indices"], dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0 or spans[0, 0] != 0 or spans[-1, 1] != seq_len or np.any(spans[1:, 0] != spans[:-1, 1]) \
            or np.any(spans[:, 1] <= spans[:, 0]):
        raise DataError(f"sample of domain {sample.get('domain')!r}: document indices do not tile its "
                        f"{seq_len} tokens; re-run the stage that wrote or checked the data")
    return (spans[:, 1] - spans[:, 0]).tolist()


def collate(samples: list[dict], seq_len: int | None = None) -> MicroBatch:
    ids = np.stack([np.asarray(s["input_ids"], dtype=np.int64) for s in samples])
    seq_len = seq_len or ids.shape[1]
    if ids.shape[1] != seq_len:
        raise DataError(f"samples have {ids.shape[1]} tokens, the stage trains on {seq_len}; "
                        "re-run the data stage for this recipe")
    lengths = [doc_lengths_of(s, seq_len) for s in samples]
    mask = None
    if all("mask" in s and s["mask"] is not None for s in samples):
        mask = torch.from_numpy(np.stack([np.asarray(s["mask"], dtype=np.uint8) for s in samples]))
    input_ids = torch.from_numpy(ids)
    targets = next_token_targets(input_ids, lengths, mask)
    return MicroBatch(input_ids=input_ids, targets=targets, doc_lengths=lengths, n_targets=int((targets >= 0).sum()))
