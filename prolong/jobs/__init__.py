"""Job backends: where a stage's job runs (``local`` torchrun under a supervisor, or ``slurm``)."""

from prolong.errors import ConfigError
from prolong.jobs.base import JobBackend, JobHandle, JobSpec, JobState


def get_backend(name: str) -> JobBackend:
    if name == "local":
        from prolong.jobs.local import LocalBackend

        return LocalBackend()
    if name == "slurm":
        from prolong.jobs.slurm import SlurmBackend

        return SlurmBackend()
    raise ConfigError(f"jobs.backend: unknown backend {name!r} (available: local, slurm)")


__all__ = ["JobBackend", "JobHandle", "JobSpec", "JobState", "get_backend"]
