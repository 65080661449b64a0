"""The `prolong` console script: validate, status, and one-line errors with exit codes."""

from prolong.recipe import load_recipe
from prolong.manifest import StageRecorder
from prolong.pipeline import RunContext, publish_recipe
from prolong.store import Store
from tests.conftest import ROOT, prolong_cli


def test_validate_lists_stage_digests():
    out = prolong_cli("validate", "recipes/tiny.yaml", check=True).stdout
    assert "valid recipe 'tiny'" in out and all(s in out for s in ("data", "stage1", "stage2", "sft", "eval"))
    assert prolong_cli("validate", "recipes/prolong-8b.yaml").returncode == 0


def test_validate_reports_a_bad_field_in_one_line():
    p = prolong_cli("validate", "recipes/tiny.yaml", "--set", "stage2.rope_theta=-5")
    assert p.returncode == 2
    assert p.stderr.strip() == "error: stage2.rope_theta: Input should be greater than 0"


def test_run_rejects_unknown_stages_before_starting_anything(tmp_path):
    p = prolong_cli("run", "recipes/tiny.yaml", "--store", str(tmp_path / "runs"), "--stages", "data,stage9")
    assert p.returncode == 2
    assert p.stderr.strip() == "error: stages: unknown stage 'stage9' (stages: data, stage1, eval_stage1, stage2, eval_stage2, sft, eval, export)"
    assert not (tmp_path / "runs").exists()


def test_status_of_a_run(tmp_path):
    store = Store(str(tmp_path / "runs"))
    missing = prolong_cli("status", "nope", "--store", store.url)
    assert missing.returncode == 5 and "run 'nope': not found" in missing.stderr
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml")
    publish_recipe(RunContext(recipe=recipe, store=store, run="r"))
    StageRecorder(store, "r", recipe, "data").finish(metrics={"samples": 3, "tokens": 1536, "streams": {"a": {}}})
    out = prolong_cli("status", "r", "--store", store.url, check=True).stdout
    lines = {line.split()[0]: line for line in out.splitlines()[1:]}
    assert "done" in lines["data"] and "3 samples" in lines["data"]
    assert all("pending" in lines[s] for s in ("stage1", "stage2", "sft", "eval"))
    as_json = prolong_cli("status", "r", "--store", store.url, "--json", check=True).stdout
    assert '"state": "done"' in as_json


def test_run_with_an_unreachable_prefect_server_fails_in_one_line(tmp_path):
    p = prolong_cli("run", "recipes/tiny.yaml", "--store", str(tmp_path / "runs"),
                    env={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: PREFECT_API_URL: no Prefect server answers at http://127.0.0.1:9/api")
    assert not (tmp_path / "runs").exists()
