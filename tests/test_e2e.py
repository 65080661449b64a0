"""End to end: the `prolong` CLI runs the prolong-recipe flow on a real Prefect server, jobs run
under real torchrun, artifacts land in a real store (local folder or S3 API server)."""

import json
import os
import shutil
import signal
import subprocess
import time

import pytest

from prolong.manifest import read_manifest
from prolong.store import Store
from tasks.stages import artifact_key
from tests.conftest import BIN, FAST, ROOT, prolong_cli, seed, sets
from tests.prefect_helpers import api

pytestmark = pytest.mark.slow
# the tiny recipe's graph: the ProLong stages, an evaluation of each training stage, the export
STAGES = ("data", "stage1", "eval_stage1", "stage2", "eval_stage2", "sft", "eval", "export")


def flow_runs(prefect_env, name: str) -> list[dict]:
    runs = api(prefect_env["PREFECT_API_URL"], "/flow_runs/filter", {"flow_runs": {"name": {"any_": [name]}}})
    return sorted(runs, key=lambda r: r["created"])


def manifests(store: Store, run: str) -> dict:
    return {s: m.digest for s in STAGES if (m := read_manifest(store, run, s)) is not None}


def test_tiny_recipe_end_to_end_then_skip_then_from_stage(tiny_run, prefect_env, tmp_path):
    """The session's shared tiny run (conftest.tiny_run: `prolong run recipes/tiny.yaml` with FAST) is
    this test's first run; the second run and --from-stage go to a copy of its store."""
    store, first = tiny_run["store"], tiny_run["out"]
    assert tiny_run["run"] == "e2e"
    done = manifests(store, "e2e")
    assert set(done) == set(STAGES), first.stdout[-3000:]

    # every training stage learned, with its own θ, and hands its weights to the next one
    for stage, theta in (("stage1", 8e6), ("stage2", 1.28e8), ("sft", 1.28e8)):
        m = read_manifest(store, "e2e", stage).metrics
        assert m["loss_last"] < m["loss_first"], (stage, m)
        assert m["rope_theta"] == theta
        config = json.loads((store.local_path(f"e2e/{stage}/hf/config.json")).read_text())
        assert config["rope_parameters"]["rope_theta"] == theta
    assert read_manifest(store, "e2e", "stage2").upstream["stage1"] == done["stage1"]
    assert read_manifest(store, "e2e", "sft").upstream["stage2"] == done["stage2"]
    # each training stage is evaluated by its own eval stage; the run's report puts them side by side
    curves = {s: read_manifest(store, "e2e", s).metrics["position_loss"] for s in ("eval_stage1", "eval_stage2", "eval")}
    assert all(len(c["buckets"]) == 8 and c["documents"] == 4 for c in curves.values()), curves
    report = store.read_text("e2e/report.md")
    assert "stage1 (eval_stage1) | stage2 (eval_stage2) | sft (eval)" in report and "loss, first → last" in report
    # the SFT model shipped: HF float16 with θ for every reader, and llama.cpp's files, read back
    config = json.loads(store.local_path("e2e/export/hf/config.json").read_text())
    assert config["rope_theta"] == 1.28e8 and config["torch_dtype"] == "float16"
    export = read_manifest(store, "e2e", "export")
    assert set(export.artifacts["gguf"]) == {"f16", "q8_0"} and export.upstream["sft"] == done["sft"]
    assert "## Evaluation" in store.read_text("e2e/export/hf/README.md")  # the eval table, in the model card
    results = store.read_json("e2e/eval/results.json")
    assert set(results["categories"]) == {"Recall", "RAG", "Re-rank", "ICL", "Synthetic"}
    assert all(set(c["by_length"]) == {"512", "1024"} for c in results["categories"].values())
    assert "multi_lexsum" in results["unscored"] and results["perplexity"]["documents"] == 2
    assert store.exists("e2e/eval/charts/categories.png") and store.exists("e2e/eval/charts/depth.png")
    assert 0.0 <= results["lm_eval"]["pymodule_mc"]["acc"] <= 1.0

    # the orchestrator saw it: a completed flow run with one task run per stage, and artifacts
    runs = flow_runs(prefect_env, "e2e")
    assert runs and runs[-1]["state_type"] == "COMPLETED"
    tasks = api(prefect_env["PREFECT_API_URL"], "/task_runs/filter",
                {"flow_runs": {"id": {"any_": [runs[-1]["id"]]}}})
    assert sorted(t["name"] for t in tasks) == sorted(STAGES)
    wanted = {"e2e-data", "e2e-eval", "e2e-summary"} | {artifact_key("e2e", s, "progress") for s in STAGES}
    keys = {a["key"] for a in api(prefect_env["PREFECT_API_URL"], "/artifacts/filter",
                                  {"artifacts": {"key": {"any_": sorted(wanted)}}})}
    assert wanted <= keys
    progress = api(prefect_env["PREFECT_API_URL"], "/artifacts/filter",
                   {"artifacts": {"key": {"any_": ["e2e-data-progress", "e2e-eval-progress"]}}})
    assert [a["data"] for a in progress] == [100.0, 100.0] and all(a["type"] == "progress" for a in progress)
    # every job, not only training, reports how far it got in units of its own
    for stage, unit in (("data", "domains"), ("stage1", "steps"), ("eval", "parts")):
        p = store.read_json(f"e2e/{stage}/progress.json")
        assert (p["state"], p["unit"], p["percent"], p["done"]) == ("finished", unit, 100.0, p["total"]), p
    assert "domains" in first.stdout + first.stderr and "parts" in first.stdout + first.stderr
    data_md = api(prefect_env["PREFECT_API_URL"], "/artifacts/filter", {"artifacts": {"key": {"any_": ["e2e-data"]}}})
    assert "Table 14" in data_md[0]["data"] and "| code_repos | long |" in data_md[0]["data"]
    table = api(prefect_env["PREFECT_API_URL"], "/artifacts/filter", {"artifacts": {"key": {"any_": ["e2e-eval"]}}})
    assert "| Recall |" in table[0]["data"] and "| RAG |" in table[0]["data"] and "pymodule_mc" in table[0]["data"]

    # a second run of the same run name skips every stage: nothing is rewritten
    shutil.copytree(store.local_path(), tmp_path / "runs")
    store = Store(str(tmp_path / "runs"))
    args = ["run", "recipes/tiny.yaml", "--store", store.url, "--run-name", "e2e", *sets(FAST)]
    again = prolong_cli(*args, env=prefect_env, check=True)
    assert manifests(store, "e2e") == done
    assert again.stdout.count("skipped") + again.stderr.count("skipped") >= len(STAGES)

    # --from-stage re-runs that stage and every later one, and nothing before it
    forced = prolong_cli(*args, "--from-stage", "sft", env=prefect_env, check=True)
    after = manifests(store, "e2e")
    assert {s for s in STAGES if after[s] != done[s]} == {"sft", "eval", "export"}, forced.stderr[-2000:]


def _job_pid(stage: str, store_url: str) -> int | None:
    out = subprocess.run(["pgrep", "-f", f"prolong.jobs.launch .*prolong.jobs.entry {stage} {store_url}"],
                         capture_output=True, text=True).stdout.split()
    return int(out[0]) if out else None


def test_a_run_that_dies_in_stage2_continues_at_stage2_from_its_checkpoint(tiny_run, prefect_env, tmp_path):
    store = Store(str(tmp_path / "runs"))
    seed(tiny_run, store, "crash")  # data and stage 1 done: this run goes straight to stage 2
    args = ["run", "recipes/tiny.yaml", "--store", store.url, "--run-name", "crash", "--stages", "data,stage1,stage2",
            *sets(FAST), "--set", "stage2.checkpoint_every=1"]
    proc = subprocess.Popen([str(BIN / "prolong"), *args], cwd=ROOT, env={**os.environ, **prefect_env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    marker = store.local_path("crash/stage2/checkpoints/step_00000001/COMPLETE")
    deadline = time.monotonic() + 600
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "stage 2 never checkpointed"
    pid = _job_pid("stage2", store.url)
    assert pid is not None
    os.killpg(os.getpgid(pid), signal.SIGKILL)  # the node died: no chance to clean up
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 5, (out[-2000:], err[-2000:])
    assert "error: stage2: job local-" in err and "\n" not in err.strip().splitlines()[-1]
    before = manifests(store, "crash")
    assert set(before) == {"data", "stage1"}
    assert flow_runs(prefect_env, "crash")[-1]["state_type"] == "FAILED"

    prolong_cli(*args, env=prefect_env, check=True)
    after = manifests(store, "crash")
    assert after["data"] == before["data"] and after["stage1"] == before["stage1"]  # not re-run
    m = read_manifest(store, "crash", "stage2").metrics
    assert m["resumed_from_step"] >= 1 and m["steps"] == 4
    lines = [json.loads(x) for x in store.read_text("crash/stage2/metrics.jsonl").splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 5))  # one line per step across both attempts
    assert flow_runs(prefect_env, "crash")[-1]["state_type"] == "COMPLETED"


def test_recipe_runs_against_an_s3_store(prefect_env, s3_store):
    """Data to MDS shards in S3, training streams them back and writes weights to S3."""
    args = ["run", "recipes/tiny.yaml", "--store", s3_store, "--run-name", "s3run", "--stages", "data,stage1",
            *sets(FAST)]
    prolong_cli(*args, env=prefect_env, check=True)
    store = Store(s3_store)
    assert set(manifests(store, "s3run")) == {"data", "stage1"}
    m = read_manifest(store, "s3run", "stage1")
    assert m.metrics["loss_last"] < m.metrics["loss_first"]
    assert store.exists("s3run/stage1/hf/model.safetensors")
    assert any(o["path"].startswith("checkpoints/") for o in m.outputs)
    shards = [o for o in read_manifest(store, "s3run", "data").outputs if o["path"].endswith(".mds.zstd")]
    assert shards and all(store.exists(f"s3run/data/{o['path']}") for o in shards)


def test_bad_input_fails_in_one_line_and_writes_nothing(prefect_env, tmp_path):
    store = tmp_path / "runs"
    bad = prolong_cli("run", "recipes/tiny.yaml", "--store", str(store), "--set", "stage1.lr=0", env=prefect_env)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: stage1.lr: Input should be greater than 0"
    assert not store.exists()
    missing = tmp_path / "nothing.jsonl"
    bad = prolong_cli("run", "recipes/tiny.yaml", "--store", str(store), "--run-name", "bad", "--stages", "data",
                      "--set", f"data.domains.shortmix.source.path={missing}", env=prefect_env)
    assert bad.returncode == 4  # found before the data job starts: the data error's own code
    last = bad.stderr.strip().splitlines()[-1]
    assert last == f"error: data.domains.shortmix.source.path: {missing} does not exist"
    assert not (store / "bad" / "data" / "manifest.json").exists()
    assert not list((store / "bad" / "data").glob("streams/*"))
