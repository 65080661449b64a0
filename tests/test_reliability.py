"""Reliability, case by case: nothing outside the store, nothing lost to bad input, nothing trained
on corrupt data, one run per run name, damaged outputs named with a way forward, one-line errors.

Most tests start from one finished run (data + stage 1 of the tiny recipe: those of the session's
shared tiny run) copied into their own store. Faults of the machine and its services (kills, full
disks, servers stopped) are in test_faults.py."""

from __future__ import annotations

import json
import re
import os
import shutil
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from prolong import layout
from prolong.recipe import load_recipe
from prolong.errors import ConfigError, DataError, JobError, RunBusyError, StoreError
from prolong.fingerprint import tokenizer_fingerprint
from prolong.jobs import JobState
from prolong.lease import Lease, read_lease
from prolong.manifest import DamagedManifest, read_manifest
from prolong.pipeline import RunContext, job_spec, publish_recipe, run_stage, status_table
from prolong.preflight import check_run
from prolong.store import Store
from tests.conftest import FAST, ROOT, prolong_cli, seed, sets

pytestmark = pytest.mark.slow
RUN = "r"
TRAIN = [o for o in FAST if o.startswith(("stage1", "stage2", "sft"))]


def context(store: Store, overrides=(), run: str = RUN) -> RunContext:
    ctx = RunContext(recipe=load_recipe(ROOT / "recipes" / "tiny.yaml", [*TRAIN, *overrides]), store=store, run=run)
    publish_recipe(ctx)
    return ctx


@pytest.fixture(scope="module")
def golden(tiny_run, tmp_path_factory) -> Path:
    """A store holding run "r" with data and stage 1 done."""
    root = tmp_path_factory.mktemp("golden") / "runs"
    context(Store(str(root)))
    seed(tiny_run, Store(str(root)), RUN)
    return root


@pytest.fixture
def store(golden, tmp_path) -> Store:
    shutil.copytree(golden, tmp_path / "runs")
    return Store(str(tmp_path / "runs"))


def files(store: Store, run: str = RUN) -> dict[str, bytes]:
    """Every file of the run's finished stages (their manifests and outputs), by path."""
    out = {}
    for stage in ("data", "stage1"):
        prefix = layout.stage_prefix(run, stage)
        for sub in store.walk_files(prefix):
            if not sub.startswith(("logs/", "job.json", "progress.json")):
                out[f"{stage}/{sub}"] = store.read_bytes(f"{prefix}/{sub}")
    return out


def one_line_error(proc, code: int, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert lines and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    for needle in needles:
        assert needle in lines[-1], (needle, lines[-1])
    return lines[-1]


# ---------------------------------------------------------------- 1. path traversal


def test_run_names_that_leave_the_store_are_refused_before_anything_is_touched(tmp_path, prefect_env):
    beside = tmp_path / "beside.txt"
    beside.write_text("a user's file next to the store")
    store = tmp_path / "store"
    for args in (["--run-name", ".."], ["--run-name", "../escaped"], ["--run-name", "a/b"], ["--set", "name=.."]):
        p = prolong_cli("run", "recipes/tiny.yaml", "--store", str(store), *args, "--from-stage", "data",
                        env=prefect_env)
        one_line_error(p, 2, "is not a valid")
    for cmd in (["status", ".."], ["doctor", "../x"], ["evaluate", ".."]):
        one_line_error(prolong_cli(*cmd, "--store", str(store), env=prefect_env), 2, "is not a valid name")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("tmp", "prefect-client")) == ["beside.txt"]
    assert beside.read_text() == "a user's file next to the store"
    # the one check every path goes through: library callers and Prefect parameters meet it too
    with pytest.raises(ConfigError, match="is not a valid name"):
        RunContext(recipe=load_recipe(ROOT / "recipes" / "tiny.yaml"), store=Store(str(store)), run="..")
    with pytest.raises(ConfigError):
        layout.stage_prefix("../x", "data")


def test_a_prefect_parameter_run_name_is_checked_by_the_flow_itself(tmp_path, prefect_env, monkeypatch):
    for key, value in prefect_env.items():
        monkeypatch.setenv(key, value)
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.recipe import prolong_recipe

    # the running test server, also when an earlier test imported prefect's settings without it
    # (prefect would otherwise start an ephemeral server, slow to come up on a loaded machine)
    with temporary_settings(updates={PREFECT_API_URL: prefect_env["PREFECT_API_URL"]}), \
            pytest.raises(ConfigError, match="run_name: '../up' is not a valid name"):
        prolong_recipe(recipe="recipes/tiny.yaml", run_name="../up", store=str(tmp_path / "store"))
    assert not (tmp_path / "store").exists() and not (tmp_path / "up").exists()


# ---------------------------------------------------------------- 2. bad input keeps finished outputs


@pytest.mark.parametrize("override, code, says", [
    ("data.domains.shortmix.source.path=/nonexistent/short.jsonl", 4, "/nonexistent/short.jsonl does not exist"),
    ("model.path=/nonexistent/model", 2, "model.path: /nonexistent/model does not exist"),
    ("stage1.sequence_parallel=2", 2, "stage1.sequence_parallel: 2 does not divide the 1 ranks"),
    ("model.attention=flash", 2, "model.attention: flash runs on GPUs only"),
    # found only by the job (its documents): the data stage's earlier outputs are put back
    ("data.domains.books.max_documents=1", 4, "too few for one sample"),
])
def test_bad_input_fails_in_one_line_and_keeps_the_finished_stages(store, prefect_env, override, code, says):
    before = files(store)
    p = prolong_cli("run", "recipes/tiny.yaml", "--store", store.url, "--run-name", RUN, "--stages", "data,stage1",
                    *sets([*TRAIN, override]), env=prefect_env)
    one_line_error(p, code, says)
    assert files(store) == before
    assert not store.exists(layout.previous_prefix(RUN, "data"))


def test_a_rank_count_that_does_not_fit_stage2_fails_before_data_and_stage1_run(tmp_path, prefect_env):
    store = Store(str(tmp_path / "runs"))
    p = prolong_cli("run", "recipes/tiny.yaml", "--store", store.url, "--run-name", "sp",
                    "--stages", "data,stage1,stage2", *sets([*TRAIN, "stage2.sequence_parallel=2"]), env=prefect_env)
    one_line_error(p, 2, "stage2.sequence_parallel: 2 does not divide the 1 ranks")
    assert read_manifest(store, "sp", "data") is None and not store.exists("sp/data")


# ---------------------------------------------------------------- 3. corrupt data is never trained on


def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("compression", ["zstd", None])
def test_a_damaged_shard_stops_training_before_the_first_step_and_names_the_shard(tmp_path, golden, compression):
    if compression == "zstd":
        shutil.copytree(golden, tmp_path / "runs")
        ctx = context(Store(str(tmp_path / "runs")))
    else:
        ctx = context(Store(str(tmp_path / "runs")), ["data.compression=null"])
        run_stage(ctx, "data")
    shard = sorted(ctx.store.local_path(f"{RUN}/data/streams/L512/books@512").glob("shard.*"))[0]
    flip_a_byte(shard)
    with pytest.raises(JobError) as err:
        run_stage(ctx, "stage1", force=True)
    assert err.value.exit_code == DataError.exit_code
    assert f"streams/L512/books@512/{shard.name}" in str(err.value) and "--from-stage data" in str(err.value)
    job_log = Path(str(err.value).rsplit("[log: ", 1)[1].rstrip("]")).read_text()
    assert "step 1/" not in job_log  # not one step trained


def test_a_shard_damaged_in_an_s3_store_is_named_when_fetched_and_never_trained_on(s3_store, data_stages):
    ctx = context(Store(s3_store))
    data_stages.seed(ctx.store, RUN, TRAIN)  # a finished data stage in the bucket
    rel = next(f"{RUN}/data/streams/L512/books@512/{f}" for f in ctx.store.walk_files(f"{RUN}/data/streams/L512/books@512")
               if f.startswith("shard."))
    data = bytearray(ctx.store.read_bytes(rel))
    data[len(data) // 2] ^= 0xFF  # same size: only the content check can tell
    ctx.store.write_bytes_atomic(rel, bytes(data))
    with pytest.raises(JobError) as err:
        run_stage(ctx, "stage1")
    assert err.value.exit_code == DataError.exit_code
    assert rel.rsplit("/", 1)[1] in str(err.value) and "checksum" in str(err.value)
    assert read_manifest(ctx.store, RUN, "stage1") is None


def test_a_manifest_edited_by_hand_is_refused_and_from_stage_rebuilds_it(store):
    path = store.local_path(f"{RUN}/data/manifest.json")
    m = json.loads(path.read_text())
    m["metrics"]["samples"] += 1
    path.write_text(json.dumps(m))
    ctx = context(store)
    with pytest.raises(DamagedManifest, match="does not match its seal.*--from-stage data"):
        read_manifest(store, RUN, "data")
    with pytest.raises(StoreError, match="--from-stage data"):
        check_run(ctx, ["data", "stage1"], forced=set())
    assert check_run(ctx, ["data", "stage1"], forced={"data", "stage1"}) == ["data", "stage1"]


# ---------------------------------------------------------------- 4. one run per run name


@pytest.mark.parametrize("kind", ["local", "s3"])
def test_a_run_lease_refuses_a_second_run_and_is_taken_over_when_its_owner_is_gone(kind, tmp_path, request):
    st = Store(str(tmp_path / "runs")) if kind == "local" else Store(request.getfixturevalue("s3_store"))
    rel = layout.lease("busy")
    with Lease(st, rel, owner="first run") as first:
        with pytest.raises(RunBusyError, match="in use by first run"):
            Lease(st, rel, owner="second run").acquire()
        first.renew(stage="stage1")
        assert read_lease(st, rel)["stage"] == "stage1"
    assert read_lease(st, rel) is None  # released

    # a dead owner on this host, and one on another host that stopped beating: both are taken over
    for record in ({"host": socket.gethostname(), "pid": 2 ** 22 + 7, "pid_start": "1"},
                   {"host": "elsewhere", "pid": 1, "heartbeat_at": "2020-01-01T00:00:00+00:00", "ttl_s": 60}):
        st.write_json_atomic(rel, {"token": "old", "owner": "a dead run", "flow_run_id": "f-1", **record})
        taker = Lease(st, rel, owner="next run")
        assert taker.acquire()["owner"] == "a dead run"
        taker.release()
    # another host that still beats holds it
    st.write_json_atomic(rel, {"token": "live", "owner": "a run elsewhere", "host": "elsewhere", "pid": 1,
                               "heartbeat_at": read_lease_now(), "ttl_s": 600})
    with pytest.raises(RunBusyError, match="a run elsewhere"):
        Lease(st, rel, owner="me").acquire()

    # of two runs racing for a stale lease, exactly one wins
    st.write_json_atomic(rel, {"token": "old", "owner": "gone", "host": "elsewhere", "pid": 1,
                               "heartbeat_at": "2020-01-01T00:00:00+00:00", "ttl_s": 60})
    results = []

    def race(name):
        try:
            Lease(st, rel, owner=name).acquire()
            results.append(name)
        except RunBusyError:
            pass

    threads = [threading.Thread(target=race, args=(f"racer{i}",)) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert len(results) == 1 and read_lease(st, rel)["owner"] == results[0]


def read_lease_now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def test_a_second_run_of_a_busy_run_name_is_refused_in_one_line(store, prefect_env):
    with Lease(store, layout.lease(RUN), owner="flow run busy-one (abc)"):
        p = prolong_cli("run", "recipes/tiny.yaml", "--store", store.url, "--run-name", RUN,
                        "--stages", "data,stage1", *sets(TRAIN), env=prefect_env)
    one_line_error(p, RunBusyError.exit_code, "is in use by flow run busy-one (abc)", f"pid {os.getpid()}")


# ---------------------------------------------------------------- 5. damaged outputs, and the way forward


def test_a_truncated_final_checkpoint_is_named_before_stage2_runs_and_by_doctor(store, prefect_env):
    shard = sorted(store.local_path(f"{RUN}/stage1/checkpoints").glob("step_*/dcp/*.distcp"))[-1]
    os.truncate(shard, 100)
    p = prolong_cli("run", "recipes/tiny.yaml", "--store", store.url, "--run-name", RUN,
                    "--stages", "data,stage1,stage2", *sets(TRAIN), env=prefect_env)
    one_line_error(p, StoreError.exit_code, shard.name, "is 100 bytes", "--from-stage stage1")
    assert not store.exists(f"{RUN}/stage2")
    doctor = prolong_cli("doctor", RUN, "--store", store.url)
    assert doctor.returncode == StoreError.exit_code
    assert re.search(r"^  stage1 +damaged$", doctor.stdout, re.M) and shard.name in doctor.stdout
    assert f"fix: prolong run RECIPE --run-name {RUN} --from-stage stage1" in doctor.stdout
    assert re.search(r"^  data +ok ", doctor.stdout, re.M)


def test_a_truncated_newest_checkpoint_of_an_unfinished_stage_falls_back_to_the_one_before(tmp_path, golden):
    shutil.copytree(golden, tmp_path / "runs")
    ctx = context(Store(str(tmp_path / "runs")), ["stage1.checkpoint_every=2"])
    ctx.store.delete(f"{RUN}/stage1")  # stage 1 anew, its job started directly and killed
    job = ctx.backend.submit(job_spec(ctx, "stage1", "first"))
    marker = ctx.store.local_path(f"{RUN}/stage1/checkpoints/step_00000004/COMPLETE")
    deadline = time.monotonic() + 300
    while not marker.exists() and job.poll() == JobState.RUNNING and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(job.proc.pid, signal.SIGKILL)
    job.wait()
    assert marker.exists(), job.tail()
    shard = sorted(marker.parent.glob("dcp/*.distcp"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    result = run_stage(ctx, "stage1")
    assert result.manifest.metrics["resumed_from_step"] == 2
    assert result.manifest.metrics["steps"] == 6


def test_doctor_finds_a_bit_flip_that_sizes_cannot(store):
    flip_a_byte(store.local_path(f"{RUN}/stage1/hf/model.safetensors"))
    quick = prolong_cli("doctor", RUN, "--store", store.url, "--sizes-only")
    assert quick.returncode == 0, quick.stdout
    full = prolong_cli("doctor", RUN, "--store", store.url, "--json")
    report = json.loads(full.stdout)
    assert full.returncode == StoreError.exit_code and not report["healthy"]
    stage1 = next(s for s in report["stages"] if s["stage"] == "stage1")
    assert stage1["fix"] == "--from-stage stage1" and "hf/model.safetensors differs" in stage1["problems"][0]


def test_a_corrupt_manifest_names_the_fix_and_from_stage_rebuilds_the_stage(store, prefect_env):
    store.local_path(f"{RUN}/data/manifest.json").write_text("{not json")
    args = ["run", "recipes/tiny.yaml", "--store", store.url, "--run-name", RUN, "--stages", "data,stage1",
            *sets(TRAIN)]
    one_line_error(prolong_cli(*args, env=prefect_env), StoreError.exit_code, "not a valid manifest",
                   "--from-stage data")
    rebuilt = prolong_cli(*args, "--from-stage", "data", env=prefect_env)
    assert rebuilt.returncode == 0, rebuilt.stderr[-3000:]
    assert read_manifest(store, RUN, "data") is not None and read_manifest(store, RUN, "stage1") is not None


# ---------------------------------------------------------------- 7. messages that say something


def test_errors_of_overrides_and_stores_are_one_line(tmp_path, prefect_env, s3_server, monkeypatch):
    one_line_error(prolong_cli("run", "recipes/tiny.yaml", "--set", "a={b: [1", env=prefect_env), 2,
                   "--set a: '{b: [1' is not a valid YAML value")
    env = {**prefect_env, "S3_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}
    p = prolong_cli("run", "recipes/tiny.yaml", "--store", "s3://no-such-bucket-here/runs", "--stages", "data",
                    env=env)
    one_line_error(p, StoreError.exit_code, "s3://no-such-bucket-here/runs", "bucket does not exist")


# ---------------------------------------------------------------- 8. what a stage reads, by content


def test_a_tokenizer_or_model_config_edited_in_place_changes_the_digests(tmp_path, tiny_model_dir):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", [f"model.path={model}", f"model.tokenizer={model}"])
    def config_digest(recipe, stage):
        return recipe.stage(stage).config_digest()

    data, stage1, stage2 = (config_digest(recipe, s) for s in ("data", "stage1", "stage2"))
    before = tokenizer_fingerprint(str(model))
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["model_max_length"] = 1234  # same path, other contents
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenizer_fingerprint(str(model)) != before
    assert config_digest(recipe, "data") != data
    cfg = json.loads((model / "config.json").read_text())
    cfg["rms_norm_eps"] = 1e-5
    (model / "config.json").write_text(json.dumps(cfg))
    assert config_digest(recipe, "stage1") != stage1
    assert config_digest(recipe, "stage2") == stage2  # it reads stage 1's outputs, not the model folder


# ---------------------------------------------------------------- 9. status of an interrupted run


def test_status_says_interrupted_when_no_run_holds_the_lease(store):
    recipe = context(store).recipe
    store.write_json_atomic(f"{RUN}/stage2/progress.json", {"stage": "stage2", "state": "running", "done": 4,
                                                            "total": 10, "unit": "steps", "percent": 40.0, "eta_s": 2})
    assert {r["stage"]: r["state"] for r in status_table(store, RUN, recipe)}["stage2"] == "interrupted"
    with Lease(store, layout.lease(RUN), owner="a live run") as lease:
        lease.renew(stage="stage2")
        assert {r["stage"]: r["state"] for r in status_table(store, RUN, recipe)}["stage2"] == "running"
    out = prolong_cli("status", RUN, "--store", store.url, check=True).stdout
    assert "interrupted" in out and "`prolong run` resumes it" in out
