"""Artifact store and manifests, on a local folder and on a real S3 API server (moto) on 127.0.0.1."""

import hashlib
import json
import os

import pytest

from prolong.recipe import load_recipe
from prolong.errors import StageError, StoreError
from prolong.layout import MANIFEST
from prolong.manifest import StageRecorder, read_manifest, stage_state
from prolong.store import Store, open_store
from tests.conftest import ROOT


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return Store(str(tmp_path / "runs"))
    return Store(request.getfixturevalue("s3_store"))


def test_roundtrip_and_listing(store, tmp_path):
    store.write_json_atomic("r/a/x.json", {"k": [1, 2]})
    assert store.read_json("r/a/x.json") == {"k": [1, 2]}
    assert store.exists("r/a/x.json") and store.is_file("r/a/x.json") and not store.exists("r/a/y.json")
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "one.bin").write_bytes(b"1" * 1000)
    (src / "sub" / "two.txt").write_text("two")
    entries = store.put_dir(src, "r/out")
    assert [(e.path, e.bytes) for e in entries] == [("one.bin", 1000), ("sub/two.txt", 3)]
    assert entries[0].sha256 == hashlib.sha256(b"1" * 1000).hexdigest()
    assert sorted(store.walk_files("r/out")) == ["one.bin", "sub/two.txt"]
    assert store.list("r") == ["a", "out"]
    back = store.get_dir("r/out", tmp_path / "back")
    assert (back / "sub" / "two.txt").read_text() == "two"
    store.delete("r/out")
    assert not store.exists("r/out/one.bin")
    with pytest.raises(StoreError, match="not found"):
        store.read_bytes("r/missing.json")


def test_atomic_json_write_leaves_no_partial_file(tmp_path):
    store = Store(str(tmp_path / "store"))
    store.write_json_atomic("m.json", {"v": 1})
    store.write_json_atomic("m.json", {"v": 2})
    assert store.read_json("m.json") == {"v": 2}
    assert os.listdir(tmp_path / "store") == ["m.json"]  # no temporary files left behind


def test_s3_credentials_come_from_the_environment(s3_store):
    store = open_store(s3_store)
    assert store.url.startswith("s3://") and "test" not in repr(store).replace("/test-", "/")
    assert store.fs.client_kwargs["endpoint_url"] == os.environ["S3_ENDPOINT_URL"]


def test_unreachable_s3_endpoint_is_a_one_line_store_error(monkeypatch):
    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    store = Store("s3://nowhere/runs")
    store.fs.retries = 1
    with pytest.raises(StoreError) as err:
        store.write_json_atomic("a.json", {})
    assert "s3://nowhere/runs/a.json" in str(err.value) and "\n" not in str(err.value)


def test_manifest_records_lineage_and_is_written_last(store, tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    with pytest.raises(StageError, match="upstream stage data of run 'r' is not done"):
        StageRecorder(store, "r", recipe, "stage1")
    rec = StageRecorder(store, "r", recipe, "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / "shard.bin").write_bytes(b"abc")
    rec.put_dir(out, "streams/x")
    rec.write_json("report.json", {"docs": 3})
    assert stage_state(store, "r", recipe, "data") == ("pending", None)  # outputs alone are not "done"
    m = rec.finish(metrics={"tokens": 3}, artifacts={"streams": {"x": "streams/x"}})
    raw = store.read_bytes(f"r/data/{MANIFEST}")
    assert m.digest == hashlib.sha256(raw).hexdigest()
    data = json.loads(raw)
    assert data["stage"] == "data" and data["run"] == "r" and data["upstream"] == {}
    assert {o["path"] for o in data["outputs"]} == {"streams/x/shard.bin", "report.json"}
    assert next(o for o in data["outputs"] if o["path"] == "streams/x/shard.bin")["sha256"] == hashlib.sha256(b"abc").hexdigest()
    for key in ("config_digest", "input_key", "code_version", "packages", "started_at", "finished_at", "config"):
        assert data[key], key
    assert "torch" in data["packages"] and data["metrics"] == {"tokens": 3}
    assert read_manifest(store, "r", "data").digest == m.digest
    state, _ = stage_state(store, "r", recipe, "data")
    assert state == "done"
    # a different config makes the same manifest stale
    assert stage_state(store, "r", load_recipe(ROOT / "recipes" / "tiny.yaml", ["data.seed=7"]), "data")[0] == "stale"
    # downstream lineage: stage1's recorder pins the data manifest's digest
    assert StageRecorder(store, "r", recipe, "stage1").upstream == {"data": m.digest}


def test_corrupt_manifest_is_reported_with_its_path(tmp_path):
    store = Store(str(tmp_path))
    store.write_bytes_atomic("r/data/manifest.json", b"{not json")
    with pytest.raises(StoreError, match=r"r/data/manifest.json: not a valid manifest"):
        read_manifest(store, "r", "data")
