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

import logging
from dataclasses import dataclass
from typing import Callable

from prolong.errors import StageError
from prolong.integrity import checkpoint_identity
from prolong.layout import complete_steps, snapshot_prefix, stage_prefix
from prolong.manifest import Manifest, read_manifest
from prolong.pipeline import RunContext, Work, job_spec, new_attempt, run_work
from prolong.recipe import recipe_to_dict
from prolong.stages.base import input_key

log = logging.getLogger(__name__)
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
    eval_stage: str


def newest_snapshot(ctx: RunContext) -> Snapshot:
    for stage in reversed(ctx.recipe.graph.of_kind("train")):
        m = read_manifest(ctx.store, ctx.run, stage)
        if m is not None:
            return Snapshot(stage, int(m.metrics["steps"]), final=True)
        steps = complete_steps(ctx.store, stage_prefix(ctx.run, stage))
        if steps:
            return Snapshot(stage, steps[-1], final=False)
    raise StageError(f"run {ctx.run!r} in {ctx.store.uri(ctx.run)} has no finished training stage and no checkpoint "
                     "to evaluate yet")


def snapshot_upstream(ctx: RunContext, snap: Snapshot) -> dict[str, str]:
    """What the evaluation depends on: the stage's manifest, or the checkpoint itself."""
    if snap.final:
        return {snap.stage: read_manifest(ctx.store, ctx.run, snap.stage).digest}
    return {snap.tag: checkpoint_identity(ctx.store, stage_prefix(ctx.run, snap.stage), snap.step)}


def eval_stage_of(ctx: RunContext) -> str:
    """The eval stage whose settings evaluate snapshots: "eval", else the recipe's last one."""
    evals = ctx.recipe.graph.of_kind("eval")
    if not evals:
        raise StageError(f"recipe {ctx.recipe.name!r} has no eval stage to evaluate with")
    return "eval" if "eval" in evals else evals[-1]


def evaluate_newest(ctx: RunContext, *, on_log: Callable[[str], None] | None = None,
                    on_progress: Callable[[dict], None] | None = None) -> SnapshotEval:
    eval_stage = eval_stage_of(ctx)
    snap = newest_snapshot(ctx)
    out = snapshot_prefix(ctx.run, snap.tag)
    upstream = snapshot_upstream(ctx, snap)
    attempt = new_attempt()
    if snap.final:
        model_rel = f"{stage_prefix(ctx.run, snap.stage)}/{read_manifest(ctx.store, ctx.run, snap.stage).artifacts['hf_model']}"
    else:  # a checkpoint: HF weights first, by a job on the ranks that wrote it (keyed like any work)
        model = f"{out}/model"
        args = ["export-checkpoint", ctx.store.url, ctx.run, snap.stage, str(snap.step), model]
        work = Work(f"export {snap.tag}", model, input_key(ctx.recipe.graph[snap.stage].config_digest(), upstream),
                    job_spec(ctx, snap.stage, attempt, args=args, label=f"export-{snap.tag}"), attempt)
        exported, *_ = run_work(ctx, work, on_log=on_log)
        model_rel = f"{model}/{exported.artifacts['hf_model']}"
    # the job reads what to evaluate from here: its arguments stay short and torchrun-safe
    # (the recipe too: evaluation settings may differ from the ones the run was trained with)
    ctx.store.write_json_atomic(f"{out}/{REQUEST}", {"model": model_rel, "model_stage": snap.stage,
                                                      "upstream": upstream, "eval_stage": eval_stage,
                                                      "recipe": recipe_to_dict(ctx.recipe)}, sort_keys=False)
    work = Work(f"eval {snap.tag}", out, input_key(ctx.recipe.graph[eval_stage].config_digest(), upstream),
                job_spec(ctx, eval_stage, attempt, args=[eval_stage, ctx.store.url, ctx.run, out],
                         label=f"eval-{snap.tag}"), attempt)
    manifest, skipped, _, _ = run_work(ctx, work, on_log=on_log, on_progress=on_progress)
    return SnapshotEval(snap, manifest, skipped=skipped, eval_stage=eval_stage)
