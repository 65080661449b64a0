"""Job backends: how a stage's process gets started, watched, and stopped."""

from prolong.jobs.base import JobBackend, JobHandle, JobSpec, JobState, get_backend

__all__ = ["JobBackend", "JobHandle", "JobSpec", "JobState", "get_backend"]
