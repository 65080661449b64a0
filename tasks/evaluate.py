"""The task of the ``prolong-eval`` flow: evaluate a run's newest snapshot (prolong.snapshots)."""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from prolong.recipe import recipe_from_dict
from prolong.pipeline import RunContext, summarize_metrics
from prolong.layout import snapshot_prefix
from prolong.snapshots import EXPORT, evaluate_newest
from prolong.store import open_store
from tasks.stages import ProgressArtifact, artifact_key, best_effort


@task(name="evaluate-snapshot", cache_policy=NO_CACHE, log_prints=True)
def evaluate_snapshot_task(recipe: dict, run: str, store_url: str, export: bool = False) -> dict:
    logger = get_run_logger()
    ctx = RunContext(recipe=recipe_from_dict(recipe), store=open_store(store_url), run=run)
    progress = ProgressArtifact(artifact_key(ctx.run, "eval", "newest", "progress"), logger)
    result = evaluate_newest(ctx, export=export, on_log=logger.info, on_progress=progress)
    progress.close(f"{ctx.run}: evaluation of {result.snapshot.tag} finished")
    snap, m = result.snapshot, result.manifest
    folder = ctx.store.uri(snapshot_prefix(ctx.run, snap.tag))
    what = f"the final weights of {snap.stage}" if snap.final else f"the step-{snap.step} checkpoint of {snap.stage}"
    lines = [f"### {ctx.run}: {snap.tag} — {'already evaluated' if result.skipped else 'evaluated'}", "",
             f"- model: {what}", f"- results: `{folder}`", f"- {summarize_metrics(ctx.recipe, result.eval_stage, m.metrics)}"]
    report = m.artifacts.get("report")
    if report and ctx.store.exists(f"{snapshot_prefix(ctx.run, snap.tag)}/{report}"):
        lines += ["", ctx.store.read_text(f"{snapshot_prefix(ctx.run, snap.tag)}/{report}")]
    exported = None
    if result.export is not None:
        exported = ctx.store.uri(f"{snapshot_prefix(ctx.run, snap.tag)}/{EXPORT}")
        lines += ["", f"- export: `{exported}` ({summarize_metrics(ctx.recipe, result.export.stage, result.export.metrics)})", "",
                  ctx.store.read_text(f"{snapshot_prefix(ctx.run, snap.tag)}/{EXPORT}/{result.export.artifacts['report']}")]
    best_effort(create_markdown_artifact, "\n".join(lines), key=artifact_key(ctx.run, "eval", snap.tag),
                description=f"{ctx.run}: evaluation of {snap.tag}")
    return {"snapshot": snap.tag, "final": snap.final, "skipped": result.skipped, "digest": m.digest,
            "metrics": m.metrics, "export": exported}
