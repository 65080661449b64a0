"""Where a run's files live in the store: the one module that spells store paths.

Everything is relative to the store's root (``prolong.store.Store``)::

    {run}/recipe.json                       the resolved recipe the jobs read
    {run}/lease.json                        who is running this run now (prolong.lease)
    {run}/lease-evals.json                  who is evaluating its snapshots now
    {run}/report.md                         its evaluations side by side
    {run}/{stage}/manifest.json             written last: the stage is done
    {run}/{stage}/job.json                  the job of the stage's last attempt
    {run}/{stage}/progress.json             how far that job got
    {run}/{stage}/logs/{attempt}.log
    {run}/{stage}/checkpoints/step_N/...    COMPLETE written last (sizes and sha256 of the files)
    {run}/.previous/{stage}/                a stage's earlier outputs, kept until a new attempt succeeds
    {run}/.parts/{stage}/{part}/            a stage split into parts: each part's outputs until they are merged
    {run}/evals/{stage}-stepN/              evaluations of snapshots (prolong.snapshots)

Names that become path segments (run names, stage names) are checked here, once, so that no
value from a recipe, the CLI or a Prefect parameter can point outside the store (``..``, ``/``).
Torch-free: the orchestrator imports it.
"""

from __future__ import annotations

import re

from prolong.errors import ConfigError

RUN_RECIPE = "recipe.json"
LEASE = "lease.json"
MANIFEST = "manifest.json"
JOB_RECORD = "job.json"
PROGRESS = "progress.json"
COMPLETE = "COMPLETE"
PREVIOUS = ".previous"
PARTS = ".parts"
EVALS = "evals"
LOGS = "logs"
CHECKPOINTS = "checkpoints"

# a leading letter or digit: never ".", "..", a hidden folder or an option-looking "-x"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
NAME_RULE = "1-128 letters, digits, '_', '-' or '.', starting with a letter or digit"


def check_name(name: object, field: str) -> str:
    """A run or stage name that is safe as one path segment, else a one-line ConfigError."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ConfigError(f"{field}: {name!r} is not a valid name ({NAME_RULE})")
    return name


def check_run_name(name: object, field: str = "run name") -> str:
    return check_name(name, field)


def run_prefix(run: str) -> str:
    return check_run_name(run)


def run_recipe(run: str) -> str:
    return f"{run_prefix(run)}/{RUN_RECIPE}"


def run_report(run: str) -> str:
    """The run's evaluations side by side (written by the flow when it has any)."""
    return f"{run_prefix(run)}/report.md"


def lease(run: str, scope: str = "") -> str:
    """The lease of a run (``scope``: a part with a lease of its own, e.g. ``evals``: lease-evals.json)."""
    return f"{run_prefix(run)}/{LEASE.replace('.json', f'-{scope}.json') if scope else LEASE}"


def stage_prefix(run: str, stage: str) -> str:
    return f"{run_prefix(run)}/{stage}"


def previous_prefix(run: str, stage: str) -> str:
    """Where a stage's earlier outputs wait while a new attempt runs (prolong.pipeline)."""
    return f"{run_prefix(run)}/{PREVIOUS}/{stage}"


def parts_prefix(run: str, stage: str) -> str:
    return f"{run_prefix(run)}/{PARTS}/{stage}"


def part_prefix(run: str, stage: str, part: str) -> str:
    """Where one part of a stage split into parts (a data stage's domain) writes, until the stage's
    merge moves its outputs into the stage's folder. Outside it, so a failed merge that puts the
    stage's earlier outputs back keeps the finished parts."""
    return f"{parts_prefix(run, stage)}/{check_name(part, 'part')}"


def previous_of(prefix: str) -> str:
    """:func:`previous_prefix` of any folder of a run (``{run}/evals/x`` → ``{run}/.previous/evals/x``)."""
    run, _, rest = prefix.partition("/")
    return f"{run_prefix(run)}/{PREVIOUS}/{rest}"


def manifest(prefix: str) -> str:
    return f"{prefix}/{MANIFEST}"


def job_record(prefix: str, label: str = "") -> str:
    return f"{prefix}/{label + '-' if label else ''}{JOB_RECORD}"


def progress(prefix: str) -> str:
    return f"{prefix}/{PROGRESS}"


def log(prefix: str, name: str) -> str:
    return f"{prefix}/{LOGS}/{name}.log"


def checkpoints(prefix: str) -> str:
    """``prefix`` is a stage folder."""
    return f"{prefix}/{CHECKPOINTS}"


def step_dir(step: int) -> str:
    return f"step_{step:08d}"


def step_of(name: str) -> int | None:
    """``step_00000040`` → 40; anything else → None."""
    m = re.fullmatch(r"step_(\d+)", name)
    return int(m.group(1)) if m else None


def checkpoint(prefix: str, step: int) -> str:
    return f"{prefix}/{checkpoint_in_stage(step)}"


def checkpoint_in_stage(step: int) -> str:
    """A checkpoint's path inside its stage folder (manifests record outputs relative to it)."""
    return f"{CHECKPOINTS}/{step_dir(step)}"


def stream(name: str) -> str:
    """A stream's folder in its data stage's folder (``streams/L64K/books@64K``)."""
    return f"streams/{name}"


def snapshot_prefix(run: str, tag: str) -> str:
    return f"{run_prefix(run)}/{EVALS}/{tag}"


def complete_steps(store, prefix: str) -> list[int]:
    """Steps of the complete checkpoints of the stage folder ``prefix``, ascending (a checkpoint is
    complete once its ``COMPLETE`` record exists: it is written last)."""
    root = checkpoints(prefix)
    steps = []
    for name in store.list(root):
        step = step_of(name)
        if step is not None and store.exists(f"{root}/{name}/{COMPLETE}"):
            steps.append(step)
    return sorted(steps)
