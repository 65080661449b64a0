"""The local backend: ``torchrun`` on this machine under a supervisor (``prolong.jobs.supervise``).

The supervisor leads the job's process group and tracks every process of the job (torchrun puts
each rank in a session of its own, so the process group alone is not enough). Cancel and the
wall-clock limit send it SIGTERM: it passes SIGTERM to the whole tree — ranks checkpoint and exit —
and SIGKILLs what is left after the job's grace period. If the supervisor itself does not finish in
time, the backend SIGKILLs the tree it saw. The supervisor also stops the job if the submitting
process dies without cancelling, so a killed worker or flow run never leaves training running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from prolong.jobs.base import JobBackend, JobHandle, JobSpec, JobState
from prolong.jobs.supervise import descendants


class LocalJob(JobHandle):
    def __init__(self, spec: JobSpec):
        self.spec = spec
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "prolong.jobs.supervise", str(os.getpid()), str(spec.stop_grace_s), "--",
               sys.executable, "-m", "prolong.jobs.launch", "--standalone", "--nnodes=1",
               f"--nproc_per_node={spec.nproc_per_node}", "-m", spec.module, *spec.args]
        env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
        self._log = open(spec.log_path, "ab", buffering=0)
        self._log.write(f"$ {' '.join(cmd)}\n".encode())
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                     start_new_session=True)  # its own session and process group
        self.job_id = f"local-{self.proc.pid}"
        self.started = time.monotonic()
        self._reader = open(spec.log_path, "rb")
        self._partial = b""
        self._state = JobState.RUNNING

    @property
    def exit_code(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> JobState:
        if self._state.finished:
            return self._state
        code = self.proc.poll()
        if code is None:
            limit = self.spec.time_limit_s
            if limit is not None and time.monotonic() - self.started > limit:
                self._kill_group()
                self._state = JobState.TIMED_OUT
            return self._state
        self._state = JobState.SUCCEEDED if code == 0 else JobState.FAILED
        self._log.close()
        return self._state

    def read_new_lines(self) -> list[str]:
        data = self._partial + self._reader.read()
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [ln.decode(errors="replace") for ln in lines]

    def _kill_group(self, grace_s: float | None = None) -> None:
        if self.proc.poll() is not None and not descendants(self.proc.pid):
            return
        tree = [self.proc.pid, *descendants(self.proc.pid)]  # for the last resort below
        try:
            os.kill(self.proc.pid, signal.SIGTERM)  # the supervisor stops the tree, gracefully first
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + (self.spec.stop_grace_s if grace_s is None else grace_s) + 5.0
        while time.monotonic() < deadline and self.proc.poll() is None:
            time.sleep(0.1)
        if self.proc.poll() is None:  # the supervisor is stuck: kill everything it had
            for pid in [*tree, *descendants(self.proc.pid)]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def cancel(self, grace_s: float | None = None) -> None:
        if self._state.finished and self.proc.poll() is not None:
            return
        self._kill_group(grace_s)
        if not self._state.finished:
            self._state = JobState.CANCELLED


class LocalBackend(JobBackend):
    name = "local"

    def submit(self, spec: JobSpec) -> LocalJob:
        return LocalJob(spec)
