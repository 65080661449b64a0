"""Running stages, independent of any orchestrator: skip if done, else submit a job and wait.

The Prefect tasks in ``tasks/`` are thin wrappers over :func:`run_stage`, adding logs, progress
and artifacts in the UI. The rules live here:

* a stage whose manifest holds today's input key is *done* and is skipped;
* a stage that finished for other inputs (the recipe or an upstream stage changed since), a stage
  whose manifest is damaged, and a forced stage (``--from-stage``) start afresh: their folder is
  set aside (``{run}/.previous/{stage}``), not deleted. It is deleted only once the new attempt
  has succeeded, and put back when the new attempt fails without leaving anything to resume from
  (bad input that the job found, a crash before its first checkpoint): bad input never costs
  finished outputs;
* otherwise the job runs; a training job resumes from the checkpoints of an unfinished attempt
  when they were made for the same input key, and refuses to touch ones made for other inputs;
* a stage is finished only when its job succeeded *and* wrote a manifest with the expected key;
* a job of an earlier attempt that still runs (its submitter was killed; Slurm jobs outlive it) is
  stopped, gracefully, before anything of its stage is moved or a new job is submitted, so two
  jobs never write one stage. ``{stage}/job.json`` records which job a stage's last attempt ran.

A whole run holds the run's lease (prolong.lease) while it runs, so two runs never share a run folder.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from prolong import layout
from prolong.config import Recipe, recipe_to_dict
from prolong.errors import JobError, StageError, StoreError
from prolong.jobs import JobBackend, JobSpec, JobState, get_backend
from prolong.layout import JOB_RECORD, RUN_RECIPE, stage_prefix
from prolong.lease import Lease
from prolong.manifest import Manifest, expected_key, now, read_manifest, stage_state
from prolong.stages import digest
from prolong.store import Store

log = logging.getLogger(__name__)


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
    lease: Lease | None = None  # the run's lease while a run holds it: stages note themselves in it

    def __post_init__(self):
        layout.check_run_name(self.run)
        if self.backend is None:
            self.backend = get_backend(self.recipe.jobs.backend)

    def hold(self, owner: str, flow_run_id: str | None = None, scope: str = "") -> Lease:
        """The run's lease (``scope``: a sub-folder's own, e.g. ``evals``), to hold with ``with``;
        taking it refuses (RunBusyError) while another run holds it."""
        self.store.check_writable(self.run)  # a missing bucket says so, not "create failed"
        self.lease = Lease(self.store, layout.lease(self.run, scope), owner=owner, flow_run_id=flow_run_id)
        return self.lease


def publish_recipe(ctx: RunContext) -> str:
    """Write the resolved recipe the jobs read; returns its digest."""
    data = recipe_to_dict(ctx.recipe)
    rel = layout.run_recipe(ctx.run)
    try:
        current = ctx.store.read_json(rel) if ctx.store.exists(rel) else None
    except StoreError:
        current = None
    if current != data:
        ctx.store.write_json_atomic(rel, data)
    return digest(data)


def read_run_recipe(store: Store, run: str) -> dict:
    """The resolved recipe a run was started with (see :func:`publish_recipe`)."""
    rel = layout.run_recipe(run)
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
    rel = layout.progress(prefix)
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
    elif state == "damaged":
        log.warning("%s: its manifest is damaged; running the stage again", stage)
    attempt = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    spec = job_spec(ctx, stage, attempt)
    prefix = stage_prefix(ctx.run, stage)
    record = layout.job_record(prefix)
    aside = None
    if force or state in ("stale", "damaged"):
        stop_earlier_job(ctx, record, spec)  # before its folder moves; run_job checks otherwise
        aside = set_aside(ctx.store, ctx.run, stage)
    if ctx.lease is not None:
        ctx.lease.check()
        ctx.lease.renew(stage=stage, job_id=None)

    def tick():
        if on_progress and (p := read_progress(ctx.store, prefix)):
            on_progress(p)

    try:
        job_id, log_uri = run_job(ctx, spec, stage, layout.log(prefix, attempt), on_log=on_log, on_tick=tick,
                                  record=record)
        tick()  # the final state, which a job quicker than the poll interval would otherwise never show
        manifest = read_manifest(ctx.store, ctx.run, stage)
        if manifest is None or manifest.input_key != key:
            raise StageError(f"{stage}: the job finished but wrote no manifest for these inputs [log: {log_uri}]")
    except BaseException:
        if aside is not None:
            put_back_unless_resumable(ctx.store, ctx.run, stage, aside)
        raise
    if aside is not None:
        ctx.store.delete(aside)  # the new outputs are complete: the old ones have served their turn
        _tidy_previous(ctx.store, ctx.run)
    return StageResult(stage, manifest, skipped=False, job_id=job_id, log_uri=log_uri)


def set_aside(store: Store, run: str, stage: str) -> str | None:
    """Move a stage's folder to ``{run}/.previous/{stage}`` (replacing an older one there) before a
    fresh attempt; returns where it went, or None when there was nothing to keep."""
    prefix, aside = stage_prefix(run, stage), layout.previous_prefix(run, stage)
    if not store.list(prefix):
        return aside if store.exists(layout.manifest(aside)) else None
    store.move(prefix, aside)
    log.info("%s: earlier outputs set aside in %s until the new attempt succeeds", stage, store.uri(aside))
    return aside


def _tidy_previous(store: Store, run: str) -> None:
    parent = layout.previous_prefix(run, "").rstrip("/")
    if store.is_local and not store.list(parent):
        store.delete(parent)  # an empty folder (object stores have none)


def put_back_unless_resumable(store: Store, run: str, stage: str, aside: str) -> None:
    """After a failed attempt: when it left no complete checkpoint to resume from, its stage folder
    gets the earlier outputs back (with this attempt's logs and job record, which the error names)."""
    prefix = stage_prefix(run, stage)
    try:
        if layout.complete_steps(store, prefix) or not store.list(aside):
            return
        for sub in store.walk_files(prefix):
            if sub.startswith(f"{layout.LOGS}/") or sub == JOB_RECORD:
                store.move(f"{prefix}/{sub}", f"{aside}/{sub}")
        store.delete(prefix)
        store.move(aside, prefix)
        _tidy_previous(store, run)
        log.warning("%s: the new attempt failed before it produced anything to resume from; the earlier "
                    "outputs are back in %s", stage, store.uri(prefix))
    except StoreError as e:  # the failure being reported matters more; the outputs stay in the aside folder
        log.error("%s: could not put the earlier outputs back from %s (%s)", stage, store.uri(aside), e)


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
    """Submit, stream and wait; keep the log in the store; raise JobError with the job's own error line
    and its exit code. ``record``: where to note the job (see :func:`stop_earlier_job`). Returns (job
    id, log URI)."""
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
    if ctx.lease is not None:
        ctx.lease.renew(job_id=handle.job_id)
    log.info("%s: submitted %s (log %s)", what, handle.job_id, spec.log_path)
    final = handle.wait(on_line=on_log, on_tick=on_tick)
    log_uri = ctx.store.uri(log_rel)
    try:
        ctx.store.put_file(spec.log_path, log_rel)
    except (OSError, StoreError) as e:
        log.warning("%s: could not upload the job log (%s)", what, e)
        log_uri = str(spec.log_path)  # point at the copy that exists
    if final != JobState.SUCCEEDED:
        raise JobError.from_job(f"{what}: job {handle.job_id} {final.value} (exit {handle.exit_code}): "
                                f"{failure_reason(handle.tail(200))} [log: {log_uri}]", handle.exit_code)
    return handle.job_id, log_uri


# an exception's last line: "OSError: [Errno 28] ...", "zstd.ZstdError: ..."
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Interrupt|Exit)\b.*")


def failure_reason(tail: list[str]) -> str:
    """The most telling line of a failed job's log: its ``error:`` line, else the last exception
    line, else the last line that is not one of torchrun's ``=====`` rules."""
    lines = [ln.rstrip() for ln in tail if ln.strip()]
    for pick in (lambda ln: ln.startswith("error: "), _EXCEPTION_LINE.match,
                 lambda ln: ln.strip("=-_ ") != ""):
        found = [ln for ln in lines if pick(ln)]
        if found:
            return found[-1].removeprefix("error: ")
    return "no output"


def status_table(store: Store, run: str, recipe: Recipe) -> list[dict]:
    """One row per stage: its state — done, stale, damaged, pending, running (a live run holds the
    lease and works on it) or interrupted (its job's progress says running, but no run holds the
    lease) — with its finish time, manifest digest, metrics and last progress."""
    from prolong.lease import is_live, read_lease
    from prolong.stages import present_stages

    holder = read_lease(store, layout.lease(run))
    live = is_live(holder)
    rows = []
    for stage in present_stages(recipe):
        state, m = stage_state(store, run, recipe, stage)
        progress = read_progress(store, stage_prefix(run, stage)) if state != "done" else None
        if state != "done" and progress and progress.get("state") == "running":
            state = "running" if live and holder.get("stage") == stage else "interrupted"
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
