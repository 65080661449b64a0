"""The local job backend: real torchrun in its own process group; logs, exit codes, limits, cancel."""

import time
from pathlib import Path

import pytest

from prolong.jobs import JobSpec, JobState, get_backend
from prolong.errors import ConfigError
from tests.conftest import ROOT


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status  # a zombie has exited


def spec(tmp_path, mode: str, nproc: int = 1, **kw) -> JobSpec:
    return JobSpec(name=f"test-{mode}", module="tests.jobhelper", args=[mode, str(tmp_path / "pids")],
                   log_path=tmp_path / "job.log", nproc_per_node=nproc, env={"PYTHONPATH": str(ROOT)}, **kw)


def pids(tmp_path) -> list[int]:
    path = tmp_path / "pids"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def wait_for_pids(tmp_path, n: int, timeout: float = 60) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(pids(tmp_path)) < n and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(pids(tmp_path)) >= n, "the job did not start its processes"
    return pids(tmp_path)


def test_a_successful_job_streams_its_log(tmp_path):
    job = get_backend("local").submit(spec(tmp_path, "ok"))
    lines = []
    assert job.wait(on_line=lines.append) == JobState.SUCCEEDED and job.exit_code == 0
    assert any("rank 0 done" in ln for ln in lines)
    assert "rank 0 done" in (tmp_path / "job.log").read_text()


def test_a_failing_job_reports_its_exit_code_and_error_line(tmp_path):
    job = get_backend("local").submit(spec(tmp_path, "fail"))
    assert job.wait() == JobState.FAILED and job.exit_code != 0
    assert any(ln.startswith("error: data.domains.books") for ln in job.tail(40))


def test_the_wall_clock_limit_kills_every_process(tmp_path):
    job = get_backend("local").submit(spec(tmp_path, "sleep", nproc=2, time_limit_s=4))
    started = wait_for_pids(tmp_path, 4)
    assert job.wait() == JobState.TIMED_OUT
    time.sleep(0.5)
    assert not [p for p in started + [job.proc.pid] if alive(p)]


def test_cancel_kills_torchrun_its_ranks_and_their_children(tmp_path):
    job = get_backend("local").submit(spec(tmp_path, "sleep", nproc=2))
    started = wait_for_pids(tmp_path, 4)  # 2 ranks, each with a child
    assert all(alive(p) for p in started)
    job.cancel(grace_s=5)
    assert job.poll() == JobState.CANCELLED
    time.sleep(0.5)
    assert not [p for p in started + [job.proc.pid] if alive(p)]


def test_an_interrupted_waiter_cancels_the_job(tmp_path):
    """What happens when Prefect cancels the task or the user hits Ctrl-C while a stage runs."""
    job = get_backend("local").submit(spec(tmp_path, "sleep"))
    started = wait_for_pids(tmp_path, 2)

    def interrupt(_line):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        job.wait(on_line=interrupt)
    time.sleep(0.5)
    assert not [p for p in started if alive(p)] and job.poll() == JobState.CANCELLED


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="jobs.backend: unknown backend 'pbs'"):
        get_backend("pbs")


def test_a_job_whose_submitter_dies_is_stopped_not_orphaned(tmp_path):
    """A worker or flow run killed with SIGKILL cannot cancel its job: the job stops by itself."""
    import signal
    import subprocess
    import sys

    script = (
        "import sys, time; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
        "from prolong.jobs import JobSpec, get_backend;"
        "job = get_backend('local').submit(JobSpec(name='orphan', module='tests.jobhelper',"
        " args=['sleep', sys.argv[2] + '/pids'], log_path=Path(sys.argv[2]) / 'job.log', nproc_per_node=2,"
        " env={'PYTHONPATH': sys.argv[1]}));"
        "job.wait()"
    )
    submitter = subprocess.Popen([sys.executable, "-c", script, str(ROOT), str(tmp_path)])
    started = wait_for_pids(tmp_path, 4)
    submitter.send_signal(signal.SIGKILL)
    submitter.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and [p for p in started if alive(p)]:
        time.sleep(0.2)
    assert not [p for p in started if alive(p)]
    assert "submitted this job is gone" in (tmp_path / "job.log").read_text()
