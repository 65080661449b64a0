"""Fault injection: the machine and its services fail under a running recipe, and nothing is lost.

SIGKILL at a random point of every stage kind (then a re-run completes it, the data to the same
bytes), a disk that fills up (a tiny tmpfs, when this runs as root), the S3 API server frozen or
killed while a stage writes to it, the Prefect server stopped for 90 s while a stage trains, and
the orchestrator itself killed (its flow run is then marked Crashed by the next run). Every case is
bounded in time; the random points are printed with their seed so a failure can be replayed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prolong import layout
from prolong.recipe import load_recipe
from prolong.errors import StoreError
from prolong.jobs import JobState
from prolong.manifest import read_manifest
from prolong.pipeline import RunContext, job_spec, publish_recipe, run_stage
from prolong.store import Store
from tests.conftest import BIN, FAST, ROOT, free_port, prolong_cli, sets, stop, wait_http
from tests.prefect_helpers import api

pytestmark = pytest.mark.slow
TRAIN = [o for o in FAST if o.startswith(("stage1", "stage2", "sft"))]
# an evaluation of stage 1 small enough to kill and redo in seconds
EVAL = ["eval.model_from=stage1", "eval.lengths=[512]", "eval.json_kv.depths=[0.0,1.0]",
        "eval.json_kv.max_new_tokens=16", "eval.passkey.depths=[0.5]", "eval.helmet=null", "eval.needle=null",
        "eval.perplexity=null", "eval.lm_eval=null"]


def context(store: Store, run: str, overrides=()) -> RunContext:
    ctx = RunContext(recipe=load_recipe(ROOT / "recipes" / "tiny.yaml", [*TRAIN, *EVAL, *overrides]), store=store,
                     run=run)
    publish_recipe(ctx)
    return ctx


def shard_digests(store: Store, run: str) -> dict[str, str]:
    return {o["path"]: o["sha256"] for o in read_manifest(store, run, "data").outputs if "/shard." in o["path"]}


# ---------------------------------------------------------------- SIGKILL at random points


def test_sigkill_at_a_random_point_of_every_stage_kind_then_the_rerun_completes_it(tmp_path, data_stages):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    store = Store(str(tmp_path / "runs"))
    context(store, "straight")
    data_stages.seed(store, "straight", [*TRAIN, *EVAL])  # a data job of these inputs, never interrupted
    killed = context(store, "killed")
    for stage in ("data", "stage1", "eval"):
        job = killed.backend.submit(job_spec(killed, stage, f"killed-{stage}"))
        progress = store.local_path(layout.progress(layout.stage_prefix("killed", stage)))
        deadline = time.monotonic() + 300
        while not progress.exists() and job.poll() == JobState.RUNNING and time.monotonic() < deadline:
            time.sleep(0.05)
        delay = rng.uniform(0.0, 2.0)
        time.sleep(delay)
        os.killpg(job.proc.pid, signal.SIGKILL)  # no handler runs anywhere in the job
        job.wait()
        print(f"seed {seed}: {stage} killed {delay:.2f} s after its first progress record")
        assert read_manifest(store, "killed", stage) is None or job.exit_code == 0, (stage, seed)
        result = run_stage(killed, stage)
        assert result.manifest is not None and not result.skipped, (stage, seed)
    # the data stage redone after its kill wrote exactly what an uninterrupted one writes
    assert shard_digests(store, "killed") == shard_digests(store, "straight"), seed
    assert read_manifest(store, "killed", "stage1").metrics["steps"] == 6


# ---------------------------------------------------------------- a disk that fills up


@pytest.fixture
def tiny_disk(tmp_path):
    """A 12 MB tmpfs: room for the data stage's outputs (about 0.5 MB), not for stage 1's checkpoint."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root and mount(8) to make a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_full_disk_is_one_line_naming_what_could_not_be_written(tiny_disk, prefect_env, data_stages):
    store = Store(str(tiny_disk / "runs"))
    data_stages.seed(store, "full", TRAIN)  # done, on the small disk: the run goes on to stage 1
    args = ["run", "recipes/tiny.yaml", "--store", store.url, "--run-name", "full", *sets(TRAIN)]
    p = prolong_cli(*args, "--stages", "data,stage1", env=prefect_env)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == StoreError.exit_code, p.stderr[-3000:]
    assert last.startswith("error: stage1: ") and "saving the checkpoint failed (no space left on device" in last, last
    assert "Traceback" not in p.stderr
    # the log the message points at exists and tells the story (the store had no room for it)
    log_path = Path(last.rsplit("[log: ", 1)[1].rstrip("]"))
    assert log_path.exists() and "no space left on device" in log_path.read_text()
    assert read_manifest(store, "full", "data") is not None and read_manifest(store, "full", "stage1") is None

    # now the data stage itself cannot write: the earlier data outputs are put back, whole
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (os.statvfs(tiny_disk).f_bavail * os.statvfs(tiny_disk).f_frsize - 4096))
    before = read_manifest(store, "full", "data")
    p = prolong_cli(*args, "--stages", "data", "--from-stage", "data", env=prefect_env)
    last = p.stderr.strip().splitlines()[-1]
    assert p.returncode == StoreError.exit_code and "no space left on device" in last, p.stderr[-3000:]
    assert read_manifest(store, "full", "data").digest == before.digest
    filler.unlink()
    assert prolong_cli("doctor", "full", "--store", store.url).returncode == 0


# ---------------------------------------------------------------- the S3 API server frozen or killed


@pytest.fixture
def own_s3(tmp_path):
    """A moto S3 server of this test's own (it is frozen and killed), with a bucket."""
    import boto3

    port = free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint, 30, proc)
    env = {"S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
           "AWS_MAX_ATTEMPTS": "3", "AWS_RETRY_MODE": "standard"}
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="faults")
    yield {"proc": proc, "env": env, "url": "s3://faults/runs"}
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGCONT)
    stop(proc)


def _wait_for_job(store_url: str, stage: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if subprocess.run(["pgrep", "-f", f"prolong.jobs.entry {stage} {store_url}"], capture_output=True).stdout:
            return
        time.sleep(0.2)
    raise AssertionError(f"no {stage} job started")


def test_an_s3_server_frozen_mid_stage_delays_the_run_and_one_killed_fails_it_in_one_line(own_s3, prefect_env,
                                                                                           data_stages):
    env = {**prefect_env, **own_s3["env"]}
    with pytest.MonkeyPatch.context() as mp:  # the data stage done, in the bucket: the run goes on to stage 1
        for k, v in own_s3["env"].items():
            mp.setenv(k, v)
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()
        data_stages.seed(Store(own_s3["url"]), "s3f", TRAIN)
        S3FileSystem.clear_instance_cache()
    args = ["run", "recipes/tiny.yaml", "--store", own_s3["url"], "--run-name", "s3f", *sets(TRAIN),
            "--stages", "data,stage1"]
    proc = subprocess.Popen([str(BIN / "prolong"), *args], cwd=ROOT, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    _wait_for_job(own_s3["url"], "stage1")
    time.sleep(2)
    os.killpg(own_s3["proc"].pid, signal.SIGSTOP)  # frozen: connections hang, nothing is refused
    time.sleep(15)
    os.killpg(own_s3["proc"].pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    store = Store(own_s3["url"])
    with pytest.MonkeyPatch.context() as mp:
        for k, v in own_s3["env"].items():
            mp.setenv(k, v)
        from s3fs import S3FileSystem

        S3FileSystem.clear_instance_cache()
        store = Store(own_s3["url"])
        assert read_manifest(store, "s3f", "stage1") is not None
        health = prolong_cli("doctor", "s3f", "--store", own_s3["url"], env=env)
        assert health.returncode == 0, health.stdout

    # killed outright while stage 1 writes its checkpoints: one line naming the store, no traceback
    proc = subprocess.Popen([str(BIN / "prolong"), *args, "--from-stage", "stage1"], cwd=ROOT,
                            env={**os.environ, **env}, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    _wait_for_job(own_s3["url"], "stage1")
    time.sleep(3)
    os.killpg(own_s3["proc"].pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    last = err.strip().splitlines()[-1]
    assert proc.returncode in (3, 5) and last.startswith("error: "), err[-3000:]
    assert "Traceback" not in err and ("faults" in last or "127.0.0.1" in last), last


# ---------------------------------------------------------------- the Prefect server stopped


def start_prefect(home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_API_URL": ""}
    log = open(home / "server.log", "a")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/api/health", 120, proc)
    return proc


def test_a_prefect_server_stopped_for_90_s_does_not_stop_training_and_the_run_completes(tmp_path, data_stages):
    home = tmp_path / "prefect-home"
    home.mkdir()
    port = free_port()
    store = Store(str(tmp_path / "runs"))
    steps = 60
    overrides = [*TRAIN, f"stage1.steps={steps}", "stage1.checkpoint_every=10"]
    with ThreadPoolExecutor(1) as pool:  # the data stage is done while the server starts: stage 1 is the subject
        data = pool.submit(data_stages.seed, store, "outage", overrides)
        server = start_prefect(home, port)
    if data.exception() is not None:
        stop(server)
        raise data.exception()
    env = {"PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(tmp_path / "client"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    args = ["run", "recipes/tiny.yaml", "--store", store.url, "--run-name", "outage", "--stages", "data,stage1",
            *sets(overrides)]
    proc = subprocess.Popen([str(BIN / "prolong"), *args], cwd=ROOT, env={**os.environ, **env}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        progress = store.local_path("outage/stage1/progress.json")
        deadline = time.monotonic() + 300
        while not (progress.exists() and json.loads(progress.read_text()).get("done", 0) >= 1):
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        stop(server)
        down_at = time.monotonic()
        seen = set()
        while time.monotonic() - down_at < 90:
            if progress.exists():
                seen.add(json.loads(progress.read_text()).get("done"))
            time.sleep(1)
        server = start_prefect(home, port)
        out, err = proc.communicate(timeout=600)
        runs = api(env["PREFECT_API_URL"], "/flow_runs/filter", {"flow_runs": {"name": {"any_": ["outage"]}}})
    finally:
        if proc.poll() is None:
            proc.kill()
        stop(server)
    assert proc.returncode == 0, err[-4000:]
    assert len(seen) > 3, f"training did not go on while the server was down (steps seen: {sorted(seen)})"
    assert read_manifest(store, "outage", "stage1").metrics["steps"] == steps
    assert [r["state_type"] for r in runs] == ["COMPLETED"]


def test_a_killed_orchestrator_leaves_an_interrupted_run_that_the_next_run_resumes_and_marks_crashed(
        tmp_path, prefect_env, data_stages):
    store = Store(str(tmp_path / "runs"))
    overrides = [*TRAIN, "stage1.steps=30", "stage1.checkpoint_every=2"]
    data_stages.seed(store, "orphan", overrides)  # the run goes straight to stage 1, the one killed
    args = ["run", "recipes/tiny.yaml", "--store", store.url, "--run-name", "orphan", "--stages", "data,stage1",
            *sets(overrides)]
    proc = subprocess.Popen([str(BIN / "prolong"), *args], cwd=ROOT, env={**os.environ, **prefect_env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    marker = store.local_path("orphan/stage1/checkpoints/step_00000002/COMPLETE")
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    first_run = json.loads(store.local_path("orphan/lease.json").read_text())["flow_run_id"]
    proc.kill()  # SIGKILL: no finally block, no state sent to Prefect; the job stops with its submitter
    proc.wait()
    url = prefect_env["PREFECT_API_URL"]
    assert api(url, f"/flow_runs/{first_run}")["state_type"] == "RUNNING"
    deadline = time.monotonic() + 60
    while True:  # the job's supervisor stops the job once its submitter is gone
        status = prolong_cli("status", "orphan", "--store", store.url, check=True).stdout
        if "interrupted" in status:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)

    prolong_cli(*args, env=prefect_env, check=True)
    assert read_manifest(store, "orphan", "stage1").metrics["resumed_from_step"] >= 2
    crashed = api(url, f"/flow_runs/{first_run}")
    assert crashed["state_type"] == "CRASHED" and "took it over" in crashed["state"]["message"]
