"""Recipe schema: parsing, one-line errors naming the field, overrides, per-stage digests."""

import pytest

from prolong.config import format_tokens, parse_tokens
from prolong.recipe import apply_overrides, load_recipe, recipe_from_dict
from prolong.errors import ConfigError
from tests.conftest import ROOT

TINY = ROOT / "recipes" / "tiny.yaml"


def test_token_counts_parse_binary_suffixes():
    assert parse_tokens("64K") == 65536
    assert parse_tokens("512K") == 524288
    assert parse_tokens("4M") == 4 * 1024 * 1024
    assert parse_tokens(" 2k ") == 2048
    assert parse_tokens(1000) == 1000
    assert format_tokens(524288) == "512K" and format_tokens(3000) == "3000"
    with pytest.raises(ValueError):
        parse_tokens("64Q")


@pytest.mark.parametrize("override, message", [
    ("stage1.lr=-1", "stage1.lr: Input should be greater than 0"),
    ("stage1.steps=0", "stage1.steps: Input should be greater than 0"),
    ("stage1.seq_len=banana", "stage1.seq_len: expected a token count like 65536 or 64K, got 'banana'"),
    ("stage1.batch_tokens=1000", "stage1.batch_tokens: 1000 is not a multiple of seq_len 512"),
    ("stage1.mixture.books=0.5", "stage1.mixture: proportions sum to 1.2, not 1"),
    ("stage2.mixture={code_repos@3K: 0.6, shortmix: 0.4}",
     "stage2.mixture.code_repos@3K: document length 3072 must divide seq_len 2048"),
    ("stage1.rope_thetaa=1", "stage1.rope_thetaa: Extra inputs are not permitted"),
    ("data.domains.books.kind=medium", "data.domains.books.kind: Input should be 'long', 'short' or 'sft'"),
    ("data.domains.books.source.type=ftp", "data.domains.books.source: Input tag 'ftp' found using 'type'"),
    ("data.domains.books.source.path=null", "data.domains.books.source.path: Input should be a valid string"),
    ("sft.mixture={books: 1.0}", "sft.mixture.books: sft needs sft domains, books is long"),
    ("stage1.mixture={chat: 1.0}", "stage1.mixture.chat: stage1 needs long or short domains, chat is sft"),
    ("stage1.mixture={novels: 1.0}", "stage1.mixture.novels: no such domain in data.domains"),
    ("stage1.mixture={shortmix@512: 1.0}", "stage1.mixture.shortmix: a document length (@) applies to long domains only"),
    ("sft.init_from=eval", "sft.init_from: 'eval' is not an earlier stage of this recipe"),
    ("stage1.keep_optimizer_state=true", "stage1.keep_optimizer_state: needs init_from to name an earlier stage"),
    ("eval.model_from=stage9", "eval.model_from: 'stage9' is not a stage of this recipe"),
    ("eval.model_from=data", "eval.model_from: 'data' is not a stage that makes a model (train, merge, export)"),
    ("stage1.sequence_parallel=3", "stage1.sequence_parallel: 3 does not divide seq_len 512"),
    ("jobs.env={OPENAI_API_KEY: sk-1}", "jobs.env.OPENAI_API_KEY: looks like a credential"),
])
def test_bad_fields_fail_with_one_line_naming_the_field(override, message):
    with pytest.raises(ConfigError) as err:
        load_recipe(TINY, [override])
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_recipe(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="a recipe is a YAML mapping"):
        load_recipe(bad)


def test_overrides_parse_yaml_values_and_reject_malformed_items():
    raw = {"a": {"b": 1}}
    assert apply_overrides(raw, ["a.b=2", "a.c=[1, 2]", "d.e=true"]) == {"a": {"b": 2, "c": [1, 2]}, "d": {"e": True}}
    assert raw == {"a": {"b": 1}}  # not mutated
    with pytest.raises(ConfigError, match="expected key.path=value"):
        apply_overrides(raw, ["a.b"])
    with pytest.raises(ConfigError, match="b is not a section"):
        apply_overrides(raw, ["a.b.c=1"])


def digests(recipe) -> dict[str, str]:
    return {s: recipe.stage(s).config_digest() for s in recipe.graph.order}


def test_digests_cover_exactly_what_a_stage_depends_on():
    base = digests(load_recipe(TINY))
    assert base == digests(load_recipe(TINY))  # stable
    changed = digests(load_recipe(TINY, ["sft.lr=0.0005"]))
    assert {s for s in base if changed[s] != base[s]} == {"sft"}
    more_steps = digests(load_recipe(TINY, ["stage1.steps=50"]))  # more steps need more data
    assert {s for s in base if more_steps[s] != base[s]} == {"data", "stage1"}
    kv = digests(load_recipe(TINY, ["eval.json_kv.lengths=[256]"]))
    assert {s for s in base if kv[s] != base[s]} == {"eval"}


def test_stage_selection():
    r = load_recipe(TINY)
    assert r.graph.order == ["data", "stage1", "eval_stage1", "stage2", "eval_stage2", "sft", "eval", "export"]
    assert r.graph.select(["stage1", "data"]) == ["data", "stage1"]
    assert r.graph.select(None, "sft") == r.graph.order
    # --from-stage stage2: it and everything that reads its outputs, not the evaluation of stage 1
    assert r.graph.forced_by(r.graph.order, "stage2") == {"stage2", "eval_stage2", "sft", "eval", "export"}
    with pytest.raises(ConfigError, match="unknown stage 'stage3'"):
        r.graph.select(["stage3"])
    with pytest.raises(ConfigError, match="'sft' is not among the selected stages"):
        r.graph.select(["data"], "sft")
    raw = r.model_dump(mode="json")
    del raw["stages"]["eval"]
    with pytest.raises(ConfigError, match="unknown stage 'eval'"):
        recipe_from_dict(raw).graph.select(["eval"])


def test_init_sources_follow_stage_order():
    r = load_recipe(TINY)
    assert [r.init_source(s) for s in ("stage1", "stage2", "sft")] == ["model", "stage1", "stage2"]
    sft_after_stage1 = load_recipe(TINY, ["sft.init_from=stage1"])  # ProLong-64k-Instruct's path
    assert sft_after_stage1.init_source("sft") == "stage1"
