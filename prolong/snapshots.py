"""Evaluate the newest model of a run, finished or not — what a nightly evaluation does.

A ProLong run trains for days; people want its long-context scores every morning, not only after
SFT. The *newest snapshot* of a run is, looking from the last training stage back to the first:
the stage's final weights if the stage is done, else its newest complete checkpoint. Each
snapshot is evaluated once, into ``{run}/evals/{stage}-step{N}/`` (the same files as the eval stage:
results.json, results.md, items.jsonl, charts/, manifest.json last); a nightly run that finds
nothing new finishes in seconds. A checkpoint is first exported to HF weights by a job on the
ranks that wrote it; evaluation is a second job. ``export=True`` (``prolong evaluate --export``)
adds the export stage's job on the same model, into ``{run}/evals/{tag}/export/``: a model to ship
from a run that is still training. The orchestrator only submits and waits.
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
EXPORT = "export"  # a snapshot's export, inside its folder


@dataclass(frozen=True)
class Snapshot:
    stage: str
    step: int
    final: bool  # the stage is done and its hf/ weights are the snapshot

    @property
    def tag(self) -> str:
        return f"{self.stage}-step{self.step:08d}"


@dataclass
class SnapshotEval:
    snapshot: Snapshot
    manifest: Manifest
    skipped: bool
    eval_stage: str
    export: Manifest | None = None


def newest_snapshot(ctx: RunContext) -> Snapshot:
    for stage in reversed(ctx.recipe.graph.of_kind("train")):
        m = read_manifest(ctx.store, ctx.run, stage)
        if m is not None:
            # a finished LoRA stage left an adapter: its final checkpoint is exported (merged) like any
            return Snapshot(stage, int(m.metrics["steps"]), final="hf_model" in m.artifacts)
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


def stage_of_kind(ctx: RunContext, kind: str) -> str:
    """The stage whose settings apply to snapshots: the one named like its kind ("eval",
    "export"), else the recipe's last of that kind."""
    stages = ctx.recipe.graph.of_kind(kind)
    if not stages:
        raise StageError(f"recipe {ctx.recipe.name!r} has no {kind} stage to take the settings from")
    return kind if kind in stages else stages[-1]


def eval_stage_of(ctx: RunContext) -> str:
    return stage_of_kind(ctx, "eval")


def snapshot_model(ctx: RunContext, snap: Snapshot, attempt: str, on_log=None) -> str:
    """Where the snapshot's HF weights are: the stage's own, or a checkpoint exported to HF first,
    by a job on the ranks that wrote it (keyed like any work)."""
    if snap.final:
        return f"{stage_prefix(ctx.run, snap.stage)}/{read_manifest(ctx.store, ctx.run, snap.stage).artifacts['hf_model']}"
    model = f"{snapshot_prefix(ctx.run, snap.tag)}/model"
    args = ["export-checkpoint", ctx.store.url, ctx.run, snap.stage, str(snap.step), model]
    work = Work(f"export {snap.tag}", model, input_key(ctx.recipe.graph[snap.stage].config_digest(),
                                                       snapshot_upstream(ctx, snap)),
                job_spec(ctx, snap.stage, attempt, args=args, label=f"export-{snap.tag}"), attempt)
    exported, *_ = run_work(ctx, work, on_log=on_log)
    return f"{model}/{exported.artifacts['hf_model']}"


def _snapshot_work(ctx: RunContext, snap: Snapshot, stage: str, out: str, model_rel: str, attempt: str,
                   on_log, on_progress) -> tuple[Manifest, bool]:
    """``stage``'s job on the snapshot's model, into ``out``. The job reads what to work on from
    ``out/request.json``: its arguments stay short and torchrun-safe (the recipe too: its settings
    may differ from the ones the run was trained with)."""
    upstream = snapshot_upstream(ctx, snap)
    ctx.store.write_json_atomic(f"{out}/{REQUEST}", {"model": model_rel, "model_stage": snap.stage,
                                                      "upstream": upstream, "stage": stage,
                                                      "recipe": recipe_to_dict(ctx.recipe)}, sort_keys=False)
    kind = ctx.recipe.graph[stage].kind
    work = Work(f"{kind} {snap.tag}", out, input_key(ctx.recipe.graph[stage].config_digest(), upstream),
                job_spec(ctx, stage, attempt, args=[stage, ctx.store.url, ctx.run, out], label=f"{kind}-{snap.tag}"),
                attempt)
    manifest, skipped, _, _ = run_work(ctx, work, on_log=on_log, on_progress=on_progress)
    return manifest, skipped


def evaluate_newest(ctx: RunContext, *, export: bool = False, on_log: Callable[[str], None] | None = None,
                    on_progress: Callable[[dict], None] | None = None) -> SnapshotEval:
    """Evaluate the newest snapshot into ``{run}/evals/{tag}/``; with ``export``, also export it
    with the recipe's export settings into ``{run}/evals/{tag}/export/`` (HF + GGUF, checked)."""
    eval_stage = eval_stage_of(ctx)
    export_stage = stage_of_kind(ctx, "export") if export else None
    snap = newest_snapshot(ctx)
    out = snapshot_prefix(ctx.run, snap.tag)
    attempt = new_attempt()
    model_rel = snapshot_model(ctx, snap, attempt, on_log)
    manifest, skipped = _snapshot_work(ctx, snap, eval_stage, out, model_rel, attempt, on_log, on_progress)
    shipped = None
    if export_stage is not None:
        shipped, _ = _snapshot_work(ctx, snap, export_stage, f"{out}/{EXPORT}", model_rel, attempt, on_log, None)
    return SnapshotEval(snap, manifest, skipped=skipped, eval_stage=eval_stage, export=shipped)
