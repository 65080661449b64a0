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
* a stage whose kind splits its work into parts (a data stage by domain) runs each part as keyed
  work of its own under ``{run}/.parts/{stage}/``, side by side, then its merge job as the stage's
  work: a retry skips the parts that finished;
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
from prolong.errors import JobError, StageError, StoreError
from prolong.jobs import JobBackend, JobSpec, JobState, get_backend
from prolong.layout import JOB_RECORD, stage_prefix
from prolong.lease import Lease
from prolong.manifest import Manifest, expected_key, now, read_manifest_at, stage_state
from prolong.parallel.dims import job_ranks
from prolong.recipe import Recipe, read_run_recipe, recipe_to_dict  # noqa: F401 (read_run_recipe: for callers)
from prolong.stages.base import digest
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
    if json.dumps(current) != json.dumps(data):  # order counts: stages in declaration order
        ctx.store.write_json_atomic(rel, data, sort_keys=False)
    return digest(data)


def job_spec(ctx: RunContext, stage: str, attempt: str, args: list[str] | None = None,
             label: str | None = None) -> JobSpec:
    """The job of ``stage``, shaped by its kind's needs (or, with ``args``, another job entry such
    as ``export-checkpoint`` on the stage's ranks); ``label`` names the job and its log file when it
    is not the stage itself."""
    jobs, needs = ctx.recipe.jobs, ctx.recipe.graph[stage].needs
    nproc = jobs.nproc_per_node if needs.ranks == "per_device" else 1
    # on a cluster only some kinds (training) span nodes
    nnodes = job_ranks(jobs, all_nodes=needs.nodes == "all") // jobs.nproc_per_node
    gpus = {"none": 0, "one": min(1, jobs.slurm.gpus_per_node), "all": None}[needs.gpus]
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


@dataclass
class Work:
    """One keyed job: it is done when ``prefix`` holds a manifest with ``key``. Stages are work
    (:func:`run_stage`), and so are the steps of a snapshot evaluation (prolong.snapshots)."""

    what: str  # in logs and errors: "stage1", "eval stage2-step00000040"
    prefix: str  # the folder the job writes; its manifest.json says done
    key: str
    spec: JobSpec
    attempt: str
    fresh: bool = False  # start afresh: earlier outputs set aside until the new attempt succeeds


def new_attempt() -> str:
    return datetime.datetime.now().strftime("%Y%m%d-%H%M%S")


def run_work(ctx: RunContext, work: Work, *, on_log: Callable[[str], None] | None = None,
             on_progress: Callable[[dict], None] | None = None) -> tuple[Manifest, bool, str | None, str | None]:
    """Skip if done → submit → wait → check the key: (manifest, skipped, job id, log URI)."""
    done = None if work.fresh else read_manifest_at(ctx.store, work.prefix)  # a fresh start reads no damaged one
    if done is not None and done.input_key == work.key:
        log.info("%s: done (manifest %s), skipping", work.what, done.digest[:12])
        return done, True, None, None
    record = layout.job_record(work.prefix)
    aside = None
    if work.fresh:
        stop_earlier_job(ctx, record, work.spec)  # before its folder moves; run_job checks otherwise
        aside = set_aside(ctx.store, work.prefix)
    if ctx.lease is not None:
        ctx.lease.check()

    def tick():
        if on_progress and (p := read_progress(ctx.store, work.prefix)):
            on_progress(p)

    try:
        job_id, log_uri = run_job(ctx, work.spec, work.what, layout.log(work.prefix, work.attempt), on_log=on_log,
                                  on_tick=tick, record=record)
        tick()  # the final state, which a job quicker than the poll interval would otherwise never show
        manifest = read_manifest_at(ctx.store, work.prefix)
        if manifest is None or manifest.input_key != work.key:
            raise StageError(f"{work.what}: the job finished but wrote no manifest for these inputs [log: {log_uri}]")
    except BaseException:
        if aside is not None:
            put_back_unless_resumable(ctx.store, work.prefix, aside)
        raise
    if aside is not None:
        ctx.store.delete(aside)  # the new outputs are complete: the old ones have served their turn
        _tidy_previous(ctx.store, work.prefix)
    return manifest, False, job_id, log_uri


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
    attempt = new_attempt()
    if ctx.lease is not None:
        ctx.lease.renew(stage=stage, job_id=None)
    fresh = force or state in ("stale", "damaged")
    parts = ctx.recipe.graph[stage].parts()
    if parts:
        run_parts(ctx, stage, key, parts, attempt, fresh=force, on_log=on_log, on_progress=on_progress)
    args = [stage, ctx.store.url, ctx.run, "merge"] if parts else None
    work = Work(stage, stage_prefix(ctx.run, stage), key, job_spec(ctx, stage, attempt, args), attempt, fresh=fresh)
    manifest, skipped, job_id, log_uri = run_work(ctx, work, on_log=on_log, on_progress=on_progress)
    return StageResult(stage, manifest, skipped=skipped, job_id=job_id, log_uri=log_uri)


def part_limit(ctx: RunContext, parts: int) -> int:
    """How many parts of a stage run at once: ``jobs.max_parallel_parts``, else the local machine's
    cores (each part is one process), else — on Slurm, which queues what does not fit — all of them."""
    limit = ctx.recipe.jobs.max_parallel_parts
    if not limit:
        limit = (os.cpu_count() or 1) if ctx.recipe.jobs.backend == "local" else parts
    return max(1, min(limit, parts))


def run_parts(ctx: RunContext, stage: str, key: str, parts: list[str], attempt: str, *, fresh: bool,
              on_log: Callable[[str], None] | None = None, on_progress: Callable[[dict], None] | None = None) -> None:
    """Each part of ``stage`` as its own keyed job, side by side: a part finished for these inputs is
    skipped (a retry re-runs only the parts that failed); every part runs to its end even when
    another fails, and the first failure is raised once all are done."""
    from concurrent.futures import ThreadPoolExecutor

    def one(part: str):
        spec = job_spec(ctx, stage, attempt, [stage, ctx.store.url, ctx.run, "part", part], label=f"{stage}-{part}")
        work = Work(f"{stage}[{part}]", layout.part_prefix(ctx.run, stage, part), key, spec, attempt, fresh=fresh)
        tagged = (lambda p: on_progress({**p, "part": part})) if on_progress else None
        return run_work(ctx, work, on_log=on_log, on_progress=tagged)

    limit = part_limit(ctx, len(parts))
    log.info("%s: %d parts (%s), %d at a time", stage, len(parts), ", ".join(parts), limit)
    with ThreadPoolExecutor(limit, thread_name_prefix=f"{stage}-part") as pool:
        futures = {part: pool.submit(one, part) for part in parts}
    failed = [(part, f.exception()) for part, f in futures.items() if f.exception() is not None]
    if failed:
        if len(failed) > 1:
            log.error("%s: parts %s failed", stage, ", ".join(p for p, _ in failed))
        raise failed[0][1]


def set_aside(store: Store, prefix: str) -> str | None:
    """Move a work's folder to its place under ``{run}/.previous/`` (replacing an older one there)
    before a fresh attempt; returns where it went, or None when there was nothing to keep."""
    aside = layout.previous_of(prefix)
    if not store.list(prefix):
        return aside if store.exists(layout.manifest(aside)) else None
    store.move(prefix, aside)
    log.info("earlier outputs of %s set aside in %s until the new attempt succeeds", store.uri(prefix),
             store.uri(aside))
    return aside


def _tidy_previous(store: Store, prefix: str) -> None:
    parent = layout.previous_of(prefix).rsplit("/", 1)[0]
    if store.is_local and not store.list(parent):
        store.delete(parent)  # an empty folder (object stores have none)


def put_back_unless_resumable(store: Store, prefix: str, aside: str) -> None:
    """After a failed attempt: when it left no complete checkpoint to resume from, its folder gets
    the earlier outputs back (with this attempt's logs and job record, which the error names)."""
    try:
        if layout.complete_steps(store, prefix) or not store.list(aside):
            return
        for sub in store.walk_files(prefix):
            if sub.startswith(f"{layout.LOGS}/") or sub == JOB_RECORD:
                store.move(f"{prefix}/{sub}", f"{aside}/{sub}")
        store.delete(prefix)
        store.move(aside, prefix)
        _tidy_previous(store, prefix)
        log.warning("the new attempt at %s failed before it produced anything to resume from; the earlier "
                    "outputs are back", store.uri(prefix))
    except StoreError as e:  # the failure being reported matters more; the outputs stay in the aside folder
        log.error("could not put the earlier outputs of %s back from %s (%s)", store.uri(prefix), store.uri(aside), e)


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

    holder = read_lease(store, layout.lease(run))
    live = is_live(holder)
    rows = []
    for stage in recipe.graph.order:
        state, m = stage_state(store, run, recipe, stage)
        progress = read_progress(store, stage_prefix(run, stage)) if state != "done" else None
        if state != "done" and progress and progress.get("state") == "running":
            state = "running" if live and holder.get("stage") == stage else "interrupted"
        rows.append({"stage": stage, "state": state, "finished_at": m.finished_at if m else None,
                     "manifest": m.digest[:12] if m else None, "metrics": m.metrics if m else {},
                     "progress": progress})
    return rows


def summarize_metrics(recipe: Recipe, stage: str, metrics: dict) -> str:
    """One short line of a stage's headline numbers, for tables and logs (its kind says which)."""
    if stage in recipe.graph:
        return recipe.graph[stage].headline(metrics)
    return json.dumps(metrics)[:80]
