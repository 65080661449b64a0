"""Filtering and packing rules of the paper (§A.2), on tokenized documents.

* long data: keep documents of at least ``doc_len`` tokens and cut them into ``doc_len``-token
  single-document pieces (the remainder is dropped); a sample holds ``seq_len / doc_len`` pieces;
* short data: concatenate documents into ``seq_len`` samples; the last document of a sample is
  truncated and its remainder *starts the next sample*;
* SFT data: concatenate conversations likewise, but the truncated remainder is *discarded*.

Every sample records its document spans as ``indices`` ([start, end) pairs), so attention can be
masked per document and the loss never predicts across a boundary.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np


@dataclass
class TokenizedDoc:
    ids: np.ndarray  # uint32, with BOS/EOS as the tokenizer defines them
    mask: np.ndarray | None = None  # uint8, 1 = trained on (SFT only)


@dataclass
class Sample:
    input_ids: np.ndarray  # uint32 [seq_len]
    indices: np.ndarray  # int64 [n_docs, 2]: [start, end) of each document piece
    domain: str
    mask: np.ndarray | None = None  # uint8 [seq_len] (SFT only)

    def to_mds(self) -> dict:
        row = {"input_ids": self.input_ids, "indices": self.indices, "domain": self.domain}
        if self.mask is not None:
            row["mask"] = self.mask
        return row

    @property
    def doc_lengths(self) -> list[int]:
        return [int(e - s) for s, e in self.indices]


def _spans(lengths: list[int]) -> np.ndarray:
    ends = np.cumsum(lengths)
    return np.stack([ends - np.asarray(lengths), ends], axis=1).astype(np.int64)


def long_pieces(docs: Iterable[TokenizedDoc], doc_len: int) -> Iterator[np.ndarray]:
    """Single-document ``doc_len`` pieces of every document at least ``doc_len`` long."""
    for doc in docs:
        for k in range(len(doc.ids) // doc_len):
            yield doc.ids[k * doc_len:(k + 1) * doc_len]


def pack_long(pieces: list[np.ndarray], doc_len: int, seq_len: int, domain: str, seed: int) -> Iterator[Sample]:
    """Group pieces (shuffled, seeded) into samples of ``seq_len // doc_len`` documents each."""
    per = seq_len // doc_len
    order = list(range(len(pieces)))
    if per > 1:
        random.Random(seed).shuffle(order)  # neighbours in a sample come from different documents
    spans = _spans([doc_len] * per)
    for start in range(0, len(order) - per + 1, per):
        ids = np.concatenate([pieces[i] for i in order[start:start + per]]).astype(np.uint32)
        yield Sample(input_ids=ids, indices=spans.copy(), domain=domain)


def pack_concatenated(docs: Iterable[TokenizedDoc], seq_len: int, domain: str, *, carry_over: bool) -> Iterator[Sample]:
    """Concatenate documents into ``seq_len`` samples.

    ``carry_over=True`` (short data): the truncated remainder of a sample's last document begins the
    next sample. ``carry_over=False`` (SFT): the remainder is dropped. A final partial sample is
    dropped in both cases, so every sample is exactly ``seq_len`` tokens.
    """
    ids_buf: list[np.ndarray] = []
    mask_buf: list[np.ndarray] = []
    lengths: list[int] = []
    filled = 0
    with_mask = None
    for doc in docs:
        if with_mask is None:
            with_mask = doc.mask is not None
        ids, mask = doc.ids, doc.mask
        while len(ids):
            take = min(len(ids), seq_len - filled)
            ids_buf.append(ids[:take])
            if with_mask:
                mask_buf.append(mask[:take])
            lengths.append(take)
            filled += take
            ids = ids[take:]
            mask = mask[take:] if with_mask else None
            if filled == seq_len:
                yield Sample(input_ids=np.concatenate(ids_buf).astype(np.uint32), indices=_spans(lengths), domain=domain,
                             mask=np.concatenate(mask_buf).astype(np.uint8) if with_mask else None)
                ids_buf, mask_buf, lengths, filled = [], [], [], 0
                if not carry_over:
                    break
