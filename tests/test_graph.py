"""Recipes as stage graphs: a custom graph (no stage 2) end to end, a stage kind defined in one
class outside the library, and bad graphs as one-line errors before anything runs."""

from __future__ import annotations

import json

import pytest
import yaml

from prolong.errors import ConfigError
from prolong.manifest import read_manifest
from prolong.recipe import load_recipe, recipe_from_dict
from prolong.store import Store
from tests.conftest import FAST, ROOT, prolong_cli

TINY = ROOT / "recipes" / "tiny.yaml"


def graph_recipe(tmp_path, keep: list[str], extra: dict | None = None) -> str:
    """The tiny recipe cut to the stages ``keep`` (+ ``extra``), as an explicit `stages:` file."""
    raw = yaml.safe_load(TINY.read_text())
    raw["stages"] = {name: cfg for name, cfg in raw["stages"].items() if name in keep}
    raw["stages"].update(extra or {})
    path = tmp_path / "graph.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return str(path)


@pytest.mark.slow
def test_a_custom_graph_without_stage2_runs_end_to_end_with_a_stage_kind_of_its_own(tmp_path, prefect_env):
    recipe = graph_recipe(tmp_path, ["data", "stage1", "sft", "eval"],
                          {"stage1_summary": {"kind": "summary", "of": "stage1"}})
    # a plugin module: importable by the CLI and by its jobs (PYTHONPATH), registered by name
    env = {**prefect_env, "PROLONG_STAGE_KINDS": "tests.stage_kinds:ManifestSummary", "PYTHONPATH": str(ROOT)}
    # the evaluation kept light: here it only has to run on the SFT model of this graph
    light = [f"eval.{k}=null" for k in ("helmet", "lm_eval", "perplexity", "passkey", "needle")]
    fast = [x for o in [*FAST, "eval.lengths=[512]", *light] for x in ("--set", o) if not o.startswith("stage2.")]
    store = Store(str(tmp_path / "runs"))
    args = ["run", recipe, "--store", store.url, "--run-name", "g", *fast]
    prolong_cli(*args, env=env, check=True)
    done = {s: read_manifest(store, "g", s) for s in ("data", "stage1", "sft", "eval", "stage1_summary")}
    assert all(m is not None for m in done.values()), done
    assert not store.exists("g/stage2")
    assert done["sft"].upstream["stage1"] == done["stage1"].digest  # sft started from stage 1
    summary = json.loads(store.read_text("g/stage1_summary/summary.json"))
    assert summary["of"] == "stage1" and summary["files"] == len(done["stage1"].outputs)

    again = prolong_cli(*args, env=env, check=True)
    assert {s: read_manifest(store, "g", s).digest for s in done} == {s: m.digest for s, m in done.items()}
    assert (again.stdout + again.stderr).count("skipped") >= len(done)
    status = prolong_cli("status", "g", "--store", store.url, env=env, check=True).stdout
    line = next(ln for ln in status.splitlines() if ln.strip().startswith("stage1_summary"))
    assert "done" in line and f"{summary['files']} files of stage1 summarised" in line


@pytest.mark.parametrize("stages, message", [
    ({"data": {"kind": "data"}, "a": {"kind": "train", "init_from": "b"}, "b": {"kind": "train", "init_from": "a"}},
     "form a cycle"),
    ({"data": {"kind": "data"}, "a": {"kind": "train", "init_from": "ghost"}},
     "a.init_from: 'ghost' is not a stage of this recipe"),
    ({"data": {"kind": "data"}, "a": {"kind": "train"}, "e": {"kind": "eval", "model_from": "nothing"}},
     "e.model_from: 'nothing' is not a stage of this recipe"),
    ({"data": {"kind": "data"}, "a": {"kind": "train"}, "e": {"kind": "eval", "model_from": "data"}},
     "e.model_from: 'data' is not a stage that makes a model (train, merge, export)"),
    ({"data": {"kind": "data"}, "a": {"kind": "tran"}}, "a.kind: unknown stage kind 'tran'"),
    ({"data": {"kind": "data"}, "../x": {"kind": "train"}}, "not a valid stage name"),
])
def test_bad_graphs_are_one_line_errors_at_validation(stages, message):
    raw = yaml.safe_load(TINY.read_text())
    stage1 = raw["stages"]["stage1"]
    for cfg in stages.values():  # every train stage gets stage 1's fields, so only the graph is wrong
        if cfg["kind"] == "train":
            cfg.update({k: v for k, v in stage1.items() if k not in ("kind", "init_from")})
        if cfg["kind"] == "eval":
            cfg["position_loss"] = raw["stages"]["eval"]["position_loss"]
    raw["stages"] = stages
    with pytest.raises(ConfigError) as err:
        recipe_from_dict(raw)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_two_stages_of_one_kind_and_an_extra_continued_training_stage():
    raw = yaml.safe_load(TINY.read_text())
    old = raw["stages"]
    stages = {}
    for name, cfg in old.items():  # declared between stage 2 and SFT: the default hand-offs follow
        stages[name] = cfg
        if name == "stage2":
            stages["stage3"] = {**cfg, "seq_len": "4K", "batch_tokens": "8K",
                                "mixture": {"code_repos@4K": 0.5, "shortmix": 0.5}}  # "128K" continued training
    stages["sft2"] = {**old["sft"], "init_from": "sft", "lr": 5e-4}  # a second SFT stage
    raw["stages"] = stages
    r = recipe_from_dict(raw)
    assert r.init_source("stage3") == "stage2" and r.init_source("sft") == "stage3"
    assert r.init_source("sft2") == "sft" and r.graph.of_kind("train") == ["stage1", "stage2", "stage3", "sft",
                                                                           "sft2"]
    assert r.graph.trained_length("sft2") == 4096 and r.graph.instruct("sft2") and not r.graph.instruct("stage3")


def test_the_legacy_form_and_the_explicit_graph_are_one_recipe():
    legacy = load_recipe(ROOT / "recipes" / "prolong-8b.yaml")
    explicit = recipe_from_dict(legacy.model_dump(mode="json"))
    assert explicit.graph.order == legacy.graph.order == ["data", "stage1", "stage2", "sft", "eval", "export"]
    assert {s: explicit.stage(s).config_digest() for s in explicit.graph.order} == \
        {s: legacy.stage(s).config_digest() for s in legacy.graph.order}
