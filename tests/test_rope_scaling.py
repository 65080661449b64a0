"""RoPE scaling beside θ (LongLoRA's position interpolation, dynamic NTK, YaRN, Llama-3.1's), set
before the model is built, carried in the exported config in the forms transformers 4 and 5 read."""

from __future__ import annotations

import json

import pytest
import torch

from prolong.config.train import RopeScalingConfig
from prolong.errors import ConfigError
from prolong.model.load import load_model
from prolong.model.rope import get_rope_scaling, write_portable_config
from prolong.recipe import load_recipe


def inv_freq(model) -> torch.Tensor:
    return next(m.inv_freq for m in model.modules() if getattr(m, "inv_freq", None) is not None)


def test_linear_scaling_interpolates_positions_and_is_exported_in_both_forms(tiny_model_dir, tmp_path):
    plain = load_model(tiny_model_dir, rope_theta=1e4, dtype="float32")
    pi = load_model(tiny_model_dir, rope_theta=1e4, dtype="float32", rope_scaling=RopeScalingConfig(type="linear",
                                                                                                    factor=4))
    torch.testing.assert_close(inv_freq(pi), inv_freq(plain) / 4)  # position p is rotated as p / 4
    pi.save_pretrained(tmp_path / "hf")
    config = write_portable_config(tmp_path / "hf", dtype="float32")
    assert config["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e4}
    assert config["rope_scaling"] == {"type": "linear", "rope_type": "linear", "factor": 4.0}
    assert config["rope_theta"] == 1e4
    # a later stage without scaling starts from that model with none: each stage says its own
    again = load_model(str(tmp_path / "hf"), rope_theta=1e4, dtype="float32")
    assert get_rope_scaling(again.config) is None
    torch.testing.assert_close(inv_freq(again), inv_freq(plain))


def test_dynamic_scaling_keeps_the_base_models_length_as_its_original(tiny_model_dir):
    original = json.loads((__import__("pathlib").Path(tiny_model_dir) / "config.json").read_text())[
        "max_position_embeddings"]
    model = load_model(tiny_model_dir, rope_theta=1e4, seq_len=4 * original, dtype="float32",
                       rope_scaling=RopeScalingConfig(type="dynamic", factor=4))
    scaling = get_rope_scaling(model.config)
    assert scaling == {"rope_type": "dynamic", "factor": 4.0, "original_max_position_embeddings": original}
    assert model.config.max_position_embeddings == 4 * original


def test_rope_scaling_in_recipes_validates_and_leaves_old_digests_alone():
    recipe = load_recipe("recipes/tiny.yaml", ["stage1.rope_scaling={type: linear, factor: 4}"])
    assert recipe.train_stage("stage1").rope_scaling.parameters() == {"rope_type": "linear", "factor": 4.0}
    assert recipe.stage("stage1").config_digest() != load_recipe("recipes/tiny.yaml").stage("stage1").config_digest()
    with pytest.raises(ConfigError, match=r"stage1.rope_scaling.*llama3 scaling needs low_freq_factor"):
        load_recipe("recipes/tiny.yaml", ["stage1.rope_scaling={type: llama3, factor: 8}"])
    with pytest.raises(ConfigError, match=r"stage1.rope_scaling.type"):
        load_recipe("recipes/tiny.yaml", ["stage1.rope_scaling={type: longrope, factor: 8}"])
