"""One Prefect task per stage: skip if done, else submit the stage's job, stream it, and return
only its small manifest (the orchestrator never holds tensors or large results).

What a task shows in the UI (progress bars, summaries) is best effort: the job must never depend on
the Prefect API being up. While the API is unreachable those updates are skipped with a warning and
the stage's job trains on; Prefect's own client retries its state updates (``PREFECT_CLIENT_MAX_RETRIES``).
"""

from __future__ import annotations

import logging
import re
import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from prolong.recipe import recipe_from_dict
from prolong.layout import MANIFEST, stage_prefix
from prolong.pipeline import RunContext, run_stage, summarize_metrics
from prolong.progress import progress_line
from prolong.store import open_store


log = logging.getLogger("prolong.ui")
_warned_at: dict[str, float] = {}


def best_effort(fn, *args, **kwargs):
    """Call a Prefect UI function (an artifact); if the API cannot be reached, warn (once a minute)
    and go on."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # httpx errors, Prefect's ObjectNotFound, a server restarting
        name = getattr(fn, "__name__", str(fn))
        if time.monotonic() - _warned_at.get(name, float("-inf")) > 60:
            _warned_at[name] = time.monotonic()
            log.warning("Prefect UI update %s skipped (%s: %s); the stage goes on", name, type(e).__name__,
                        str(e).splitlines()[0] if str(e) else "")
        return None


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")


def _stage_markdown(ctx: RunContext, result) -> str:
    m = result.manifest
    folder = ctx.store.uri(stage_prefix(ctx.run, result.stage))
    lines = [f"### {result.stage} — {'skipped (already done)' if result.skipped else 'finished'}", "",
             f"- outputs: `{folder}` ({len(m.outputs)} files, {sum(o['bytes'] for o in m.outputs) / 1e6:.1f} MB)",
             f"- manifest: `{folder}/{MANIFEST}` (sha256 `{m.digest[:16]}…`)",
             f"- started {m.started_at}, finished {m.finished_at}"]
    if result.log_uri:
        lines.append(f"- job `{result.job_id}`, log: `{result.log_uri}`")
    headline = summarize_metrics(ctx.recipe, result.stage, m.metrics)
    if headline:
        lines.append(f"- {headline}")
    report = m.artifacts.get("report")  # a stage's human-readable summary (data report, eval table)
    if report and ctx.store.exists(f"{stage_prefix(ctx.run, result.stage)}/{report}"):
        lines += ["", ctx.store.read_text(f"{stage_prefix(ctx.run, result.stage)}/{report}")]
    return "\n".join(lines)


class ProgressArtifact:
    """A job's progress.json (prolong.progress) as a Prefect progress artifact whose description
    carries the whole line (phase, ETA), and a log line every 10%."""

    def __init__(self, key: str, logger):
        self.key, self.logger = key, logger
        self.artifact_id = None
        self.logged = -10.0

    def __call__(self, p: dict) -> None:
        percent, line = float(p.get("percent", 0.0)), progress_line(p)
        if percent >= self.logged + 10 or (percent == 100.0 and self.logged < 100.0):
            self.logged = percent
            self.logger.info("%s", line)
        if self.artifact_id is None:
            self.artifact_id = best_effort(create_progress_artifact, percent, key=self.key, description=line)
        else:
            best_effort(update_progress_artifact, self.artifact_id, percent, description=line)

    def close(self, description: str) -> None:
        if self.artifact_id is not None:
            best_effort(update_progress_artifact, self.artifact_id, 100.0, description=description)


@task(name="stage", cache_policy=NO_CACHE, log_prints=True)
def stage_task(stage: str, recipe: dict, run: str, store_url: str, force: bool = False,
               upstream: dict | None = None) -> dict:
    """`upstream` (the upstream stages' manifest digests) only orders tasks in the UI's graph."""
    logger = get_run_logger()
    ctx = RunContext(recipe=recipe_from_dict(recipe), store=open_store(store_url), run=run)
    progress = ProgressArtifact(artifact_key(run, stage, "progress"), logger)
    result = run_stage(ctx, stage, force=force, on_log=logger.info, on_progress=progress)
    progress.close(f"{run}: {stage} finished")
    best_effort(create_markdown_artifact, _stage_markdown(ctx, result), key=artifact_key(run, stage),
                description=f"{run}: {stage}")
    if result.skipped:
        logger.info("%s is done for these inputs (manifest %s); skipped", stage, result.manifest.digest[:12])
    else:
        logger.info("%s finished: %s", stage, summarize_metrics(ctx.recipe, stage, result.manifest.metrics))
    return {"stage": stage, "digest": result.manifest.digest, "skipped": result.skipped,
            "metrics": result.manifest.metrics}
