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

    @property
    def attention_cost(self) -> int:
        """Σ len² over documents: what document-masked attention costs (paper §A.3 reordering key)."""
        return sum(n * n for sample in self.doc_lengths for n in sample)

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel()

    def layout(self, device) -> DocumentLayout:
        return DocumentLayout.from_lengths(self.doc_lengths, device=device)

    def to(self, device) -> "MicroBatch":
        return MicroBatch(self.input_ids.to(device), self.targets.to(device), self.doc_lengths, self.n_targets)


def doc_lengths_of(sample: dict, seq_len: int) -> list[int]:
    spans = np.asarray(sample["indices"], dtype=np.int64).reshape(-1, 2)
    if len(spans) == 0 or spans[0, 0] != 0 or spans[-1, 1] != seq_len or np.any(spans[1:, 0] != spans[:-1, 1]) \
            or np.any(spans[:, 1] <= spans[:, 0]):
        raise DataError(f"sample of domain {sample.get('domain')!r}: document indices do not tile its "
                        f"{seq_len} tokens; the data was not written by this version's data stage")
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
