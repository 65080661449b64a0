"""Prefect helpers shared by the UI and orchestration tests: the REST API, the `prefect` CLI, a
process worker of the `prolong-local` pool, and the real prefect.yaml's deployments deployed with
test parameters."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from tests.conftest import BIN, FAST, ROOT, stop

POOL = "prolong-local"


# what Prefect's own client retries: the server answers 503 while its SQLite database is busy, which
# happens on two loaded cores whenever a worker, a flow run and a test write at once
RETRIED = {408, 429, 502, 503}


def api(url: str, path: str, body: dict | None = None, method: str | None = None, tries: int = 6):
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(tries):
        req = urllib.request.Request(f"{url}{path}", data=data, method=method or ("GET" if body is None else "POST"),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                raw = r.read()
            return json.loads(raw) if raw else None
        except urllib.error.HTTPError as e:
            if e.code not in RETRIED or attempt == tries - 1:
                raise
            time.sleep(min(2 ** attempt, 10))


def run_logs(url: str, flow_run_id: str, limit: int = 200) -> str:
    logs = api(url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC",
                                     "limit": limit})
    return "\n".join(f"{x['timestamp']} {x['level']} {x['message']}" for x in logs)


def tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} missing)"


def prefect(*args: str, env: dict, timeout: float = 180) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(BIN / "prefect"), "--no-prompt", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise AssertionError(f"prefect {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def stop_tree(proc: subprocess.Popen) -> None:
    """Stop the worker's process group, then any flow-run process it started outside that group."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    # `prefect worker` (3.8) turns SIGTERM into a SIGINT it often does not act on (an idle one was
    # still running 30 s later; the suite's worker teardowns took the full 15 s): a moment, then SIGKILL
    stop(proc, grace_s=2)
    for child in children:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)



def deploy(prefect_env: dict, tmp_path: Path, name: str, parameters: dict) -> dict:
    """Deploy prefect.yaml's deployment `name` with `parameters` merged over its own."""
    prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=prefect_env)
    project = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    dep = copy.deepcopy(next(d for d in project["deployments"] if d["name"] == name))
    assert dep["work_pool"]["name"] == POOL
    dep["parameters"] = {**dep["parameters"], **parameters}
    dep.pop("schedules", None)  # tests trigger runs themselves
    project["deployments"] = [dep]
    prefect_file = tmp_path / f"prefect-{name}.yaml"
    prefect_file.write_text(yaml.safe_dump(project, sort_keys=False))
    prefect("deploy", "--prefect-file", str(prefect_file), "--name", name, env=prefect_env)
    flow = dep["entrypoint"].split(":")[1].replace("_", "-")
    return api(prefect_env["PREFECT_API_URL"], f"/deployments/name/{flow}/{name}")


def wait_for_run(api_url: str, run_id: str, states: tuple[str, ...], worker: dict, timeout: float = 600) -> dict:
    """Poll a flow run until it reaches one of `states`; fail with its logs on any other final state."""
    deadline = time.monotonic() + timeout
    while True:
        run = api(api_url, f"/flow_runs/{run_id}")
        state = run["state_type"]
        if state in states:
            return run
        if state in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            raise AssertionError(f"flow run {run['name']} ended {state}: {run['state']['message']}\n"
                                 f"--- flow run logs\n{run_logs(api_url, run_id)[-8000:]}\n"
                                 f"--- worker log\n{tail(worker['log'])}")
        if worker["proc"].poll() is not None:
            raise AssertionError(f"the worker exited with {worker['proc'].returncode}:\n{tail(worker['log'])}")
        if time.monotonic() > deadline:
            raise AssertionError(f"flow run {run['name']} still {state} after {timeout:.0f}s\n"
                                 f"--- flow run logs\n{run_logs(api_url, run_id)[-8000:]}\n"
                                 f"--- worker log\n{tail(worker['log'])}")
        time.sleep(1)


def wait_for_progress(api_url: str, run_id: str, progress: Path, worker: dict, timeout: float = 300) -> None:
    """Wait until a flow run's stage has written `progress` (its job is running), the run still live."""
    deadline = time.monotonic() + timeout
    while not progress.exists():
        assert time.monotonic() < deadline, f"{progress} never appeared:\n{tail(worker['log'])}"
        assert api(api_url, f"/flow_runs/{run_id}")["state_type"] in ("SCHEDULED", "PENDING", "RUNNING")
        time.sleep(0.5)


@pytest.fixture
def tiny_deployment(prefect_env, tmp_path, data_stages) -> dict:
    """The real prefect.yaml's `tiny` deployment, made fast: data and stage 1 of the tiny recipe, the
    data stage done already (a copy), so the run's job is stage 1's."""
    from prolong.store import Store

    store, run_name = tmp_path / "runs", f"ui-{uuid.uuid4().hex[:8]}"
    data_stages.seed(Store(str(store)), run_name, FAST)
    dep = deploy(prefect_env, tmp_path, "tiny", {"recipe": "recipes/tiny.yaml", "store": str(store),
                                                 "run_name": run_name, "stages": ["data", "stage1"],
                                                 "overrides": FAST})
    assert dep["parameters"]["run_name"] == run_name and dep["work_pool_name"] == POOL
    return {"id": dep["id"], "store": store, "run_name": run_name, "stages": ["data", "stage1"]}


@pytest.fixture
def worker(prefect_env, tmp_path):
    """`prefect worker start --pool prolong-local` from the repository root, as prefect.yaml says."""
    log_path = tmp_path / "worker.log"
    log = open(log_path, "w")
    env = {**os.environ, **prefect_env, "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "2"}
    proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", POOL], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield {"proc": proc, "log": log_path}
    finally:
        stop_tree(proc)
        log.close()


