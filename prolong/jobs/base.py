"""The job interface: submit a spec, poll its state, stream its log, cancel it, wait for it.

A job is one stage run as ``python -m prolong.jobs.entry STAGE STORE RUN`` under
torchrun (one process per device). Backends differ only in where that command runs: ``local``
starts it here in its own process group; ``slurm`` hands it to the scheduler as a batch job.
"""

from __future__ import annotations

import enum
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable



# a rank that saved a checkpoint on a scheduler's signal exits with this (EX_TEMPFAIL): run it again
REQUEUE_EXIT_CODE = 75


class JobState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    TIMED_OUT = "timed_out"

    @property
    def finished(self) -> bool:
        return self not in (JobState.PENDING, JobState.RUNNING)


@dataclass
class JobSpec:
    name: str  # e.g. "tiny-stage1"
    args: list[str]  # arguments of `python -m prolong.jobs.entry`
    log_path: Path  # where the job's combined stdout/stderr is kept
    nproc_per_node: int = 1
    env: dict[str, str] = field(default_factory=dict)
    time_limit_s: float | None = None
    # cancel/limit: SIGTERM first, so ranks can save a checkpoint (prolong.train.preemption), SIGKILL after this
    stop_grace_s: float = 30.0
    module: str = "prolong.jobs.entry"
    nnodes: int = 1  # cluster backends; local runs on this machine only
    gpus_per_node: int | None = None  # cluster backends; None: the backend's configured default
    slurm: Any = None  # a prolong.config.SlurmConfig for the slurm backend (None: its defaults)


class JobHandle(ABC):
    job_id: str
    spec: JobSpec

    @abstractmethod
    def poll(self) -> JobState: ...

    @abstractmethod
    def read_new_lines(self) -> list[str]:
        """Log lines written since the last call."""

    @abstractmethod
    def cancel(self, grace_s: float | None = None) -> None:
        """Stop the job and every process it started: SIGTERM, then SIGKILL after ``grace_s``
        (default: the spec's ``stop_grace_s``)."""

    @property
    @abstractmethod
    def exit_code(self) -> int | None: ...

    def wait(self, on_line: Callable[[str], None] | None = None, on_tick: Callable[[], None] | None = None,
             poll_s: float = 0.5, tick_s: float = 2.0) -> JobState:
        """Block until the job ends, streaming log lines; cancels the job if the waiter is interrupted."""
        last_tick = 0.0
        try:
            while True:
                state = self.poll()
                for line in self.read_new_lines():
                    if on_line:
                        on_line(line)
                if on_tick and time.monotonic() - last_tick >= tick_s:
                    last_tick = time.monotonic()
                    on_tick()
                if state.finished:
                    for line in self.read_new_lines():
                        if on_line:
                            on_line(line)
                    return state
                time.sleep(poll_s)
        except BaseException:
            # Prefect cancellation, Ctrl-C, a crashed waiter: never leave the job running
            self.cancel()
            raise

    def tail(self, n: int = 20) -> list[str]:
        try:
            return self.spec.log_path.read_text(errors="replace").splitlines()[-n:]
        except OSError:
            return []


class JobBackend(ABC):
    name: str

    @abstractmethod
    def submit(self, spec: JobSpec) -> JobHandle: ...

    def attach(self, spec: JobSpec, job_id: str) -> JobHandle | None:
        """A handle on a job submitted earlier, possibly by another process, or None when this
        backend's jobs cannot outlive their submitter (local: they die with it)."""
        return None
