"""Typed errors with one-line messages.

Every failure a user can cause (a bad recipe field, a missing file, a stage whose inputs are not
ready) raises a subclass of :class:`ProlongError`. The CLI and the job entry points print
``error: <message>`` on one line and exit with the class's ``exit_code``; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class ProlongError(Exception):
    """Base class: ``str(err)`` is a single line that names the field or file at fault."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


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
    """A submitted job exited non-zero, timed out or was cancelled."""
