"""Integrity: a stage reads exactly what its upstream recorded, and a manifest is what its job wrote.

* Every manifest carries a **seal**: the sha256 of its own canonical content. A manifest edited by
  hand or damaged on disk no longer matches it and is refused (:func:`check_seal`), never trusted.
* Every output a manifest lists has its size and sha256. :func:`verify_outputs` checks files
  against them before a stage uses them — sizes from one listing (cheap, any store), and contents
  where reading them is cheap (a local store, or a copy already downloaded) — and names the first
  damaged file with the way to rebuild it.

Torch-free: the orchestrator checks sizes before a run starts; jobs check contents before training.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from prolong.errors import ProlongError, StoreError
from prolong.store import Store

SEAL = "seal"
_CHUNK = 8 << 20


def seal_of(record: dict, digest) -> str:
    """The seal of a manifest record: ``digest`` (prolong.stages.digest) of everything but the seal."""
    return digest({k: v for k, v in record.items() if k != SEAL})


@dataclass(frozen=True)
class Damage:
    path: str  # relative to the stage folder
    problem: str  # "missing", "is 10 bytes, recorded 20", "content differs from its recorded sha256"

    def __str__(self) -> str:
        return f"{self.path} {self.problem}"


def _sha256(open_file) -> str:
    h = hashlib.sha256()
    with open_file() as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _common_dir(paths: list[str]) -> str:
    """The deepest folder holding every path ("" for the stage folder itself)."""
    return posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else ""


def find_damage(store: Store, prefix: str, entries: Iterable[dict], *, content: bool,
                local_dir: Path | None = None, workers: int | None = None) -> list[Damage]:
    """Files of ``entries`` (manifest outputs: path/bytes/sha256 relative to ``prefix``) that are
    missing, of another size, or (``content``) of other bytes. ``local_dir``: check a downloaded
    copy of ``prefix`` there instead of the store."""
    entries = list(entries)
    if not entries:
        return []
    if local_dir is not None:
        sizes = {e["path"]: (local_dir / e["path"]).stat().st_size for e in entries if (local_dir / e["path"]).is_file()}
    else:
        root = _common_dir([e["path"] for e in entries])
        listed = store.sizes(f"{prefix}/{root}" if root else prefix)
        sizes = {f"{root}/{k}" if root else k: v for k, v in listed.items()}
    damage: list[Damage] = []
    to_hash = []
    for e in entries:
        size = sizes.get(e["path"])
        if size is None:
            damage.append(Damage(e["path"], "is missing"))
        elif size != e["bytes"]:
            damage.append(Damage(e["path"], f"is {size} bytes, recorded {e['bytes']}"))
        elif content:
            to_hash.append(e)
    if to_hash:
        def opener(e):
            if local_dir is not None:
                return lambda: open(local_dir / e["path"], "rb")
            return lambda: store.open(f"{prefix}/{e['path']}", "rb")

        # hashlib releases the GIL: threads hash files in parallel
        with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
            actual = list(pool.map(lambda e: _sha256(opener(e)), to_hash))
        damage += [Damage(e["path"], "differs from its recorded sha256") for e, h in zip(to_hash, actual)
                   if h != e["sha256"]]
    return damage


def verify_outputs(store: Store, prefix: str, entries: Iterable[dict], *, content: bool, fix: str,
                   error: type[ProlongError] = StoreError, local_dir: Path | None = None) -> None:
    """Raise ``error`` naming the first damaged file (and how many there are) and ``fix``."""
    damage = find_damage(store, prefix, entries, content=content, local_dir=local_dir)
    if damage:
        more = f" (and {len(damage) - 1} more damaged files)" if len(damage) > 1 else ""
        raise error(f"{store.uri(prefix)}/{damage[0]}{more}: the file is damaged; {fix}")


def outputs_under(outputs: Iterable[dict], under: str) -> list[dict]:
    """The manifest outputs inside the sub-folder ``under`` of a stage (``streams/L512/books@512``)."""
    under = under.strip("/")
    return [o for o in outputs if o["path"] == under or o["path"].startswith(under + "/")]


def checkpoint_damage(store: Store, stage_prefix: str, step: int) -> str | None:
    """Why the complete checkpoint at ``step`` cannot be used — a file missing or of another size
    than its ``COMPLETE`` record lists (checkpoints are too large to hash at every save) — or None.
    A ``COMPLETE`` without a file list (older checkpoints) is taken as it is."""
    import json

    from prolong import layout

    rel = layout.checkpoint(stage_prefix, step)
    try:
        record = json.loads(store.read_bytes(f"{rel}/{layout.COMPLETE}") or b"{}")
    except (StoreError, ValueError):
        return f"its {layout.COMPLETE} record is unreadable"
    sizes = store.sizes(rel)
    for name, size in sorted((record.get("files") or {}).items()):
        if sizes.get(name) != size:
            return f"{name} " + ("is missing" if name not in sizes else f"is {sizes[name]} bytes, {size} when saved")
    return None


def checkpoint_identity(store: Store, stage_prefix: str, step: int) -> str:
    """What identifies a checkpoint's contents cheaply: the digest of its trainer state (step, data
    position, input key), written once per save. Evaluations of snapshots are keyed by it."""
    from prolong import layout

    return hashlib.sha256(store.read_bytes(f"{layout.checkpoint(stage_prefix, step)}/trainer.json")).hexdigest()
