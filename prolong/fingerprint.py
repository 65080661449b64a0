"""Fingerprints of what a recipe names by reference: a tokenizer, a model.

A stage's config digest (prolong.stages) must change when what it reads changes, not only when its
name does: a tokenizer edited in place must rebuild the data, a model config edited in place must
retrain. So a local folder is digested by the contents of the files that define it (a model's
weights by name and size: hashing gigabytes on every status call would be too slow), a hub id by
id and revision (a pinned revision is content-addressed; an unpinned one is as good as the hub's
"main" — pin it), and a built-in asset by name and asset version (built deterministically).

Torch-free: the orchestrator computes these to decide what to skip, and the job computes the same.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from prolong import assets

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "vocab.txt", "tokenizer.model", "spiece.model",
                   "chat_template.jinja", "chat_template.json")
MODEL_CONFIG_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _local_dir(ref: str) -> Path | None:
    if assets.is_builtin(ref) or "://" in ref:
        return None
    path = Path(ref).expanduser()
    return path if path.is_dir() else None


@functools.lru_cache(maxsize=64)
def _folder(path: str, names: tuple[str, ...], weights: bool, stamp: tuple) -> dict:
    del stamp  # part of the cache key only: a file changed on disk is digested again
    root = Path(path)
    out = {}
    for name in names:
        f = root / name
        if f.is_file():
            out[name] = hashlib.sha256(f.read_bytes()).hexdigest()
    if weights:
        out["weights"] = {f.name: f.stat().st_size for f in sorted(root.iterdir())
                          if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)}
    return out


def _stamp(root: Path) -> tuple:
    return tuple(sorted((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in root.iterdir() if f.is_file()))


def fingerprint(ref: str, revision: str | None, names: tuple[str, ...], *, weights: bool = False) -> dict:
    if assets.is_builtin(ref):
        return {"asset_version": assets.ASSET_VERSION}
    root = _local_dir(ref)
    if root is None:
        return {"hub": ref, "revision": revision}
    return {"files": _folder(str(root.resolve()), names, weights, _stamp(root))}


def tokenizer_fingerprint(ref: str, revision: str | None = None) -> dict:
    return fingerprint(ref, revision, TOKENIZER_FILES)


def model_fingerprint(ref: str, revision: str | None = None) -> dict:
    return fingerprint(ref, revision, MODEL_CONFIG_FILES + TOKENIZER_FILES, weights=True)
