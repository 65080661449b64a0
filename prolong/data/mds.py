"""MDS shards (mosaicml-streaming): writing packed samples and reading a stage's mixture.

Each *stream* is one folder of MDS shards holding samples of one stage length from one domain
(long domains also at one document length): ``{run}/data/streams/L64K/code_repos@64K``. A stage
reads its streams with ``Stream(proportion=...)``; mosaicml-streaming does the weighted sampling,
the deterministic shuffle, and — through its state dict — the exact resume position.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from prolong import layout
from prolong.config import format_tokens

COLUMNS = {"input_ids": "ndarray:uint32", "indices": "ndarray:int64", "domain": "str"}
SFT_COLUMNS = {**COLUMNS, "mask": "ndarray:uint8"}
SHARD_SIZE = "64mb"


def import_streaming():
    """Import mosaicml-streaming without torchvision.

    ``import streaming`` imports its ``streaming.vision`` subpackage, which needs torchvision — a
    package that cannot load next to a CPU build of torch from PyPI, and that we never use. An empty
    placeholder for that one subpackage lets the text/MDS parts import normally.
    """
    if "streaming" not in sys.modules:
        try:
            import torchvision  # noqa: F401
        except Exception:
            sys.modules.setdefault("streaming.vision", types.ModuleType("streaming.vision"))
    import streaming

    return streaming


@dataclass(frozen=True, order=True)
class StreamKey:
    seq_len: int
    domain: str
    doc_len: int | None = None  # long domains: the document length samples are cut to

    @property
    def name(self) -> str:
        suffix = f"@{format_tokens(self.doc_len)}" if self.doc_len else ""
        return f"L{format_tokens(self.seq_len)}/{self.domain}{suffix}"


def stage_streams(recipe, stage: str) -> list[tuple[StreamKey, float]]:
    """The streams a training stage reads, with their proportions (its mixture, resolved)."""
    cfg = recipe.train_stage(stage)
    out = []
    for comp in cfg.components():
        long = recipe.data.domains[comp.domain].kind == "long"
        out.append((StreamKey(cfg.seq_len, comp.domain, (comp.doc_len or cfg.seq_len) if long else None), comp.proportion))
    return out


def stream_rel(run: str, key: StreamKey, data_stage: str = "data") -> str:
    return f"{layout.stage_prefix(run, data_stage)}/{layout.stream(key.name)}"


def write_stream(samples: Iterable, out_dir: Path, *, sft: bool, compression: str | None) -> tuple[dict, np.ndarray]:
    """Write samples (``pack.Sample``) as MDS shards; returns counts and the document lengths seen."""
    MDSWriter = import_streaming().MDSWriter
    n = tokens = 0
    lengths = []
    with MDSWriter(out=str(out_dir), columns=SFT_COLUMNS if sft else COLUMNS, compression=compression,
                   hashes=["sha1", "xxh64"], size_limit=SHARD_SIZE, progress_bar=False) as writer:
        for s in samples:
            writer.write(s.to_mds())
            n += 1
            tokens += len(s.input_ids)
            lengths.append(s.indices[:, 1] - s.indices[:, 0])
    doc_lengths = np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int64)
    return {"samples": n, "tokens": tokens, "documents": int(len(doc_lengths))}, doc_lengths


def read_stream(uri: str | Path, cache_dir: str | Path) -> list[dict]:
    """All samples of one stream, in order (tests and reports; training uses `mixture_dataset`)."""
    streaming = import_streaming()
    ds = streaming.StreamingDataset(remote=str(uri), local=str(cache_dir), shuffle=False, batch_size=1)
    return [ds[i] for i in range(ds.num_samples)]


# Shards that failed to download, validate or decompress, by streaming's background threads (which
# only tell the main thread "Background thread failed"): the first is named by `data_errors`.
_SHARD_FAILURES: list[str] = []


@dataclass(frozen=True)
class StreamSource:
    """One stream a training stage reads: a folder of MDS shards and its proportion. A data stage
    kind says where its streams are (prolong.stages.data / prolong.stages.packed)."""

    name: str  # its cache folder and its name in errors: "L64K/books@64K", "book-65536"
    uri: str  # the folder: in the store, or read in place (a local path, s3://, hf://…@REV)
    proportion: float
    # fsspec options of a folder read in place; None: the store's own (streaming's downloaders)
    storage_options: dict | None = None
    validate_hash: str | None = "xxh64"  # released data records no hashes: the index digest covers it


@functools.lru_cache(maxsize=1)
def _checked_stream_class():
    streaming = import_streaming()

    class CheckedStream(streaming.Stream):
        """A Stream that remembers which shard failed (a checksum, a zstd frame) and how, and that
        fetches folders read in place through fsspec (requester pays, pinned hf:// revisions)."""

        storage_options: dict | None = None

        def prepare_shard(self, shard):
            try:
                return super().prepare_shard(shard)
            except Exception as e:
                names = ", ".join(zip_info.basename if zip_info else raw.basename for raw, zip_info in shard.file_pairs)
                why = "its checksum does not match the index" if "Checksum failure" in str(e) else \
                    f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                _SHARD_FAILURES.append(f"{self.remote}/{names}: the shard is damaged ({why})")
                raise

        def _download_file(self, from_basename: str, to_basename: str | None = None) -> str:
            if self.storage_options is None or self.remote is None:
                return super()._download_file(from_basename, to_basename)
            from prolong.data.remote import get_file, join

            local = os.path.join(self.local, self.split, to_basename or from_basename)
            if not os.path.exists(local):
                get_file(join(join(self.remote, self.split), from_basename), local, self.storage_options)
            return local

    return CheckedStream


def folder_stream(source: StreamSource, cache_dir: Path):
    stream = _checked_stream_class()(remote=source.uri, local=str(cache_dir / source.name),
                                     proportion=source.proportion, validate_hash=source.validate_hash)
    stream.storage_options = source.storage_options
    return stream


def mixture_dataset(sources: list[StreamSource], *, cache_dir: Path, seed: int, batch_size: int, epoch_size: int,
                    replication: int | None = None, cache_limit: str | None = None):
    """A StreamingDataset over a stage's streams in their proportions.

    ``epoch_size`` is the stage's total number of sequences, so one epoch is the whole stage and the
    per-stream counts follow the proportions exactly; ``replication`` makes groups of ranks (a
    sequence-parallel group) read the same samples. Every shard of our own data is checked against
    the xxh64 its index records (the index itself was checked against the data manifest) as it is
    fetched, so a shard damaged after the check before training is never trained on either.
    """
    streaming = import_streaming()
    # The store is always the `remote` (a local store too): streaming decompresses shards into its
    # `local` cache, and the store's files must stay exactly as the data manifest hashed them.
    streams = [folder_stream(s, cache_dir) for s in sources]
    return streaming.StreamingDataset(streams=streams, epoch_size=epoch_size, batch_size=batch_size, shuffle=True,
                                      shuffle_seed=seed, replication=replication, allow_unsafe_types=False,
                                      cache_limit=cache_limit)


def folder_samples(source: StreamSource, cache_dir: Path, which: Callable[[int], Iterable[int]] | None = None):
    """(number of samples, an iterator of (i, sample)) of one folder in order: all of them, or those
    ``which(number of samples)`` picks (only their shards are fetched)."""
    streaming = import_streaming()
    ds = streaming.StreamingDataset(streams=[folder_stream(source, cache_dir)], shuffle=False, batch_size=1,
                                    allow_unsafe_types=False)
    n = ds.num_samples
    picked = range(n) if which is None else sorted({i for i in which(n) if 0 <= i < n})
    return n, ((i, ds[i]) for i in picked)


def data_errors(batches, fix: str):
    """Iterate ``batches``; a failure inside streaming becomes one DataError naming the shard."""
    from prolong.errors import DataError

    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except Exception as e:  # streaming ends the iteration (StopIteration) or fails vaguely after one
            if _SHARD_FAILURES:
                raise DataError(f"{_SHARD_FAILURES[0]}; {fix}") from None
            if isinstance(e, StopIteration):
                return
            raise
        yield batch


def as_int64(sample: dict) -> dict:
    """MDS → tensors-to-be: ids as int64 (embedding index type), indices as [n, 2]."""
    out = dict(sample)
    out["input_ids"] = np.asarray(sample["input_ids"], dtype=np.int64)
    out["indices"] = np.asarray(sample["indices"], dtype=np.int64).reshape(-1, 2)
    return out
