"""LoRA through peft as LongLoRA trains it (adapters on q/k/v/o, embeddings and norms in full), the
adapter pair a LoRA stage leaves, and the merge into full weights."""

from __future__ import annotations

import json

import pytest
import torch

from prolong.config.train import LoraConfig
from prolong.errors import ConfigError, StageError
from prolong.model import attention
from prolong.model.attention import DocumentLayout
from prolong.model.load import load_model
from prolong.model.lora import TRAINABLE_FILE, apply_lora, merge, save_adapter
from prolong.recipe import load_recipe


def lora_model(path, **cfg):
    lm = load_model(path, rope_theta=8e6, dtype="float32")
    return lm, apply_lora(lm, LoraConfig(**cfg), torch.float32, "stage1.lora")


def test_lora_trains_adapters_embeddings_and_norms_and_freezes_the_rest(tiny_model_dir):
    lm, lora = lora_model(tiny_model_dir)
    trained = {n for n, p in lm.named_parameters() if p.requires_grad}
    frozen = {n for n, p in lm.named_parameters() if not p.requires_grad}
    layers = lm.config.num_hidden_layers
    # LongLoRA: LoRA A/B on each of q/k/v/o of every layer; "embed" and "norm" by name; lm_head frozen
    assert sum("lora_A" in n for n in trained) == sum("lora_B" in n for n in trained) == 4 * layers
    assert "model.embed_tokens.weight" in trained and "model.norm.weight" in trained
    assert sum("layernorm" in n for n in trained) == 2 * layers
    assert "lm_head.weight" in frozen and all("base_layer" in n or "mlp" in n or n == "lm_head.weight" for n in frozen)
    assert lora.trainable == sum(p.numel() for n, p in lm.named_parameters() if n in trained)
    assert lora.total == sum(p.numel() for p in lm.parameters()) and 0 < lora.trainable < lora.total
    # rank 8: A is [8, in], B [out, 8]; B starts at zero, so the adapted model is the base at first
    q = lm.model.layers[0].self_attn.q_proj
    assert q.lora_A["default"].weight.shape == (8, lm.config.hidden_size)
    assert torch.count_nonzero(q.lora_B["default"].weight) == 0


def test_a_frozen_base_is_kept_in_the_compute_dtype_and_what_trains_in_fp32(tiny_model_dir):
    lm = load_model(tiny_model_dir, rope_theta=8e6, dtype="float32")
    apply_lora(lm, LoraConfig(), torch.bfloat16, "stage1.lora")
    dtypes = {p.requires_grad: set() for p in lm.parameters()}
    for p in lm.parameters():
        dtypes[p.requires_grad].add(p.dtype)
    assert dtypes == {True: {torch.float32}, False: {torch.bfloat16}}


def _packed_logits(lm, ids, layout):
    attention.select_backend("sdpa")
    with torch.no_grad():
        return lm(input_ids=ids, use_cache=False, **layout.model_kwargs()).logits


def _train_a_little(lm, ids, layout, samples):
    """Three real optimizer steps so adapters, embeddings and norms all move off their start."""
    from prolong.train.lm import TrainingLM
    from prolong.train.loss import next_token_targets

    attention.select_backend("sdpa")
    model = TrainingLM(lm)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    targets = next_token_targets(ids, samples)
    for _ in range(3):
        model(ids, targets, layout).backward()
        opt.step()
        opt.zero_grad()


def test_the_merged_model_gives_the_lora_models_logits_on_packed_input(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    lm, lora = lora_model(tiny_model_dir)
    samples = [[20, 30, 14], [64]]
    layout = DocumentLayout.from_lengths(samples)
    ids = torch.randint(0, lm.config.vocab_size, (2, 64))
    base_logits = _packed_logits(load_model(tiny_model_dir, rope_theta=8e6, dtype="float32"), ids, layout)
    _train_a_little(lm, ids, layout, samples)
    adapted = _packed_logits(lm, ids, layout)
    assert not torch.allclose(adapted, base_logits, atol=1e-3)  # training moved it

    save_adapter(lora, lm.state_dict(), tmp_path, base_ref=tiny_model_dir)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (8, 16, 0.0)
    assert sorted(config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    from safetensors.torch import load_file

    full = load_file(str(tmp_path / TRAINABLE_FILE))
    assert "model.embed_tokens.weight" in full and "lm_head.weight" not in full
    assert not any("lora_" in k for k in full)

    merged = merge(load_model(tiny_model_dir, rope_theta=8e6, dtype="float32"), tmp_path)
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    assert type(merged).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(_packed_logits(merged, ids, layout), adapted, rtol=1e-5, atol=1e-5)


def test_merge_resizes_the_embeddings_when_the_trained_ones_have_a_token_more(tiny_model_dir, tmp_path):
    """LongLoRA adds a [PAD] token for SFT and resizes the embeddings; its merge does the same first."""
    torch.manual_seed(0)
    lm = load_model(tiny_model_dir, rope_theta=8e6, dtype="float32")
    vocab = lm.config.vocab_size
    lm.resize_token_embeddings(vocab + 1)
    lora = apply_lora(lm, LoraConfig(), torch.float32, "sft.lora")
    with torch.no_grad():
        lm.model.embed_tokens.weight[-1].normal_()
    save_adapter(lora, lm.state_dict(), tmp_path, base_ref=tiny_model_dir)
    merged = merge(load_model(tiny_model_dir, rope_theta=8e6, dtype="float32"), tmp_path)
    assert merged.get_input_embeddings().weight.shape[0] == vocab + 1
    torch.testing.assert_close(merged.get_input_embeddings().weight[-1], lm.model.embed_tokens.weight[-1])


def test_an_adapter_of_another_model_is_named_when_merged(tiny_model_dir, tiny_qwen2_dir, tmp_path):
    lm, lora = lora_model(tiny_qwen2_dir)
    save_adapter(lora, lm.state_dict(), tmp_path, base_ref=tiny_qwen2_dir)
    with pytest.raises(StageError, match=rf"^{tmp_path}/{TRAINABLE_FILE}: .*another model|shape"):
        merge(load_model(tiny_model_dir, rope_theta=8e6, dtype="float32"), tmp_path)


def test_lora_names_that_match_nothing_are_one_line_errors(tiny_model_dir):
    with pytest.raises(ConfigError, match=r"^stage1.lora.target_modules: Target modules \{'c_attn'\} not found"):
        lora_model(tiny_model_dir, target_modules=["c_attn"])
    with pytest.raises(ConfigError, match=r"^stage1.lora.trainable: no parameter of LlamaForCausalLM is named like "
                                          r"\['wte'\]"):
        lora_model(tiny_model_dir, trainable=["embed", "wte"])


LORA = ["stage1.lora.r=8"]


def test_lora_stages_validate_against_the_rest_of_the_recipe():
    with pytest.raises(ConfigError, match=r"^eval_stage1.model_from: 'stage1' is a LoRA stage: it leaves an adapter, "
                                          r"not full weights; add a stage of kind merge \(from: stage1\) and read that$"):
        load_recipe("recipes/tiny.yaml", LORA)
    with pytest.raises(ConfigError, match=r"^stage2.init_from: 'stage1' is a LoRA stage"):
        load_recipe("recipes/tiny.yaml", LORA + ["eval_stage1.model_from=stage2", "stage2.keep_optimizer_state=false"])
    recipe = load_recipe("recipes/tiny.yaml", LORA + ["eval_stage1.model_from=stage2", "stage2.init_from=model",
                                                      "stage2.keep_optimizer_state=false"])
    assert recipe.stages["stage1"].lora == LoraConfig()
    assert not recipe.graph["stage1"].makes_model and recipe.graph["stage2"].makes_model
    with pytest.raises(ConfigError, match=r"^stage2.keep_optimizer_state: a LoRA stage trains new parameters"):
        load_recipe("recipes/tiny.yaml", ["stage2.lora.r=8"])
    with pytest.raises(ConfigError, match=r"^merge.from: 'stage2' is not a LoRA training stage"):
        load_recipe("recipes/tiny.yaml", ["stages.merge.kind=merge", "stages.merge.from=stage2"])
    with pytest.raises(ConfigError, match=r"^stage1.lora.target_modules: LoRA needs at least one module"):
        load_recipe("recipes/tiny.yaml", ["stage1.lora.target_modules=[]"])
    # a new option at its default leaves finished stages' digests as they were
    plain = load_recipe("recipes/tiny.yaml")
    assert plain.stage("stage1").config_digest() == load_recipe(
        "recipes/tiny.yaml", ["stage1.lora=null"]).stage("stage1").config_digest()
