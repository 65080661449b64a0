"""The slurm backend against a real single-node Slurm cluster (infra/slurm/cluster.sh: munged,
slurmctld and slurmd in a temp folder): logs, exit codes, cancel, time limit, secrets, and the
checkpoint-and-requeue contract (SIGUSR1 before the limit, preemption).

Jobs ask for one CPU each, so the minute-long time-limit job runs beside the other tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from prolong.config import SlurmConfig
from prolong.recipe import load_recipe
from prolong.errors import ConfigError
from prolong.jobs import JobSpec, JobState, get_backend
from prolong.jobs.slurm import SlurmJob, _exit_code, render_script
from prolong.manifest import read_manifest
from tests.test_e2e import STAGES
from prolong.store import Store
from tests.conftest import FAST, ROOT, prolong_cli
from tests.prefect_helpers import api, deploy, wait_for_progress, wait_for_run, worker  # noqa: F401 (fixture)
from tests.test_jobs import alive, wait_for_pids
from tests.test_orchestration import job_pids

CLUSTER = ROOT / "infra" / "slurm" / "cluster.sh"
SECRET = "s3cr3t-value-that-must-not-leak-1f2e3d"
CFG = SlurmConfig(cpus_per_task=1, signal_grace_s=30)


def _have_slurm() -> bool:
    return all(shutil.which(b) for b in ("sbatch", "slurmctld", "slurmd", "munged")) and os.geteuid() == 0


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    if not _have_slurm():
        reason = "needs root and Slurm (sbatch, slurmctld, slurmd, munged): run infra/system-packages.sh"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI: {reason}")
        pytest.skip(reason)
    home = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_HOME": str(home)}
    started = subprocess.run([str(CLUSTER), "start"], env=env, capture_output=True, text=True, timeout=120)
    before = os.environ.get("SLURM_CONF")
    try:
        assert started.returncode == 0, f"cluster.sh start failed:\n{started.stdout}{started.stderr}"
        os.environ["SLURM_CONF"] = str(home / "etc" / "slurm.conf")
        yield home
    finally:
        subprocess.run([str(CLUSTER), "stop"], env=env, capture_output=True, text=True, timeout=120)
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before


def spec(path: Path, mode: str, nproc: int = 1, cfg: SlurmConfig = CFG, **kw) -> JobSpec:
    path.mkdir(parents=True, exist_ok=True)
    return JobSpec(name=f"test-{mode}", module="tests.jobhelper", args=[mode, str(path / "pids")],
                   log_path=path / "job.log", nproc_per_node=nproc, env={"PYTHONPATH": str(ROOT), **kw.pop("env", {})},
                   slurm=cfg, **kw)


def squeue_ids() -> list[str]:
    return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()


def wait_for_file(path: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert path.exists(), f"{path} never appeared"


def release_when_pending(job: SlurmJob, seen: list[JobState]):
    """on_tick for a requeued job: cut the ~120 s BeginTime delay that `scontrol requeue` adds.

    Not to zero: slurmd refuses to start a job whose credential is from the same second as the
    kill of its previous run ("Job credential revoked"), and the job then fails."""
    pending_since: list[float] = []

    def tick():
        seen.append(job.poll())
        if seen[-1] == JobState.PENDING and job.restarts > 0:
            pending_since.append(time.monotonic())
            if time.monotonic() - pending_since[0] >= 3:
                subprocess.run(["scontrol", "update", f"jobid={job.job_id}", "StartTime=now"], capture_output=True)
    return tick


# ---------------------------------------------------------------- without a cluster


def test_the_script_has_the_configured_directives_and_the_launch_contract(tmp_path):
    cfg = SlurmConfig(partition="gpu", account="proj", qos="high", nodes=2, gpus_per_node=8, cpus_per_task=64,
                      mem="512G", extra_directives=["--constraint=h100", "--exclusive"], signal_grace_s=300,
                      requeue=False, rdzv_port=29555)
    s = JobSpec(name="run-stage1", args=["stage1", "s3://b/runs", "run"], log_path=tmp_path / "stage1.log",
                nproc_per_node=8, nnodes=2, time_limit_s=3600 * 4, env={"AWS_SECRET_ACCESS_KEY": SECRET}, slurm=cfg)
    script = render_script(s, cfg, python="/venv/bin/python", cwd="/repo")
    for d in ("--partition=gpu", "--account=proj", "--qos=high", "--nodes=2", "--ntasks-per-node=1",
              "--gpus-per-node=8", "--cpus-per-task=64", "--mem=512G", "--time=240", "--constraint=h100",
              "--exclusive", "--signal=B:USR1@300", "--no-requeue", "--chdir=/repo", "--open-mode=append",
              f"--output={tmp_path / 'stage1.log'}"):
        assert f"#SBATCH {d}\n" in script, d
    assert SECRET not in script and "AWS_SECRET_ACCESS_KEY" not in script
    assert "trap \"\" USR1; exec" in script and "scancel --signal=USR1" in script and "scontrol requeue" in script
    assert ("/venv/bin/python -m prolong.jobs.slurm --nnodes=$SLURM_JOB_NUM_NODES --nproc_per_node=8 "
            '--rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id=$SLURM_JOB_ID -m prolong.jobs.entry '
            "stage1 s3://b/runs run") in script
    assert 'endpoint="$head_node:29555"' in script
    # a data or eval job: one node, no GPUs, whatever the training jobs ask for
    small = render_script(JobSpec(name="d", args=["data"], log_path=tmp_path / "d.log", gpus_per_node=0), cfg)
    assert "#SBATCH --nodes=1\n" in small and "--gpus-per-node" not in small


def test_a_grace_period_longer_than_the_time_limit_is_a_config_error(tmp_path):
    s = JobSpec(name="x", args=[], log_path=tmp_path / "x.log", time_limit_s=60)
    with pytest.raises(ConfigError, match="jobs.slurm.signal_grace_s: 120 s leaves no time"):
        render_script(s, SlurmConfig())


def test_slurm_exit_codes_become_shell_codes():
    assert _exit_code("0:0") == 0 and _exit_code("75:0") == 75 and _exit_code("0:9") == 137
    assert _exit_code(None) is None


def _catches_sigterm(pid: int) -> bool:
    caught = next(x for x in open(f"/proc/{pid}/status") if x.startswith("SigCgt:")).split()[1]
    return bool(int(caught, 16) & (1 << (signal.SIGTERM - 1)))


@pytest.mark.parametrize("when", ["before any rank started", "while a rank runs"])
def test_the_step_launcher_stops_on_sigterm_only_when_no_rank_would_see_it(tmp_path, when):
    """Slurm signals every process of a step at once. A rank it signalled checkpoints and exits, so
    torchrun must wait for it; a rank torchrun starts after the signal never sees it, so a launcher
    signalled before any rank started stops there (a cancelled job does not run on until KillWait)."""
    (tmp_path / "rank_job.py").write_text(
        "import pathlib, sys, time\n"
        "pathlib.Path(sys.argv[1]).touch()\n"
        "time.sleep(3)\n")
    marker = tmp_path / "rank-started"
    launcher = subprocess.Popen(
        [sys.executable, "-m", "prolong.jobs.slurm", "--standalone", "--nnodes=1", "--nproc_per_node=1",
         "-m", "rank_job", str(marker)], cwd=ROOT, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])})
    deadline = time.monotonic() + 120
    ready = (lambda: _catches_sigterm(launcher.pid)) if when.startswith("before") else marker.exists
    while not ready():
        assert time.monotonic() < deadline and launcher.poll() is None, launcher.stderr.read()[-2000:]
        time.sleep(0.01)
    launcher.send_signal(signal.SIGTERM)  # the launcher alone: the rank, if any, is not signalled
    _, err = launcher.communicate(timeout=120)
    if when.startswith("before"):
        assert launcher.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert "SIGTERM before any rank started: stopping" in err and not marker.exists()
    else:
        assert launcher.returncode == 0, err[-2000:]  # the rank ran to its end
        assert "waiting for the ranks to checkpoint and exit" in err


def test_no_sbatch_on_path_is_a_one_line_config_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="^jobs.backend: slurm needs Slurm's sbatch on PATH"):
        get_backend("slurm")


def test_slurm_settings_are_validated_with_their_field_path():
    with pytest.raises(ConfigError, match=r"^jobs.slurm.extra_directives: 'exclusive' is not one sbatch option"):
        load_recipe(ROOT / "recipes/tiny.yaml", ["jobs.backend=slurm", "jobs.slurm.extra_directives=[exclusive]"])
    with pytest.raises(ConfigError, match=r"^jobs.nproc_per_node: 8 processes per node but jobs.slurm.gpus_per_node is 4"):
        load_recipe(ROOT / "recipes/tiny.yaml", ["jobs.backend=slurm", "jobs.nproc_per_node=8",
                                                  "jobs.slurm.gpus_per_node=4"])
    with pytest.raises(ConfigError, match=r"^jobs.slurm.mem"):
        load_recipe(ROOT / "recipes/tiny.yaml", ["jobs.slurm.mem=lots"])
    r = load_recipe(ROOT / "recipes/tiny.yaml", ["jobs.backend=slurm", "jobs.slurm.partition=gpu"])
    assert r.jobs.backend == "slurm" and r.jobs.slurm.partition == "gpu" and r.jobs.slurm.requeue


# ---------------------------------------------------------------- on the cluster


@pytest.fixture(scope="module")
def limited_job(slurm_cluster, tmp_path_factory):
    """A job that runs into its 1-minute limit, submitted first so that its wait overlaps the other
    tests; test_the_time_limit_* checks it. Its USR1 warning comes 45 s before the limit."""
    path = tmp_path_factory.mktemp("limited")
    job = get_backend("slurm").submit(spec(path, "sleep", time_limit_s=60,
                                           cfg=SlurmConfig(cpus_per_task=1, signal_grace_s=45)))
    yield job, path
    job.cancel(grace_s=0)


def test_a_successful_job_streams_its_log(limited_job, tmp_path):  # limited_job: to start its minute early
    job = get_backend("slurm").submit(spec(tmp_path, "ok", nproc=2))
    lines = []
    assert job.wait(on_line=lines.append) == JobState.SUCCEEDED and job.exit_code == 0
    assert any("rank 0 done" in ln for ln in lines) and any("rank 1 done" in ln for ln in lines)
    assert "rank 1 done" in (tmp_path / "job.log").read_text()
    assert (tmp_path / "job.sbatch").read_text().startswith("#!/bin/bash")  # kept for debugging


def test_a_failing_job_reports_its_exit_code_and_error_line(slurm_cluster, tmp_path):
    job = get_backend("slurm").submit(spec(tmp_path, "fail"))
    assert job.wait() == JobState.FAILED and job.exit_code == 4
    assert any(ln.startswith("error: data.domains.books") for ln in job.tail(40))
    # once Slurm has forgotten the job (MinJobAge), its outcome comes from sacct or the jobcomp file
    forgotten = SlurmJob(job.spec, job.job_id, job.script_path)
    forgotten._scontrol = lambda: (None, "")
    assert forgotten.poll() == JobState.FAILED and forgotten.exit_code == 4


def test_cancel_stops_every_process_and_the_job_leaves_the_queue(slurm_cluster, tmp_path):
    job = get_backend("slurm").submit(spec(tmp_path, "sleep", nproc=2))
    started = wait_for_pids(tmp_path, 4)  # 2 ranks, each with a child
    assert all(alive(p) for p in started) and job.poll() == JobState.RUNNING
    job.cancel(grace_s=5)
    assert job.poll() == JobState.CANCELLED
    assert job.job_id not in squeue_ids()
    assert not [p for p in started if alive(p)]


def test_secrets_reach_the_job_but_not_its_script_or_log(slurm_cluster, tmp_path):
    cfg = SlurmConfig(cpus_per_task=1, partition="main", mem="500M", signal_grace_s=30,
                      extra_directives=["--comment=prolong-test"])
    job = get_backend("slurm").submit(spec(tmp_path, "secret", cfg=cfg, env={"PROLONG_TEST_SECRET": SECRET}))
    script = (tmp_path / "job.sbatch").read_text()
    for d in ("--partition=main", "--mem=500M", "--comment=prolong-test", "--cpus-per-task=1", "--signal=B:USR1@30"):
        assert f"#SBATCH {d}\n" in script
    assert job.wait() == JobState.SUCCEEDED
    assert (tmp_path / "pids.secret").read_text() == SECRET
    assert SECRET not in script and SECRET not in (tmp_path / "job.log").read_text()
    shown = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True).stdout
    assert "Partition=main" in shown and "Comment=prolong-test" in shown


def test_usr1_before_the_limit_checkpoints_requeues_and_the_handle_follows(slurm_cluster, tmp_path):
    job = get_backend("slurm").submit(spec(tmp_path, "preemptible"))
    wait_for_file(tmp_path / "pids.ready")
    assert job.poll() == JobState.RUNNING
    # what `--signal=B:USR1@grace` does before the time limit: USR1 to the batch shell only
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.job_id], check=True)
    seen: list[JobState] = []
    lines: list[str] = []
    assert job.wait(on_line=lines.append, on_tick=release_when_pending(job, seen), tick_s=0.5) == JobState.SUCCEEDED
    assert (tmp_path / "pids.signal").read_text().split() == ["SIGUSR1"]
    assert job.restarts == 1 and JobState.PENDING in seen and job.exit_code == 0
    text = "\n".join(lines)
    assert "exited 75: requeueing job" in text and "resumed (restart 1) and done" in text
    assert text.index("run 1") < text.index("requeueing") < text.index("run 2")


def test_exit_75_without_requeue_fails_with_a_clear_message(slurm_cluster, tmp_path):
    job = get_backend("slurm").submit(spec(tmp_path, "preemptible", cfg=SlurmConfig(cpus_per_task=1, requeue=False)))
    wait_for_file(tmp_path / "pids.ready")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job.job_id], check=True)
    assert job.wait() == JobState.FAILED and job.exit_code == 75 and job.restarts == 0
    errors = [ln for ln in job.tail(40) if ln.startswith("error: ")]
    assert "jobs.slurm.requeue is off" in errors[-1]


@pytest.mark.slow
def test_the_time_limit_warns_with_usr1_then_ends_the_job_as_timed_out(limited_job):
    job, path = limited_job
    started = wait_for_pids(path, 2)
    assert job.wait() == JobState.TIMED_OUT
    log = (path / "job.log").read_text()
    # the `sleep` workload ignores USR1 (torchrun's disposition), so the limit ends it
    assert "SIGUSR1 (time limit near)" in log
    assert job.job_id not in squeue_ids() and not [p for p in started if alive(p)]


@pytest.mark.slow
def test_preemption_requeues_the_job_and_the_handle_follows(slurm_cluster, tmp_path):
    """A job in `main` is preempted (PreemptMode=REQUEUE) by one in the higher-tier `urgent` partition."""
    cpus = subprocess.run(["sinfo", "-h", "-p", "main", "-o", "%c"], capture_output=True, text=True).stdout.split()[0]
    job = get_backend("slurm").submit(spec(tmp_path, "preemptible", cfg=SlurmConfig(cpus_per_task=int(cpus))))
    wait_for_file(tmp_path / "pids.ready")
    urgent = subprocess.run(["sbatch", "--parsable", "-p", "urgent", "-c", cpus, "-o", "/dev/null", "--wrap", "sleep 1"],
                            capture_output=True, text=True, check=True).stdout.strip()
    seen: list[JobState] = []
    assert job.wait(on_tick=release_when_pending(job, seen), tick_s=0.5) == JobState.SUCCEEDED
    assert (tmp_path / "pids.signal").read_text().split() == ["SIGTERM"]
    assert job.restarts >= 1 and JobState.PENDING in seen
    assert "resumed (restart" in (tmp_path / "job.log").read_text()
    assert urgent not in squeue_ids()


# what the evaluation and the export do is checked elsewhere (test_e2e, test_export_stage): here they
# only have to run as Slurm jobs, so they do little
LIGHT = ["eval.lengths=[512]", "export.gguf=[f16]",
         *(f"eval.{k}=null" for k in ("helmet", "lm_eval", "perplexity", "passkey", "needle"))]


def test_the_tiny_recipe_runs_end_to_end_on_slurm(slurm_cluster, prefect_env, tmp_path):
    """Every stage of the tiny recipe as a Slurm job, orchestrated by the prolong-recipe flow."""
    store = Store(str(tmp_path / "runs"))
    sets = [x for o in [*FAST, *LIGHT, "jobs.backend=slurm"] for x in ("--set", o)]
    out = prolong_cli("run", "recipes/tiny.yaml", "--store", store.url, "--run-name", "on-slurm", *sets,
                      env={**prefect_env, "SLURM_CONF": os.environ["SLURM_CONF"]}, check=True)
    for stage in STAGES:
        m = read_manifest(store, "on-slurm", stage)
        assert m is not None, (stage, out.stderr[-3000:])
    assert read_manifest(store, "on-slurm", "stage1").metrics["loss_last"] < \
        read_manifest(store, "on-slurm", "stage1").metrics["loss_first"]
    for stage in STAGES:  # each stage's job log, kept in the store, is a Slurm job's output
        logs = store.local_path(f"on-slurm/{stage}/logs")
        assert any("as slurm job" in p.read_text() for p in logs.glob("*.log")), stage
    assert not squeue_ids()


@pytest.mark.slow
def test_cancelling_a_flow_run_in_prefect_scancels_its_slurm_job(slurm_cluster, prefect_env, tmp_path, worker,
                                                                data_stages):
    """Cancel from the UI on the slurm backend: the flow run's process gets the worker's SIGTERM,
    the waiting stage scancels its job, and nothing of it is left in the queue or on the node."""
    store = tmp_path / "runs"
    run_name = f"cancel-slurm-{uuid.uuid4().hex[:8]}"
    overrides = [*FAST, "stage1.steps=400", "jobs.backend=slurm"]
    data_stages.seed(Store(str(store)), run_name, overrides)  # the flow run goes straight to stage 1
    dep = deploy(prefect_env, tmp_path, "tiny", {"store": str(store), "run_name": run_name,
                                                 "stages": ["data", "stage1"], "overrides": overrides})
    url = prefect_env["PREFECT_API_URL"]
    run = api(url, f"/deployments/{dep['id']}/create_flow_run", {})
    progress = store / run_name / "stage1" / "progress.json"
    wait_for_progress(url, run["id"], progress, worker)
    queued = squeue_ids()
    assert len(queued) == 1, queued

    api(url, f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING"}})
    wait_for_run(url, run["id"], ("CANCELLED",), worker, timeout=120)
    deadline = time.monotonic() + 60
    while (squeue_ids() or job_pids(f"prolong.jobs.* {store}")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not squeue_ids(), subprocess.run(["squeue"], capture_output=True, text=True).stdout
    assert not job_pids(f"prolong.jobs.* {store}")
    assert read_manifest(Store(str(store)), run_name, "stage1") is None
    # stopped gracefully: the ranks saved a checkpoint on their way out, and the job did not requeue
    assert list((store / run_name / "stage1" / "checkpoints").glob("step_*/COMPLETE"))


@pytest.mark.slow
def test_a_slurm_job_whose_submitter_was_killed_is_stopped_and_resumed_by_the_next_run(slurm_cluster, prefect_env,
                                                                                      tmp_path, data_stages):
    """A worker killed outright (SIGKILL, a lost machine) cannot scancel: its Slurm job runs on. The
    next run of the stage finds it through {stage}/job.json, stops it gracefully (the ranks
    checkpoint) and resumes from that checkpoint — two jobs never train one stage."""
    store = Store(str(tmp_path / "runs"))
    overrides = [*FAST, "stage1.steps=30", "stage1.checkpoint_every=1000", "jobs.backend=slurm"]
    data_stages.seed(store, "orphan", overrides)  # the run goes straight to stage 1, the job orphaned
    sets = [x for o in overrides for x in ("--set", o)]
    args = ["run", "recipes/tiny.yaml", "--store", store.url, "--run-name", "orphan", "--stages", "data,stage1", *sets]
    env = {**os.environ, **prefect_env, "SLURM_CONF": os.environ["SLURM_CONF"]}
    first = subprocess.Popen([str(ROOT / ".venv" / "bin" / "prolong"), *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = store.local_path("orphan/stage1/progress.json")
    deadline = time.monotonic() + 300
    while not (progress.exists() and json.loads(progress.read_text())["done"] >= 2):
        assert time.monotonic() < deadline and first.poll() is None, "stage 1 never got going"
        time.sleep(0.3)
    first.kill()
    first.wait()
    orphan = store.read_json("orphan/stage1/job.json")["job_id"]
    time.sleep(2)
    assert squeue_ids() == [orphan]  # nobody is left to cancel it

    again = prolong_cli(*args, env=env, check=True)
    assert f"job {orphan} of an earlier attempt" in again.stdout + again.stderr
    m = read_manifest(store, "orphan", "stage1")
    assert m is not None and m.metrics["resumed_from_step"] >= 2  # the stopped job's own checkpoint
    assert store.read_json("orphan/stage1/job.json")["job_id"] != orphan
    assert not squeue_ids()
