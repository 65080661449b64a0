"""Orchestration through a real Prefect server and a process worker: `prefect deploy --all` with the
real prefect.yaml, cancel from Prefect leaving no process behind, a failed flow run retried from
Prefect continuing at the failed stage, and the nightly evaluation of a run's newest checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid

import pytest

from prolong.recipe import load_recipe
from prolong.manifest import read_manifest
from prolong.store import Store
from tests.conftest import FAST, ROOT, prolong_cli, seed
from tests.prefect_helpers import POOL, api, deploy, prefect, tail, wait_for_progress, wait_for_run, worker  # noqa: F401 (fixture)

pytestmark = pytest.mark.slow


def job_pids(pattern: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out if int(p) != os.getpid()]


def test_prefect_deploy_all_creates_the_recipe_8b_and_nightly_deployments(prefect_env):
    prefect("work-pool", "create", POOL, "--type", "process", "--overwrite", env=prefect_env)
    prefect("deploy", "--all", env=prefect_env)
    url = prefect_env["PREFECT_API_URL"]
    tiny = api(url, "/deployments/name/prolong-recipe/tiny")
    assert tiny["parameters"]["recipe"] == "recipes/tiny.yaml" and tiny["work_pool_name"] == POOL

    big = api(url, "/deployments/name/prolong-recipe/prolong-8b")
    recipe = load_recipe(ROOT / big["parameters"]["recipe"], big["parameters"]["overrides"])
    assert recipe.jobs.backend == "slurm" and recipe.jobs.slurm.gpus_per_node == 8
    assert big["parameters"]["store"].startswith("s3://")

    nightly = api(url, "/deployments/name/prolong-eval/nightly")
    assert [s["schedule"]["cron"] for s in nightly["schedules"]] == ["0 2 * * *"]
    assert all(s["active"] for s in nightly["schedules"])
    assert nightly["parameters"]["run_name"] == "prolong-8b"


def test_cancelling_a_flow_run_in_prefect_stops_its_job_and_leaves_no_process(prefect_env, tmp_path, worker,
                                                                              data_stages):
    store = tmp_path / "runs"
    run_name = f"cancel-{uuid.uuid4().hex[:8]}"
    overrides = [*FAST, "stage1.steps=400"]
    data_stages.seed(Store(str(store)), run_name, overrides)  # the flow run goes straight to stage 1
    dep = deploy(prefect_env, tmp_path, "tiny", {"store": str(store), "run_name": run_name,
                                                 "stages": ["data", "stage1"], "overrides": overrides})
    url = prefect_env["PREFECT_API_URL"]
    run = api(url, f"/deployments/{dep['id']}/create_flow_run", {})
    progress = store / run_name / "stage1" / "progress.json"
    wait_for_progress(url, run["id"], progress, worker)
    pattern = f"prolong.jobs.* {store}"
    assert job_pids(pattern), "no job process found while stage 1 runs"

    api(url, f"/flow_runs/{run['id']}/set_state", {"state": {"type": "CANCELLING"}})
    wait_for_run(url, run["id"], ("CANCELLED",), worker, timeout=120)
    deadline = time.monotonic() + 60
    while job_pids(pattern) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not job_pids(pattern), subprocess.run(["ps", "-ef"], capture_output=True, text=True).stdout[-3000:]
    assert read_manifest(Store(str(store)), run_name, "stage1") is None


def test_a_failed_flow_run_retried_from_prefect_resumes_and_nightly_evaluates_the_newest_checkpoint(
        prefect_env, tmp_path, worker, tiny_run):
    store = Store(str(tmp_path / "runs"))
    run_name = f"retry-{uuid.uuid4().hex[:8]}"
    seed(tiny_run, store, run_name)  # data and stage 1 done: the flow run goes straight to stage 2
    dep = deploy(prefect_env, tmp_path, "tiny", {"store": store.url, "run_name": run_name,
                                                 "stages": ["data", "stage1", "stage2"],
                                                 "overrides": [*FAST, "stage2.checkpoint_every=1"]})
    url = prefect_env["PREFECT_API_URL"]
    run = api(url, f"/deployments/{dep['id']}/create_flow_run", {})

    # the node running stage 2 dies after its first checkpoint: the flow run fails
    marker = store.local_path(f"{run_name}/stage2/checkpoints/step_00000001/COMPLETE")
    deadline = time.monotonic() + 600
    while not marker.exists():
        assert time.monotonic() < deadline, f"stage 2 never checkpointed:\n{tail(worker['log'])}"
        assert api(url, f"/flow_runs/{run['id']}")["state_type"] in ("SCHEDULED", "PENDING", "RUNNING")
        time.sleep(0.2)
    launcher = job_pids(f"prolong.jobs.launch .*prolong.jobs.entry stage2 {store.url}")
    assert launcher
    os.killpg(os.getpgid(launcher[0]), signal.SIGKILL)  # no handler runs; ranks die with torchrun
    failed = wait_for_run(url, run["id"], ("FAILED",), worker, timeout=120)
    assert "stage2" in failed["state"]["message"]
    before = {s: read_manifest(store, run_name, s).digest for s in ("data", "stage1")}
    assert read_manifest(store, run_name, "stage2") is None

    # the nightly evaluation finds stage 2's newest checkpoint, exports it and evaluates it once
    only_recall = [x for k in ("helmet", "lm_eval", "perplexity", "passkey", "needle") for x in ("--set", f"eval.{k}=null")]
    first = prolong_cli("evaluate", run_name, "--store", store.url, *only_recall, env=prefect_env, check=True)
    evals = sorted(p.name for p in store.local_path(f"{run_name}/evals").iterdir())
    assert len(evals) == 1 and evals[0].startswith("stage2-step"), (evals, first.stdout[-2000:])
    snap = read_manifest(store, run_name, f"evals/{evals[0]}")
    assert snap is not None and "Recall" in snap.metrics["categories"]
    assert store.exists(f"{run_name}/evals/{evals[0]}/model/hf/model.safetensors")  # the checkpoint, exported
    assert read_manifest(store, run_name, f"evals/{evals[0]}/model").artifacts["hf_model"] == "hf"
    again = prolong_cli("evaluate", run_name, "--store", store.url, *only_recall, env=prefect_env, check=True)
    assert "was already evaluated" in again.stdout
    assert read_manifest(store, run_name, f"evals/{evals[0]}").digest == snap.digest

    # Retry in the UI = the flow run back to Scheduled/AwaitingRetry: it continues at stage 2
    api(url, f"/flow_runs/{run['id']}/set_state",
        {"state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True})
    wait_for_run(url, run["id"], ("COMPLETED",), worker, timeout=600)
    assert {s: read_manifest(store, run_name, s).digest for s in ("data", "stage1")} == before
    assert read_manifest(store, run_name, "stage2").metrics["resumed_from_step"] >= 1
