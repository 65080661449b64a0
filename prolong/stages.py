"""The recipe's stages: names, order, what each depends on, and what makes its output.

A stage's *config digest* covers exactly the recipe fields that determine its outputs, so that
changing SFT's learning rate re-runs SFT and evaluation but neither training stage. Together with
the digests of its upstream manifests and the code version it forms the stage's *input key*: a
stage whose manifest records the same key is done.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from prolong import __version__
from prolong.config import Recipe, TRAIN_STAGES
from prolong.errors import ConfigError
from prolong.fingerprint import model_fingerprint, tokenizer_fingerprint

STAGES = ("data", "stage1", "stage2", "sft", "eval")


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(obj: Any) -> str:
    return hashlib.sha256(obj if isinstance(obj, bytes) else canonical_json(obj)).hexdigest()


def present_stages(recipe: Recipe) -> list[str]:
    """Stages the recipe defines, in run order."""
    out = ["data", *recipe.present_train_stages()]
    if recipe.eval is not None:
        out.append("eval")
    return out


def upstream(recipe: Recipe, stage: str) -> list[str]:
    """Stages whose outputs `stage` reads."""
    if stage == "data":
        return []
    if stage in TRAIN_STAGES:
        init = recipe.init_source(stage)
        return ["data"] + ([] if init == "model" else [init])
    if stage == "eval":
        return [recipe.eval.model_from]
    raise ConfigError(f"stage: unknown stage {stage!r} (stages: {', '.join(STAGES)})")


def select_stages(recipe: Recipe, stages: list[str] | None = None, from_stage: str | None = None) -> list[str]:
    """Validate a ``--stages`` list and ``--from-stage`` against the recipe; return run order."""
    present = present_stages(recipe)
    for name in [*(stages or []), *([from_stage] if from_stage else [])]:
        if name not in STAGES:
            raise ConfigError(f"stages: unknown stage {name!r} (stages: {', '.join(STAGES)})")
        if name not in present:
            raise ConfigError(f"stages: this recipe has no {name} section")
    chosen = [s for s in present if stages is None or s in stages]
    if from_stage and from_stage not in chosen:
        raise ConfigError(f"from_stage: {from_stage!r} is not among the selected stages")
    return chosen


def stage_config(recipe: Recipe, stage: str) -> dict:
    """The recipe fields that determine `stage`'s outputs."""
    r = recipe.model_dump(mode="json")
    if stage == "data":
        # The data stage writes every stream the training stages read, sized by their steps.
        needs = {s: {k: r[s][k] for k in ("seq_len", "steps", "batch_tokens", "mixture")}
                 for s in recipe.present_train_stages()}
        tokenizer = {"ref": recipe.model.tokenizer_path,
                     **tokenizer_fingerprint(recipe.model.tokenizer_path, recipe.model.revision)}
        return {"data": r["data"], "tokenizer": tokenizer, "needs": needs}
    if stage in TRAIN_STAGES:
        out = {"stage": r[stage], "init_from": recipe.init_source(stage), "seed": recipe.seed, "parallel": r["parallel"]}
        if out["init_from"] == "model":
            out["model"] = r["model"]
            out["model_fingerprint"] = model_fingerprint(recipe.model.path, recipe.model.revision)
        else:
            out["dtype"] = r["model"]["dtype"]
        return out
    if stage == "eval":
        return {"eval": r["eval"]}
    raise ConfigError(f"stage: unknown stage {stage!r}")


def config_digest(recipe: Recipe, stage: str) -> str:
    return digest(stage_config(recipe, stage))


def code_version() -> str:
    """Part of every input key. Bumped with releases; a developer forces re-runs with --from-stage."""
    return __version__


def input_key(config_digest_: str, upstream_digests: dict[str, str], code: str | None = None) -> str:
    return digest({"config": config_digest_, "upstream": upstream_digests, "code": code or code_version()})
