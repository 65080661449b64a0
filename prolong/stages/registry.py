"""The stage kinds a recipe can use, by name.

Built-in kinds are listed here; more come from installed packages (entry points in the group
``prolong.stage_kinds``, each naming a :class:`~prolong.stages.base.Stage` subclass) or from
``PROLONG_STAGE_KINDS`` (comma-separated ``module:Class``; the environment reaches every job, so
a kind defined this way runs in jobs too). Kinds are loaded by name, on first use: nothing here
imports a kind's module until a recipe asks for kinds.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os

from prolong.stages.base import Stage

BUILTIN = ("prolong.stages.data:DataStage", "prolong.stages.train:TrainStage",
           "prolong.stages.evaluate:EvalStage", "prolong.stages.export:ExportStage",
           "prolong.stages.packed:PackedStage", "prolong.stages.merge:MergeStage")
# jobs that are not stages: (args after STORE RUN) → function
JOBS = {"export-checkpoint": "prolong.train.export:export_checkpoint"}

_kinds: dict[str, type[Stage]] = {}
_loaded_from: tuple[str, ...] | None = None


def load(ref: str) -> object:
    """``"module:attribute"`` → the attribute."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


def _refs() -> tuple[str, ...]:
    extra = tuple(r.strip() for r in os.environ.get("PROLONG_STAGE_KINDS", "").split(",") if r.strip())
    try:
        points = tuple(f"{ep.module}:{ep.attr}" for ep in importlib.metadata.entry_points(group="prolong.stage_kinds"))
    except Exception:  # broken metadata of an unrelated package must not stop recipes from loading
        points = ()
    return BUILTIN + points + extra


def kinds() -> dict[str, type[Stage]]:
    global _loaded_from
    refs = _refs()
    if refs != _loaded_from:
        found: dict[str, type[Stage]] = {}
        for ref in refs:
            try:
                cls = load(ref)
            except (ImportError, AttributeError, ValueError) as e:
                raise ValueError(f"stage kind {ref!r} cannot be loaded ({type(e).__name__}: {e})") from None
            if not (isinstance(cls, type) and issubclass(cls, Stage)):
                raise ValueError(f"stage kind {ref!r} is not a prolong.stages.base.Stage subclass")
            found[cls.kind] = cls
        _kinds.clear()
        _kinds.update(found)
        _loaded_from = refs
    return _kinds


def kind_class(kind: object, field: str) -> type[Stage]:
    known = kinds()
    if kind not in known:
        raise ValueError(f"{field}: unknown stage kind {kind!r} (known: {', '.join(sorted(known))})")
    return known[kind]
