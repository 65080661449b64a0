"""Running stages, independent of any orchestrator: skip if done, else submit a job and wait.

The Prefect tasks in ``tasks/`` are thin wrappers over :func:`run_stage`, adding logs, progress
and artifacts in the UI. The rules live here:

* a stage whose manifest holds today's input key is *done* and is skipped;
* a stage that finished for other inputs (the recipe or an upstream stage changed since), and a
  forced stage (``--from-stage``), have their folder removed first, checkpoints included;
* otherwise the job runs; a training job resumes from the checkpoints of an unfinished attempt
  when they were made for the same input key, and refuses to touch ones made for other inputs;
* a stage is finished only when its job succeeded *and* wrote a manifest with the expected key;
* a job of an earlier attempt that still runs (its submitter was killed; Slurm jobs outlive it) is
  stopped, gracefully, before anything of its stage is removed or a new job is submitted, so two
  jobs never write one stage. ``{stage}/job.json`` records which job a stage's last attempt ran.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from prolong.config import Recipe, recipe_to_dict
from prolong.errors import JobError, StageError, StoreError
from prolong.jobs import JobBackend, JobSpec, JobState, get_backend
from prolong.manifest import Manifest, expected_key, now, read_manifest, stage_prefix, stage_state
from prolong.progress import PROGRESS
from prolong.stages import digest
from prolong.store import Store

log = logging.getLogger(__name__)
JOB_RECORD = "job.json"
RUN_RECIPE = "recipe.json"


@dataclass
class StageResult:
    stage: str
    manifest: Manifest
    skipped: bool
    job_id: str | None = None
    log_uri: str | None = None


@dataclass
class RunContext:
    recipe: Recipe
    store: Store
    run: str
    backend: JobBackend = field(default=None)  # type: ignore[assignment]
    log_dir: Path = field(default_factory=lambda: Path(os.environ.get("PROLONG_LOG_DIR", ".cache/prolong/logs")))

    def __post_init__(self):
        if self.backend is None:
            self.backend = get_backend(self.recipe.jobs.backend)


def publish_recipe(ctx: RunContext) -> str:
    """Write the resolved recipe the jobs read; returns its digest."""
    data = recipe_to_dict(ctx.recipe)
    rel = f"{ctx.run}/{RUN_RECIPE}"
    try:
        current = ctx.store.read_json(rel) if ctx.store.exists(rel) else None
    except StoreError:
        current = None
    if current != data:
        ctx.store.write_json_atomic(rel, data)
    return digest(data)


def read_run_recipe(store: Store, run: str) -> dict:
    """The resolved recipe a run was started with (see :func:`publish_recipe`)."""
    rel = f"{run}/{RUN_RECIPE}"
    if not store.exists(rel):
        raise StageError(f"run {run!r}: not found in {store.uri()} (no {rel})")
    return store.read_json(rel)


def job_spec(ctx: RunContext, stage: str, attempt: str, args: list[str] | None = None,
             label: str | None = None) -> JobSpec:
    """The job of ``stage`` (or of another job entry, e.g. ``export``, with ``args``); ``label``
    names the job and its log file when it is not the stage itself."""
    jobs = ctx.recipe.jobs
    single = stage in ("data", "eval")  # one process: data preparation, generation-based eval
    nproc = 1 if single else jobs.nproc_per_node
    # on a cluster only training spans nodes; data preparation needs no GPU, eval one
    nnodes = jobs.slurm.nodes if jobs.backend == "slurm" and not single else 1
    gpus = {"data": 0, "eval": min(1, jobs.slurm.gpus_per_node)}.get(stage)
    label = label or stage
    return JobSpec(
        name=f"{ctx.run}-{label}", args=args or [stage, ctx.store.url, ctx.run],
        log_path=ctx.log_dir / ctx.run / f"{label}-{attempt}.log", nproc_per_node=nproc, env=dict(jobs.env),
        time_limit_s=jobs.time_limit_minutes * 60 if jobs.time_limit_minutes else None,
        nnodes=nnodes, gpus_per_node=gpus, slurm=jobs.slurm)


def read_progress(store: Store, prefix: str) -> dict | None:
    """The ``progress.json`` a job keeps in ``prefix`` (prolong.progress), if any."""
    rel = f"{prefix}/{PROGRESS}"
    try:
        return store.read_json(rel) if store.exists(rel) else None
    except StoreError:
        return None  # a progress file is advisory; never fail a stage over it


def run_stage(ctx: RunContext, stage: str, *, force: bool = False, on_log: Callable[[str], None] | None = None,
              on_progress: Callable[[dict], None] | None = None) -> StageResult:
    state, manifest = stage_state(ctx.store, ctx.run, ctx.recipe, stage)
    if state == "done" and not force:
        log.info("%s: done (manifest %s), skipping", stage, manifest.digest[:12])
        return StageResult(stage, manifest, skipped=True)
    key = expected_key(ctx.store, ctx.run, ctx.recipe, stage)  # raises if an upstream stage is not done
    if state == "stale":
        log.info("%s: finished earlier for other inputs (recipe or upstream changed); running it again", stage)
    attempt = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    spec = job_spec(ctx, stage, attempt)
    record = f"{stage_prefix(ctx.run, stage)}/{JOB_RECORD}"
    if force or state == "stale":
        stop_earlier_job(ctx, record, spec)  # before its folder goes; run_job checks otherwise
        ctx.store.delete(stage_prefix(ctx.run, stage))

    def tick():
        if on_progress and (p := read_progress(ctx.store, stage_prefix(ctx.run, stage))):
            on_progress(p)

    job_id, log_uri = run_job(ctx, spec, stage, f"{stage_prefix(ctx.run, stage)}/logs/{attempt}.log",
                              on_log=on_log, on_tick=tick, record=record)
    tick()  # the final state, which a job quicker than the poll interval would otherwise never show
    manifest = read_manifest(ctx.store, ctx.run, stage)
    if manifest is None or manifest.input_key != key:
        raise StageError(f"{stage}: the job finished but wrote no manifest for these inputs [log: {log_uri}]")
    return StageResult(stage, manifest, skipped=False, job_id=job_id, log_uri=log_uri)


def stop_earlier_job(ctx: RunContext, record: str, spec: JobSpec) -> None:
    """Stop the job ``record`` names if it still runs: SIGTERM first, so a training job checkpoints
    and the job about to be submitted resumes from there."""
    try:
        earlier = ctx.store.read_json(record) if ctx.store.exists(record) else None
    except StoreError:
        earlier = None
    if not earlier or earlier.get("backend") != ctx.backend.name:
        return
    handle = ctx.backend.attach(replace(spec, log_path=Path(earlier["log_path"])), earlier["job_id"])
    if handle is None or handle.poll().finished:
        return
    log.warning("job %s of an earlier attempt (submitted %s) is still running: stopping it first",
                handle.job_id, earlier.get("submitted_at"))
    handle.cancel()


def run_job(ctx: RunContext, spec: JobSpec, what: str, log_rel: str, *, on_log: Callable[[str], None] | None = None,
            on_tick: Callable[[], None] | None = None, record: str | None = None) -> tuple[str, str]:
    """Submit, stream and wait; keep the log in the store; raise JobError with the job's own error line.
    ``record``: where to note the job (see :func:`stop_earlier_job`). Returns (job id, log URI)."""
    if record is not None:
        stop_earlier_job(ctx, record, spec)
    handle = ctx.backend.submit(spec)
    if record is not None:
        try:
            ctx.store.write_json_atomic(record, {"backend": ctx.backend.name, "job_id": handle.job_id,
                                                 "log_path": str(spec.log_path), "submitted_at": now()})
        except BaseException:
            handle.cancel()  # a job nobody could find again must not run on
            raise
    log.info("%s: submitted %s (log %s)", what, handle.job_id, spec.log_path)
    final = handle.wait(on_line=on_log, on_tick=on_tick)
    try:
        ctx.store.put_file(spec.log_path, log_rel)
    except (OSError, StoreError) as e:
        log.warning("%s: could not upload the job log (%s)", what, e)
    if final != JobState.SUCCEEDED:
        tail = [ln for ln in handle.tail(40) if ln.strip()]
        errors = [ln for ln in tail if ln.startswith("error: ")]
        reason = errors[-1].removeprefix("error: ") if errors else (tail[-1] if tail else "no output")
        raise JobError(f"{what}: job {handle.job_id} {final.value} (exit {handle.exit_code}): {reason} "
                       f"[log: {ctx.store.uri(log_rel)}]")
    return handle.job_id, ctx.store.uri(log_rel)


def status_table(store: Store, run: str, recipe: Recipe) -> list[dict]:
    from prolong.stages import present_stages

    rows = []
    for stage in present_stages(recipe):
        state, m = stage_state(store, run, recipe, stage)
        progress = read_progress(store, stage_prefix(run, stage)) if state != "done" else None
        rows.append({"stage": stage, "state": state, "finished_at": m.finished_at if m else None,
                     "manifest": m.digest[:12] if m else None, "metrics": m.metrics if m else {},
                     "progress": progress})
    return rows


def summarize_metrics(stage: str, metrics: dict) -> str:
    """One short line of a stage's headline numbers, for tables and logs."""
    if stage == "data":
        return f"{metrics.get('samples', 0)} samples, {metrics.get('tokens', 0):,} tokens in {len(metrics.get('streams', {}))} streams"
    if stage in ("stage1", "stage2", "sft"):
        first, last = metrics.get("loss_first"), metrics.get("loss_last10")
        if first is None:
            return ""
        return f"{metrics.get('steps')} steps, loss {first:.3f} → {last:.3f}, θ={metrics.get('rope_theta'):g}"
    if stage == "eval":
        parts = []
        for name, c in metrics.get("categories", {}).items():
            if c.get("mean") is not None:
                parts.append(f"{name} {c['mean']:.0f}")
        if "perplexity" in metrics:
            parts.append(f"ppl {metrics['perplexity']['perplexity']:.1f}")
        for task, m in metrics.get("lm_eval", {}).items():
            acc = next((v for k, v in m.items() if k.startswith("acc") and "stderr" not in k), None)
            if acc is not None:
                parts.append(f"{task} acc {acc:.3f}")
        return "; ".join(parts)
    return json.dumps(metrics)[:80]
