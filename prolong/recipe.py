"""A recipe: YAML → one typed, validated, immutable config — a graph of named stages.

A recipe composes the sections of prolong.config (model, data catalogue, engine, jobs) with its
``stages:``, each a named instance of a stage kind (prolong.stages)::

    stages:
      data:   {kind: data}
      stage1: {kind: train, seq_len: 64K, rope_theta: 8.0e6, ...}         # from the base model
      sft:    {kind: train, init_from: stage1, mixture: {ultrachat: 1.0}, ...}
      eval:   {kind: eval, model_from: sft, ...}

Without ``stages:``, the top-level ``stage1``/``stage2``/``sft``/``eval`` sections (the ProLong
five-stage recipe) are that graph: data → stage1 → stage2 → sft → eval. Validation happens once,
here; a bad field fails with one line naming its path (``stage2.mixture: proportions sum to 0.97,
not 1``; a stage's fields are named ``STAGE.field`` either way, and ``--set STAGE.field=value``
works for both forms). Top-level keys that start with ``x-`` are ignored: they hold YAML anchors.
``extends: base.yaml`` takes another recipe file and changes what this one says.
"""

from __future__ import annotations

import copy
import functools
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import SerializeAsAny, ValidationError, field_validator, model_validator

from prolong.config.base import StageConfig, _Config
from prolong.config.data import DataConfig
from prolong.config.jobs import JobsConfig, ParallelConfig
from prolong.config.model import ModelConfig
from prolong.config.train import TrainStageConfig
from prolong.errors import ConfigError

# the ProLong form's top-level stage sections, in run order (export last: eval's default model is sft's)
LEGACY_STAGES = {"stage1": "train", "stage2": "train", "sft": "train", "eval": "eval", "export": "export"}
TOP_LEVEL = ("name", "seed", "model", "data", "stages", "parallel", "jobs")


class Recipe(_Config):
    name: str  # also the default run name: one safe path segment (prolong.layout)
    seed: int = 42
    model: ModelConfig
    data: DataConfig | None = None  # the catalogue of domains data stages read
    stages: dict[str, SerializeAsAny[StageConfig]]  # each dumped as its kind's config
    parallel: ParallelConfig = ParallelConfig()
    jobs: JobsConfig = JobsConfig()

    # ------------------------------------------------------------ the graph
    @functools.cached_property
    def graph(self):
        from prolong.stages.graph import StageGraph

        return StageGraph(self)

    def stage(self, name: str):
        """The :class:`~prolong.stages.base.Stage` named ``name``."""
        return self.graph[name]

    def train_stage(self, name: str) -> TrainStageConfig:
        cfg = self.stages.get(name)
        if not isinstance(cfg, TrainStageConfig):
            raise ConfigError(f"{name}: this recipe has no training stage {name!r}")
        return cfg

    def present_train_stages(self) -> list[str]:
        return self.graph.of_kind("train")

    def stage_seed(self, name: str) -> int:
        seed = self.train_stage(name).seed
        return self.seed if seed is None else seed

    def init_source(self, stage: str) -> str:
        """Where a training stage takes its weights from: "model" or an earlier stage."""
        return self.graph[stage].init

    # ------------------------------------------------------------ validation
    @model_validator(mode="before")
    @classmethod
    def _as_graph(cls, raw: Any) -> Any:
        """The ProLong five-stage form (top-level stage sections) → ``stages:``."""
        if not isinstance(raw, dict):
            return raw
        # top-level x-* keys hold YAML anchors for reuse (docker-compose's convention), nothing else
        raw = {k: v for k, v in raw.items() if not (isinstance(k, str) and k.startswith("x-"))}
        legacy = {k: raw.pop(k) for k in LEGACY_STAGES if k in raw}
        if "stages" in raw:
            if legacy:
                raise ValueError(f"{next(iter(legacy))}: declare stages under `stages:` or as top-level sections "
                                 "(stage1, stage2, sft, eval), not both")
            return raw
        stages: dict[str, dict] = {"data": {"kind": "data"}} if raw.get("data") is not None else {}
        for name, kind in LEGACY_STAGES.items():
            if legacy.get(name) is not None:
                stages[name] = {"kind": kind, **legacy[name]}
                if name in ("stage1", "stage2", "sft") and "objective" not in legacy[name]:
                    stages[name]["objective"] = "sft" if name == "sft" else "pretrain"
        raw["stages"] = stages
        return raw

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        from prolong.layout import NAME_RULE, check_name

        try:
            return check_name(name, "name")
        except ConfigError:
            raise ValueError(f"{name!r} is not a valid run name ({NAME_RULE})") from None

    @field_validator("stages", mode="before")
    @classmethod
    def _stage_configs(cls, stages: Any) -> dict[str, StageConfig]:
        from prolong.layout import NAME_RULE, _NAME
        from prolong.stages.registry import kind_class

        if not isinstance(stages, dict) or not stages:
            raise ValueError("stages: a recipe needs at least one stage (a mapping of name → {kind: ...})")
        out: dict[str, StageConfig] = {}
        makers: list[str] = []  # stages that make a model, in declaration order
        for name, entry in stages.items():
            if not isinstance(name, str) or not _NAME.fullmatch(name):
                raise ValueError(f"stages.{name}: not a valid stage name ({NAME_RULE})")
            if isinstance(entry, StageConfig):
                cfg = entry
            else:
                if not isinstance(entry, dict) or "kind" not in entry:
                    raise ValueError(f"{name}.kind: missing (every stage names its kind, e.g. kind: train)")
                kind_cls = kind_class(entry["kind"], f"{name}.kind")
                try:
                    cfg = kind_cls.config.model_validate(entry)
                except ValidationError as e:
                    raise ValueError(f"{name}.{format_validation_error(e)}") from None
                if getattr(cfg, "model_from", "") is None:  # eval, export: by default the last model before
                    if not makers:
                        raise ValueError(f"{name}.model_from: no stage declared before it makes a model")
                    cfg = cfg.model_copy(update={"model_from": makers[-1]})
                if kind_cls.makes_model_with(cfg):
                    makers.append(name)
            out[name] = cfg
        return out

    @model_validator(mode="after")
    def _graph(self):
        self.graph  # noqa: B018 (building it validates edges, cycles and each kind's own checks)
        return self


# ---------------------------------------------------------------- loading


def format_validation_error(err: ValidationError) -> str:
    """First error as ``dotted.path: reason``, the path being the one a user writes in YAML."""
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    # a discriminated union adds its tag after `source`; the YAML path has no such level
    parts = [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "source" and p in ("repos", "files", "hf"))]
    if parts[:1] == ["stages"]:  # a stage's fields are named STAGE.field
        parts = parts[1:]
    loc = ".".join(parts)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and re.match(r"^[\w@.\-]+: ", msg):
        # a model validator's message names the field relative to the model it validates
        return f"{loc}.{msg}" if loc else msg
    return f"{loc}: {msg}" if loc else msg


def _stage_path(raw: dict, parts: list[str]) -> list[str]:
    """``--set stage1.steps=10`` on a recipe with ``stages:`` means ``stages.stage1.steps``."""
    if parts[0] not in TOP_LEVEL and isinstance(raw.get("stages"), dict) and parts[0] in raw["stages"]:
        return ["stages", *parts]
    return parts


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``["stage1.steps=10", "jobs.nproc_per_node=2"]`` → a new dict; values parse as YAML."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        node = out
        parts = _stage_path(out, key.strip().split("."))
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ConfigError(f"--set {key}: {part} is not a section")
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key.strip()}: {value!r} is not a valid YAML value "
                              f"({getattr(e, 'problem', None) or type(e).__name__})") from None
    return out


def recipe_from_dict(raw: dict) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def _merge(base: dict, over: dict) -> dict:
    """``over`` on ``base``, mappings merged key by key; ``null`` in ``over`` removes the key."""
    out = dict(base)
    for key, value in over.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe_file(path: str | Path, _seen: tuple = ()) -> dict:
    """A recipe file as a mapping; ``extends: other.yaml`` (relative to it) takes that recipe and
    changes what this file says (mappings merge, ``null`` removes)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    parent_path = (path.parent / parent).resolve()
    if parent_path in _seen:
        raise ConfigError(f"{path}: extends: {parent} extends itself")
    return _merge(read_recipe_file(parent_path, (*_seen, path.resolve())), raw)


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    return recipe_from_dict(apply_overrides(read_recipe_file(path), overrides))


def recipe_to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json")


def read_run_recipe(store, run: str) -> dict:
    """The resolved recipe a run was started with (the orchestrator publishes it for the jobs)."""
    from prolong.errors import StageError
    from prolong.layout import run_recipe

    rel = run_recipe(run)
    if not store.exists(rel):
        raise StageError(f"run {run!r}: not found in {store.uri()} (no {rel})")
    return store.read_json(rel)
