"""Stage manifests: the single record that a stage is done, and of what it produced.

``{store}/{run}/{stage}/manifest.json`` is written last and atomically by the stage's job. It
records the stage's input key (config digest + upstream manifest digests + code version), the code
and package versions, every output file with size and sha256, metrics and timings, and a seal (the
sha256 of its own content: prolong.integrity). A stage whose manifest holds the input key the
current recipe computes is done; anything else is re-run. A manifest that is not valid JSON or
does not match its seal is *damaged*: never trusted, and named with the way to rebuild the stage.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import importlib.metadata
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any


from prolong import layout
from prolong.errors import StageError, StoreError
from prolong.integrity import SEAL, seal_of
from prolong.layout import stage_prefix
from prolong.stages.base import code_version, digest, input_key
from prolong.store import FileEntry, Store

if TYPE_CHECKING:
    from prolong.recipe import Recipe

_PACKAGES = ("torch", "transformers", "tokenizers", "mosaicml-streaming", "numpy", "fsspec", "s3fs",
             "lm_eval", "datasets", "accelerate", "deepspeed", "flash-attn", "prefect")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@functools.lru_cache(maxsize=1)
def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


@functools.lru_cache(maxsize=1)
def git_state() -> dict[str, Any] | None:
    """Commit of the checkout this code runs from (provenance only; not part of input keys)."""
    here = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


@dataclass
class Manifest:
    stage: str
    run: str
    input_key: str
    config_digest: str
    upstream: dict[str, str]  # upstream stage → its manifest digest
    code_version: str
    config: dict  # the recipe fields the config digest covers
    outputs: list[dict]  # {path, bytes, sha256}; paths relative to the stage folder
    metrics: dict = field(default_factory=dict)
    artifacts: dict = field(default_factory=dict)  # named outputs other stages read (e.g. hf_model)
    started_at: str = ""
    finished_at: str = ""
    git: dict | None = None
    packages: dict = field(default_factory=dict)
    digest: str = ""  # sha256 of the manifest file; filled on read, never stored

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("digest")
        d[SEAL] = seal_of(d, digest)
        return d


class DamagedManifest(StoreError):
    """A manifest that is not valid JSON, or whose content no longer matches its seal."""


def read_manifest_at(store: Store, prefix: str, *, stage: str | None = None) -> Manifest | None:
    """The manifest in folder ``prefix``; None if there is none, DamagedManifest if it is damaged."""
    rel = layout.manifest(prefix)
    try:
        raw = store.read_bytes(rel)
    except StoreError:
        if not store.exists(rel):
            return None
        raise
    fix = f"re-run the stage with --from-stage {stage}" if stage else "run it again"
    try:
        data = json.loads(raw)
        data.pop("digest", None)
        sealed = data.pop(SEAL, None)
        m = Manifest(**data)
    except (ValueError, TypeError) as e:
        raise DamagedManifest(f"{store.uri(rel)}: not a valid manifest ({e}); {fix}") from None
    if sealed != seal_of(m.to_json(), digest):
        why = "has no seal" if sealed is None else "does not match its seal (edited by hand, or damaged)"
        raise DamagedManifest(f"{store.uri(rel)}: the manifest {why}, so it is not trusted; {fix}")
    m.digest = digest(raw)
    return m


def read_manifest(store: Store, run: str, stage: str) -> Manifest | None:
    return read_manifest_at(store, stage_prefix(run, stage), stage=stage)


def upstream_digests(store: Store, run: str, recipe: Recipe, stage: str) -> dict[str, str]:
    """Digests of `stage`'s upstream manifests; a missing upstream is a one-line StageError, a
    damaged one a StoreError naming it."""
    out = {}
    for up in recipe.graph.upstream(stage):
        m = read_manifest(store, run, up)
        if m is None:
            raise StageError(f"{stage}: upstream stage {up} of run {run!r} is not done "
                             f"(no {store.uri(layout.manifest(stage_prefix(run, up)))})")
        out[up] = m.digest
    return out


def expected_key(store: Store, run: str, recipe: Recipe, stage: str) -> str:
    return input_key(recipe.graph[stage].config_digest(), upstream_digests(store, run, recipe, stage))


def stage_state(store: Store, run: str, recipe: Recipe, stage: str) -> tuple[str, Manifest | None]:
    """("done" | "stale" | "pending" | "damaged", manifest): done means the manifest matches
    today's inputs; damaged, that the manifest cannot be trusted (see :func:`read_manifest_at`)."""
    try:
        m = read_manifest(store, run, stage)
    except DamagedManifest:
        return "damaged", None
    if m is None:
        return "pending", None
    try:
        key = expected_key(store, run, recipe, stage)
    except (StageError, DamagedManifest):
        return "stale", m
    return ("done" if m.input_key == key else "stale"), m


class StageRecorder:
    """Used inside a stage's job: collects outputs, then writes the manifest last."""

    def __init__(self, store: Store, run: str, recipe: Recipe, stage: str, *, prefix: str | None = None,
                 upstream: dict[str, str] | None = None):
        """``prefix``/``upstream`` place a stage's work elsewhere with other inputs: an evaluation
        of a snapshot (prolong.snapshots) is the eval stage's work on another model."""
        self.store, self.run, self.recipe, self.stage = store, run, recipe, stage
        self.prefix = prefix or stage_prefix(run, stage)
        self.upstream = upstream if upstream is not None else upstream_digests(store, run, recipe, stage)
        self.config_digest = recipe.graph[stage].config_digest()
        self.input_key = input_key(self.config_digest, self.upstream)
        self.started_at = now()
        self.outputs: dict[str, FileEntry] = {}

    def rel(self, sub: str) -> str:
        return f"{self.prefix}/{sub}"

    def invalidate(self) -> None:
        """Remove a previous manifest before outputs change, so a crash never leaves a stale 'done'."""
        self.store.delete(layout.manifest(self.prefix))

    def record(self, entries: list[FileEntry], under: str = "") -> None:
        for e in entries:
            path = f"{under}/{e.path}" if under else e.path
            self.outputs[path] = FileEntry(path=path, bytes=e.bytes, sha256=e.sha256)

    def put_dir(self, local_dir, sub: str, *, move: bool = False) -> list[FileEntry]:
        entries = self.store.put_dir(local_dir, self.rel(sub), move=move)
        self.record(entries, under=sub)
        return entries

    def put_file(self, local, sub: str) -> FileEntry:
        e = self.store.put_file(local, self.rel(sub))
        self.record([FileEntry(path=sub, bytes=e.bytes, sha256=e.sha256)])
        return e

    def record_existing(self, sub: str) -> None:
        """Record files a job already wrote into the stage folder (checkpoints, logs), hashing them."""
        rel = self.rel(sub)
        if self.store.is_file(rel):
            files = [("", rel)]
        else:
            files = [(f, f"{rel}/{f}") for f in self.store.walk_files(rel)]
        for name, path in files:
            h = hashlib.sha256()
            size = 0
            with self.store.open(path, "rb") as f:
                while block := f.read(8 << 20):
                    h.update(block)
                    size += len(block)
            full = f"{sub}/{name}" if name else sub
            self.outputs[full] = FileEntry(path=full, bytes=size, sha256=h.hexdigest())

    def write_json(self, sub: str, obj: Any) -> None:
        data = self.store.write_json_atomic(self.rel(sub), obj)
        self.record([FileEntry(path=sub, bytes=len(data), sha256=digest(data))])

    def finish(self, metrics: dict | None = None, artifacts: dict | None = None) -> Manifest:
        m = Manifest(
            stage=self.stage, run=self.run, input_key=self.input_key, config_digest=self.config_digest,
            upstream=self.upstream, code_version=code_version(), config=self.recipe.graph[self.stage].config_slice(),
            outputs=[e.to_dict() for _, e in sorted(self.outputs.items())], metrics=metrics or {},
            artifacts=artifacts or {}, started_at=self.started_at, finished_at=now(), git=git_state(),
            packages=package_versions(),
        )
        m.digest = digest(self.store.write_json_atomic(layout.manifest(self.prefix), m.to_json()))
        return m
