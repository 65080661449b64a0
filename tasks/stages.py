"""One Prefect task per stage: skip if done, else submit the stage's job, stream it, and return
only its small manifest (the orchestrator never holds tensors or large results)."""

from __future__ import annotations

import re

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from prolong.config import recipe_from_dict
from prolong.manifest import MANIFEST, stage_prefix
from prolong.pipeline import RunContext, run_stage, summarize_metrics
from prolong.store import open_store


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def progress_line(stage: str, p: dict) -> str:
    """``stage1 [██████░░░░]  60% step 24/40 loss 6.214 eta 0:00:17`` for logs and terminals."""
    percent = float(p.get("percent", 0.0))
    bar = "█" * int(percent // 10) + "░" * (10 - int(percent // 10))
    eta = p.get("eta_s")
    eta_s = f" eta {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}" if eta is not None else ""
    loss = f" loss {p['loss']:.3f}" if "loss" in p else ""
    return f"{stage} [{bar}] {percent:5.1f}% step {p.get('step')}/{p.get('total_steps')}{loss}{eta_s}"


def _stage_markdown(ctx: RunContext, result) -> str:
    m = result.manifest
    folder = ctx.store.uri(stage_prefix(ctx.run, result.stage))
    lines = [f"### {result.stage} — {'skipped (already done)' if result.skipped else 'finished'}", "",
             f"- outputs: `{folder}` ({len(m.outputs)} files, {sum(o['bytes'] for o in m.outputs) / 1e6:.1f} MB)",
             f"- manifest: `{folder}/{MANIFEST}` (sha256 `{m.digest[:16]}…`)",
             f"- started {m.started_at}, finished {m.finished_at}"]
    if result.log_uri:
        lines.append(f"- job `{result.job_id}`, log: `{result.log_uri}`")
    headline = summarize_metrics(result.stage, m.metrics)
    if headline:
        lines.append(f"- {headline}")
    report = m.artifacts.get("report")  # a stage's human-readable summary (data report, eval table)
    if report and ctx.store.exists(f"{stage_prefix(ctx.run, result.stage)}/{report}"):
        lines += ["", ctx.store.read_text(f"{stage_prefix(ctx.run, result.stage)}/{report}")]
    return "\n".join(lines)


@task(name="stage", cache_policy=NO_CACHE, log_prints=True)
def stage_task(stage: str, recipe: dict, run: str, store_url: str, force: bool = False,
               upstream: dict | None = None) -> dict:
    """`upstream` (the upstream stages' manifest digests) only orders tasks in the UI's graph."""
    logger = get_run_logger()
    ctx = RunContext(recipe=recipe_from_dict(recipe), store=open_store(store_url), run=run)
    progress_id = None

    last_logged = [-1.0]

    def on_progress(p: dict) -> None:
        nonlocal progress_id
        percent = float(p.get("percent", 0.0))
        if percent >= last_logged[0] + 10 or (percent == 100.0 and last_logged[0] < 100.0):
            last_logged[0] = percent
            logger.info("%s", progress_line(stage, p))
        if progress_id is None:
            progress_id = create_progress_artifact(percent, key=artifact_key(run, stage, "progress"),
                                                   description=f"{run}: {stage} training progress")
        else:
            update_progress_artifact(progress_id, percent)

    result = run_stage(ctx, stage, force=force, on_log=logger.info, on_progress=on_progress)
    if progress_id is not None:
        update_progress_artifact(progress_id, 100.0)
    create_markdown_artifact(_stage_markdown(ctx, result), key=artifact_key(run, stage),
                             description=f"{run}: {stage}")
    if result.skipped:
        logger.info("%s is done for these inputs (manifest %s); skipped", stage, result.manifest.digest[:12])
    else:
        logger.info("%s finished: %s", stage, summarize_metrics(stage, result.manifest.metrics))
    return {"stage": stage, "digest": result.manifest.digest, "skipped": result.skipped,
            "metrics": result.manifest.metrics}
