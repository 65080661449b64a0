"""The shipped recipes: tiny validates; prolong-8b encodes Table 9 and the ProLong scripts exactly."""

import pytest

from prolong.recipe import load_recipe
from tests.conftest import ROOT

SHORTMIX = {"fineweb_edu": 0.10, "fineweb": 0.10, "stackexchange": 0.04, "wikipedia": 0.04, "tulu_v2": 0.03,
            "arxiv": 0.03, "openwebmath": 0.03}


@pytest.fixture(scope="module")
def r8b():
    return load_recipe(ROOT / "recipes" / "prolong-8b.yaml")


def test_tiny_recipe_validates():
    r = load_recipe(ROOT / "recipes" / "tiny.yaml")
    assert r.stages["stage1"].rope_theta == 8e6 and r.stages["stage2"].rope_theta == 1.28e8
    assert r.stages["stage2"].keep_optimizer_state


def test_model_initialisation(r8b):
    assert r8b.model.path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert r8b.model.dtype == "bfloat16"


def test_stage1_64k(r8b):
    s = r8b.stages["stage1"]
    assert s.seq_len == 65536 and s.rope_theta == 8e6
    assert s.steps == 5000 and s.batch_tokens == 4 * 1024 ** 2 and s.global_batch_size == 64
    assert s.steps * s.batch_tokens == pytest.approx(20e9, rel=0.05)  # "20B tokens"
    assert (s.lr, s.warmup_ratio, s.min_lr_ratio) == (1e-5, 0.1, 0.1)  # cosine to 1e-6
    assert s.mixture == {"code_repos@64K": 0.30, "books@64K": 0.30, "textbooks@64K": 0.03, **SHORTMIX}
    assert r8b.init_source("stage1") == "model"


def test_stage2_512k(r8b):
    s = r8b.stages["stage2"]
    assert s.seq_len == 524288 and s.rope_theta == 1.28e8
    assert s.steps == 2500 and s.batch_tokens == 8 * 1024 ** 2 and s.global_batch_size == 16
    assert s.steps * s.batch_tokens == pytest.approx(20e9, rel=0.05)
    assert (s.lr, s.warmup_ratio, s.min_lr_ratio) == (5e-6, 0.1, 0.1)  # scripts' LR (paper: 1e-5)
    assert s.sequence_parallel == 8
    assert s.keep_optimizer_state and r8b.init_source("stage2") == "stage1"
    assert s.mixture == {"code_repos@512K": 0.15, "code_repos@64K": 0.15, "books@512K": 0.05, "books@64K": 0.25,
                         "textbooks@512K": 0.03, **SHORTMIX}
    # Table 9: code 50%/50% at 512K/64K, books 17%/83%, textbooks at 512K
    assert s.mixture["code_repos@512K"] / 0.30 == pytest.approx(0.5)
    assert s.mixture["books@512K"] / 0.30 == pytest.approx(0.17, abs=0.005)


def test_data_mix_matches_table9(r8b):
    s = r8b.stages["stage1"]
    long = {k.split("@")[0]: v for k, v in s.mixture.items() if "@" in k}
    assert long == {"code_repos": 0.30, "books": 0.30, "textbooks": 0.03}
    assert sum(SHORTMIX.values()) == pytest.approx(0.37)  # "37% ShortMix"
    kinds = {name: d.kind for name, d in r8b.data.domains.items()}
    assert kinds["code_repos"] == kinds["books"] == kinds["textbooks"] == "long"
    assert all(kinds[d] == "short" for d in SHORTMIX)
    assert kinds["ultrachat"] == "sft"
    assert r8b.data.domains["code_repos"].source.group_by == "max_stars_repo_name"  # concatenated per repo


def test_sft(r8b):
    s = r8b.stages["sft"]
    assert s.seq_len == 65536 and s.steps == 250 and s.batch_tokens == 4 * 1024 ** 2
    assert s.steps * s.batch_tokens == pytest.approx(1e9, rel=0.05)  # "1B tokens"
    assert (s.lr, s.warmup_ratio, s.min_lr_ratio) == (2e-5, 0.05, 0.1)  # cosine to 2e-6
    assert s.mixture == {"ultrachat": 1.0} and r8b.init_source("sft") == "stage2"


def test_optimisation_shared_by_every_stage(r8b):
    for stage in ("stage1", "stage2", "sft"):
        s = r8b.train_stage(stage)
        assert s.optim.betas == (0.9, 0.95) and s.optim.weight_decay == 0.1 and s.optim.grad_clip == 1.0
        assert s.activation_checkpointing and s.loss_chunk_size == 8192


def test_evaluation(r8b):
    e = r8b.stages["eval"]
    assert e.model_from == "sft"
    assert e.lengths == [32768, 65536, 131072] and e.lengths_of(e.json_kv) == e.lengths
    assert e.helmet.datasets == ["nq", "hotpotqa", "popqa", "msmarco", "trec_coarse", "trec_fine", "banking77",
                                 "clinc150", "nlu", "narrativeqa", "multi_lexsum"]
    assert e.judge.model == "gpt-4o-2024-05-13" and e.judge.api_key_env == "OPENAI_API_KEY"
    assert (e.perplexity.length, e.perplexity.last) == (65536, 32768)
    assert e.lm_eval.num_fewshot == {"arc_challenge": 25, "hellaswag": 10, "mmlu": 5, "winogrande": 5, "gsm8k": 5}


def test_export_settings(r8b):
    x = r8b.stages["export"]
    assert (x.kind, x.model_from, x.dtype, x.gguf) == ("export", "sft", "bfloat16", ["bf16", "q8_0", "Q4_K_M"])
    assert (x.name, x.license, x.max_shard_size) == ("Llama-3-8B-ProLong-512k-Instruct", "llama3", "5GB")
    assert r8b.graph.trained_length("export") == 524288  # max_position_embeddings of the exported config
    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml").stages["export"]
    assert (tiny.model_from, tiny.dtype, tiny.gguf) == ("sft", "float16", ["f16", "q8_0"])


def test_the_served_variant_extends_the_tiny_recipe():
    tiny = load_recipe(ROOT / "recipes" / "tiny.yaml")
    served = load_recipe(ROOT / "recipes" / "tiny-served.yaml")
    assert served.graph.order == [*tiny.graph.order, "eval_export", "eval_served"]
    assert {s: served.stage(s).config_digest() for s in tiny.graph.order} == \
        {s: tiny.stage(s).config_digest() for s in tiny.graph.order}
    a, b = served.stages["eval_export"], served.stages["eval_served"]
    assert (a.backend, b.backend, b.serve.engine, b.serve.gguf) == ("hf", "openai", "llama_cpp", "f16")
    # the same tasks, but lm-eval on the transformers path only (llama-cpp-python's server cannot score it)
    assert a.model_dump(exclude={"backend", "serve", "lm_eval"}) == b.model_dump(exclude={"backend", "serve", "lm_eval"})
    assert a.lm_eval is not None and b.lm_eval is None


def test_extends_merges_mappings_and_null_removes(tmp_path):
    from prolong.errors import ConfigError

    (tmp_path / "base.yaml").write_text((ROOT / "recipes" / "tiny.yaml").read_text())
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nname: child\nstages:\n  stage1: {steps: 3}\n"
                                         "  eval_stage1: null\n")
    child = load_recipe(tmp_path / "child.yaml")
    assert child.name == "child" and child.stages["stage1"].steps == 3 and "eval_stage1" not in child.stages
    assert child.stages["stage1"].seq_len == load_recipe(tmp_path / "base.yaml").stages["stage1"].seq_len
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="extends: loop.yaml extends itself"):
        load_recipe(tmp_path / "loop.yaml")
