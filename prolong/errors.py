"""Typed errors with one-line messages.

Every failure a user can cause (a bad recipe field, a missing file, a stage whose inputs are not
ready) raises a subclass of :class:`ProlongError`. The CLI and the job entry points print
``error: <message>`` on one line and exit with the class's ``exit_code``; anything else is a bug
and keeps its traceback (in the log, with a one-line summary last).

Exit codes (documented in the README): 2 recipe/config, 3 store, 4 data, 5 stage/job, 6 the run is
in use by another run (its lease), 75 a job checkpointed on a scheduler's signal (run it again).
"""

from __future__ import annotations


class ProlongError(Exception):
    """Base class: ``str(err)`` is a single line that names the field or file at fault."""

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None):
        super().__init__(" ".join(str(message).split()))
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(ProlongError):
    """A recipe or override is invalid (names the dotted field path)."""

    exit_code = 2


class StoreError(ProlongError):
    """The artifact store cannot be reached, or an artifact is missing or corrupt."""

    exit_code = 3


class DataError(ProlongError):
    """Input data is missing, unreadable or unusable (names the file or domain)."""

    exit_code = 4


class StageError(ProlongError):
    """A stage cannot run (its upstream is not done) or its job failed."""

    exit_code = 5


class JobError(StageError):
    """A submitted job exited non-zero, timed out or was cancelled. It carries the job's own exit
    code when that is one of ours (a data error inside the job exits the CLI with 4, not 5)."""

    @classmethod
    def from_job(cls, message: str, job_exit_code: int | None) -> "JobError":
        ours = job_exit_code in (ConfigError.exit_code, StoreError.exit_code, DataError.exit_code,
                                 RunBusyError.exit_code)
        return cls(message, exit_code=job_exit_code if ours else None)


class RunBusyError(ProlongError):
    """Another run holds the run's lease (prolong.lease): two runs never write one run folder."""

    exit_code = 6
