"""The job of a ``packed`` stage: check MDS folders packed elsewhere (ProLong's released data) and
record what training will read — or copy them into the store (``copy: true``).

A folder is checked from its index (every shard's columns and encodings, the sample count) and
from its first and last samples (the length, the token ids, the document spans, the SFT mask),
which fetches two shards, not the dataset. Everything a stage reads is named in ``folders.json``:
the folder's URI (``hf://`` pinned to a commit), its index digest, and how its shards are checked.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import numpy as np

from prolong import layout
from prolong.data import remote
from prolong.data.mds import StreamSource, folder_samples
from prolong.errors import DataError
from prolong.manifest import StageRecorder
from prolong.stages.base import digest
from prolong.stages.packed import FOLDERS

log = logging.getLogger(__name__)

INTEGER_ARRAYS = {f"ndarray:{t}" for t in ("uint8", "uint16", "uint32", "uint64", "int16", "int32", "int64")}
MASK_ENCODINGS = INTEGER_ARRAYS | {"ndarray:bool"}
# a folder packed by a tool that records its tokenizer (`tokenizer_signature` below) is compared with ours
TOKENIZER_RECORD = "tokenizer_signature.json"


def tokenizer_signature(tok) -> dict:
    """What decides whether token ids mean the same thing: the vocabulary and the special ids."""
    vocab = tok.get_vocab()
    return {"vocab_size": len(vocab), "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
            "vocab_sha256": digest(sorted(vocab.items(), key=lambda kv: kv[1]))}


def model_vocab_size(recipe, tok) -> int:
    from prolong.checks import model_config

    config = model_config(recipe.model.path, "model.path")
    if config is None:  # a hub id: the job fetches its config
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(recipe.model.path, revision=recipe.model.revision).to_dict()
    return int(config.get("vocab_size") or len(tok))


def check_columns(index: dict, where: str, *, sft: bool) -> None:
    """Every shard's columns: integer ``input_ids``; ``indices`` (if any) and ``mask`` integer arrays;
    ``mask`` present exactly when an SFT stage reads the folder."""
    for i, shard in enumerate(index["shards"]):
        if shard.get("format") != "mds":
            raise DataError(f"{where}: shard {i} is {shard.get('format')!r}, not MDS")
        columns = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        enc = columns.get("input_ids")
        if enc is None:
            raise DataError(f"{where}: shard {i} has no input_ids column (columns: {', '.join(columns) or 'none'})")
        if enc not in INTEGER_ARRAYS:
            raise DataError(f"{where}: input_ids is {enc}, not an integer array such as ndarray:uint32")
        if "indices" in columns and columns["indices"] not in INTEGER_ARRAYS:
            raise DataError(f"{where}: indices is {columns['indices']}, not an integer array of (start, end) pairs")
        if sft and "mask" not in columns:
            raise DataError(f"{where}: an SFT stage reads it but it has no mask column (which tokens are trained on)")
        if not sft and "mask" in columns:
            raise DataError(f"{where}: it has a mask column (SFT data) but a pretraining stage reads it; "
                            "set that stage's objective: sft")
        if "mask" in columns and columns["mask"] not in MASK_ENCODINGS:
            raise DataError(f"{where}: mask is {columns['mask']}, not an integer or bool array")


def check_sample(sample: dict, i: int, where: str, *, seq_len: int, vocab: int) -> None:
    ids = np.asarray(sample["input_ids"])
    what = f"{where}: sample {i}"
    if ids.ndim != 1 or len(ids) != seq_len:
        raise DataError(f"{what} has {ids.size} tokens, the stage trains on {seq_len} (packed for another length?)")
    if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
        raise DataError(f"{what} has token id {bad}, outside the model's vocabulary of {vocab} (another tokenizer?)")
    if sample.get("indices") is not None:
        spans = np.asarray(sample["indices"], dtype=np.int64).reshape(-1, 2)
        if len(spans) == 0 or spans[0, 0] != 0 or spans[-1, 1] != seq_len or np.any(spans[1:, 0] != spans[:-1, 1]) \
                or np.any(spans[:, 1] <= spans[:, 0]):
            raise DataError(f"{what}: its indices do not tile its {seq_len} tokens with [start, end) document spans")
    if sample.get("mask") is not None and np.asarray(sample["mask"]).size != seq_len:
        raise DataError(f"{what}: its mask has {np.asarray(sample['mask']).size} entries for {seq_len} tokens")


def _hashed_by(index: dict) -> str | None:
    files = [f for shard in index["shards"] for f in (shard.get("raw_data"), shard.get("zip_data")) if f]
    return "xxh64" if files and all("xxh64" in (f.get("hashes") or {}) for f in files) else None


def _shard_files(index: dict) -> list[str]:
    """The files a folder's index names (compressed ones where shards are compressed)."""
    return [(shard.get("zip_data") or shard["raw_data"])["basename"] for shard in index["shards"]]


def _pinned(uri: str, revision: str | None) -> tuple[str, str | None]:
    """An ``hf://`` folder at a moving revision → at that revision's commit (recorded, so a re-run
    reads the same bytes even if the dataset is updated)."""
    from prolong import assets

    if assets.is_builtin(uri):  # streaming takes paths and URLs: the asset's folder
        return remote.local_path(uri), None
    if not uri.startswith("hf://") or (revision and re.fullmatch(r"[0-9a-f]{40}", revision)):
        return remote.with_revision(uri, revision), revision
    from huggingface_hub import HfApi

    repo = "/".join(uri[len("hf://datasets/"):].split("/")[:2])
    try:
        sha = HfApi().dataset_info(repo, revision=revision or "main").sha
    except Exception as e:
        raise DataError(f"{uri}: cannot resolve revision {revision or 'main'} ({type(e).__name__}: {e})") from None
    return remote.with_revision(uri, sha), sha


def run_packed_stage(recipe, store, run: str, stage: str) -> None:
    from prolong.data.tokenize import load_tokenizer

    node = recipe.stage(stage)
    cfg = node.cfg
    tok = load_tokenizer(recipe.model.tokenizer_path, recipe.model.revision)
    ours, vocab = tokenizer_signature(tok), model_vocab_size(recipe, tok)
    rec = StageRecorder(store, run, recipe, stage)
    rec.invalidate()
    recorded, metrics = {}, {}
    with tempfile.TemporaryDirectory(prefix=f"prolong-{stage}-") as tmp_:
        tmp = Path(tmp_)
        for folder, readers in node.folders().items():
            lengths = {recipe.train_stage(s).seq_len for s in readers}
            where = f"{readers[0]}.mixture.{folder}"
            if len(lengths) > 1:
                raise DataError(f"{where}: read by stages of lengths {sorted(lengths)}; a packed folder has one")
            sft = {recipe.graph.nodes[s].is_sft for s in readers}
            if len(sft) > 1:
                raise DataError(f"{where}: read by SFT and pretraining stages at once")
            uri, revision = _pinned(remote.join(cfg.root, folder), cfg.revision)
            where = f"{where} ({uri})"
            raw, index = remote.read_index(uri, cfg.storage_options, what=where)
            check_columns(index, where, sft=sft.pop())
            recorded_sig = _recorded_signature(uri, cfg.storage_options, where)
            if recorded_sig is not None and recorded_sig != ours:
                diff = ", ".join(k for k in ours if recorded_sig.get(k) != ours[k])
                raise DataError(f"{where}: packed with another tokenizer ({diff} differ from "
                                f"{recipe.model.tokenizer_path}'s; {TOKENIZER_RECORD})")
            source = StreamSource(folder, uri, 1.0, dict(cfg.storage_options), _hashed_by(index))
            n, samples = folder_samples(source, tmp / "check" / folder, which=lambda n: [0, n - 1])
            if n == 0:
                raise DataError(f"{where}: the folder holds no samples")
            for i, sample in samples:
                check_sample(sample, i, where, seq_len=next(iter(lengths)), vocab=vocab)
            entry = {"uri": uri, "revision": revision, "index_sha256": digest(raw), "samples": n,
                     "shards": len(index["shards"]), "validate_hash": source.validate_hash, "readers": readers}
            if cfg.copy_into_store:
                entry["copied"] = _copy(rec, uri, cfg.storage_options, index, raw, folder, tmp)
            recorded[folder] = entry
            metrics[folder] = {"samples": n, "shards": len(index["shards"])}
            log.info("%s: %d samples in %d shards, checked%s", folder, n, len(index["shards"]),
                     ", copied into the store" if cfg.copy_into_store else "; read in place")
    rec.write_json(FOLDERS, recorded)
    rec.finish(metrics={"folders": metrics, "samples": sum(m["samples"] for m in metrics.values())},
               artifacts={"folders": FOLDERS})


def _recorded_signature(uri: str, options: dict, where: str) -> dict | None:
    record = remote.join(uri, TOKENIZER_RECORD)
    fs, path = remote.filesystem(record, options)
    if not fs.exists(path):
        return None
    try:
        return json.loads(remote.read_bytes(record, options, what=where))
    except ValueError:
        raise DataError(f"{where}: {TOKENIZER_RECORD} is not JSON") from None


def _copy(rec: StageRecorder, uri: str, options: dict, index: dict, raw: bytes, folder: str, tmp: Path) -> str:
    """The folder's index and shards into the store (staged locally; recorded with their hashes)."""
    local = tmp / "copy" / folder
    for name in _shard_files(index):
        remote.get_file(remote.join(uri, name), str(local / name), options)
    (local / remote.INDEX).write_bytes(raw)
    sub = layout.stream(folder)
    rec.put_dir(local, sub, move=True)
    return sub
