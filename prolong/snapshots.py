"""Evaluate the newest model of a run, finished or not — what a nightly evaluation does.

A ProLong run trains for days; people want its long-context scores every morning, not only after
SFT. The *newest snapshot* of a run is, looking from the last training stage back to the first:
the stage's final weights if the stage is done, else its newest complete checkpoint. Each
snapshot is evaluated once, into ``{run}/evals/{stage}-step{N}/`` (the same files as the eval stage:
results.json, results.md, items.jsonl, charts/, manifest.json last); a nightly run that finds
nothing new finishes in seconds. A checkpoint is first exported to HF weights by a job on the
ranks that wrote it; evaluation is a second job. The orchestrator only submits and waits.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Callable

from prolong.config import TRAIN_STAGES, recipe_to_dict
from prolong.errors import StageError
from prolong.layout import MANIFEST, complete_steps, stage_prefix
from prolong.manifest import Manifest, read_manifest
from prolong.pipeline import JOB_RECORD, RunContext, job_spec, read_progress, run_job
from prolong.stages import config_digest, digest, input_key

log = logging.getLogger(__name__)

EVALS = "evals"
REQUEST = "request.json"


@dataclass(frozen=True)
class Snapshot:
    stage: str
    step: int
    final: bool  # the stage is done: its hf/ weights are the snapshot

    @property
    def tag(self) -> str:
        return f"{self.stage}-step{self.step:08d}"


@dataclass
class SnapshotEval:
    snapshot: Snapshot
    manifest: Manifest
    skipped: bool


def newest_snapshot(ctx: RunContext) -> Snapshot:
    for stage in reversed([s for s in TRAIN_STAGES if s in ctx.recipe.present_train_stages()]):
        m = read_manifest(ctx.store, ctx.run, stage)
        if m is not None:
            return Snapshot(stage, int(m.metrics["steps"]), final=True)
        steps = complete_steps(ctx.store, stage_prefix(ctx.run, stage))
        if steps:
            return Snapshot(stage, steps[-1], final=False)
    raise StageError(f"run {ctx.run!r} in {ctx.store.uri(ctx.run)} has no finished training stage and no checkpoint "
                     "to evaluate yet")


def snapshot_prefix(run: str, snap: Snapshot) -> str:
    return f"{run}/{EVALS}/{snap.tag}"


def snapshot_upstream(ctx: RunContext, snap: Snapshot) -> dict[str, str]:
    """What the evaluation depends on: the stage's manifest, or the checkpoint's trainer state."""
    if snap.final:
        return {snap.stage: read_manifest(ctx.store, ctx.run, snap.stage).digest}
    state = ctx.store.read_bytes(f"{stage_prefix(ctx.run, snap.stage)}/checkpoints/step_{snap.step:08d}/trainer.json")
    return {snap.tag: digest(state.decode())}


def snapshot_key(ctx: RunContext, snap: Snapshot) -> str:
    return input_key(config_digest(ctx.recipe, "eval"), snapshot_upstream(ctx, snap))


def evaluate_newest(ctx: RunContext, *, on_log: Callable[[str], None] | None = None,
                    on_progress: Callable[[dict], None] | None = None) -> SnapshotEval:
    if ctx.recipe.eval is None:
        raise StageError(f"recipe {ctx.recipe.name!r} has no eval section to evaluate with")
    snap = newest_snapshot(ctx)
    out = snapshot_prefix(ctx.run, snap)
    key = snapshot_key(ctx, snap)
    done = read_manifest(ctx.store, ctx.run, f"{EVALS}/{snap.tag}")
    if done is not None and done.input_key == key:
        log.info("%s: already evaluated (%s); nothing new", snap.tag, ctx.store.uri(f"{out}/{MANIFEST}"))
        return SnapshotEval(snap, done, skipped=True)
    attempt = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if snap.final:
        model_rel = f"{stage_prefix(ctx.run, snap.stage)}/{read_manifest(ctx.store, ctx.run, snap.stage).artifacts['hf_model']}"
    else:
        model_rel = f"{out}/hf"
        if not ctx.store.exists(f"{model_rel}/config.json"):
            args = ["export", ctx.store.url, ctx.run, snap.stage, str(snap.step), model_rel]
            run_job(ctx, job_spec(ctx, snap.stage, attempt, args=args, label=f"export-{snap.tag}"),
                    f"export {snap.tag}", f"{out}/logs/export-{attempt}.log", on_log=on_log,
                    record=f"{out}/export-{JOB_RECORD}")
    # the job reads what to evaluate from here: its arguments stay short and torchrun-safe
    # (the recipe too: evaluation settings may differ from the ones the run was trained with)
    ctx.store.write_json_atomic(f"{out}/{REQUEST}", {"model": model_rel, "model_stage": snap.stage,
                                                      "upstream": snapshot_upstream(ctx, snap),
                                                      "recipe": recipe_to_dict(ctx.recipe)})
    args = ["eval", ctx.store.url, ctx.run, out]

    def tick():
        if on_progress and (p := read_progress(ctx.store, out)):
            on_progress(p)

    run_job(ctx, job_spec(ctx, "eval", attempt, args=args, label=f"eval-{snap.tag}"), f"eval {snap.tag}",
            f"{out}/logs/eval-{attempt}.log", on_log=on_log, on_tick=tick, record=f"{out}/{JOB_RECORD}")
    tick()
    manifest = read_manifest(ctx.store, ctx.run, f"{EVALS}/{snap.tag}")
    if manifest is None or manifest.input_key != key:
        raise StageError(f"eval {snap.tag}: the job finished but wrote no manifest in {ctx.store.uri(out)}")
    return SnapshotEval(snap, manifest, skipped=False)
