"""LongLoRA's shifted sparse attention (S²-Attn) against a direct reference: an explicit mask built
here from its definition — causal, within the token's document, within its group of G tokens for
the first half of the heads and within groups shifted by G/2 (boundaries offset, no wrap-around)
for the second half."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from prolong.errors import ConfigError
from prolong.model import attention
from prolong.model.attention import DocumentLayout, document_attention
from prolong.recipe import load_recipe
from tests.test_model import assert_same_outputs_and_gradients


def s2_reference_mask(lengths: list[int], heads: int, group: int) -> torch.Tensor:
    """[heads, L, L] bool: may query i attend key j."""
    total = sum(lengths)
    pos = torch.arange(total)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    causal_in_doc = (doc[:, None] == doc[None, :]) & (pos[None, :] <= pos[:, None])
    plain, shifted = pos // group, (pos + group // 2) // group
    masks = [causal_in_doc & (g[:, None] == g[None, :]) for g in (plain, shifted)]
    return torch.stack([masks[0]] * (heads // 2) + [masks[1]] * (heads - heads // 2))


def reference(q, k, v, samples: list[list[int]], group: int, scale: float) -> torch.Tensor:
    heads = q.shape[1]
    k, v = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (k, v))
    mask = torch.stack([s2_reference_mask(lengths, heads, group) for lengths in samples])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).transpose(1, 2)


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_s2_attention_equals_the_explicit_mask_in_outputs_and_gradients_with_packed_documents(kv_heads):
    torch.manual_seed(0)
    samples = [[5, 11, 3, 13], [32], [7, 25]]  # documents across group boundaries, one of a whole sample
    group, heads, dim = 8, 4, 16
    q = torch.randn(len(samples), heads, 32, dim, requires_grad=True)
    k = torch.randn(len(samples), kv_heads, 32, dim, requires_grad=True)
    v = torch.randn(len(samples), kv_heads, 32, dim, requires_grad=True)
    layout = DocumentLayout.from_lengths(samples)
    attention.select_backend("sdpa")
    out, _ = document_attention(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=layout.cu_seqlens,
                                max_length_q=layout.max_seqlen, s2_group_size=group)
    assert_same_outputs_and_gradients(out, reference(q, k, v, samples, group, 0.25), (q, k, v))
    # and it is not full attention: the last token of the 32-token document sees only its group
    full, _ = document_attention(None, q, k, v, None, scaling=0.25, cu_seq_lens_q=layout.cu_seqlens,
                                 max_length_q=layout.max_seqlen)
    assert not torch.allclose(full[1], out[1])


def test_a_model_trained_with_s2_attends_in_groups_and_evaluates_in_full(tiny_model_dir):
    """Through the HF model: TrainingLM's S²-Attn reaches every layer (same loss as the model run
    with the reference mask as its attention), and the same model without it attends in full."""
    from transformers import AttentionInterface

    from prolong.model.load import load_model
    from prolong.train.lm import TrainingLM
    from prolong.train.loss import next_token_targets

    samples, group = [[40, 24], [64]], 16

    def reference_attention(module, query, key, value, attention_mask=None, scaling=None, **kwargs):
        return reference(query, key, value, samples, group, scaling), None

    AttentionInterface.register("s2_reference", reference_attention)
    torch.manual_seed(0)
    model = load_model(tiny_model_dir, rope_theta=8e6, dtype="float32")
    layout = DocumentLayout.from_lengths(samples)
    ids = torch.randint(0, model.config.vocab_size, (2, 64))
    targets = next_token_targets(ids, samples)
    attention.select_backend("sdpa")
    s2 = TrainingLM(model, s2_group_size=group)(ids, targets, layout)
    full = TrainingLM(model)(ids, targets, layout)
    model.config._attn_implementation = "s2_reference"
    try:
        expected = TrainingLM(model)(ids, targets, layout)  # the same per-document positions
    finally:
        model.config._attn_implementation = attention.ATTN_IMPLEMENTATION
    torch.testing.assert_close(s2, expected, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(s2, full)


def test_a_group_that_does_not_tile_the_stage_is_a_one_line_error_at_validation():
    with pytest.raises(ConfigError, match=r"^stage1.seq_len: model.group_size_ratio: 0.3 × seq_len 512 = 153.6 tokens "
                                          r"is not an even group size that divides seq_len"):
        load_recipe("recipes/tiny.yaml", ["model.attention_pattern=s2", "model.group_size_ratio=0.3"])
    with pytest.raises(ConfigError, match=r"sequence_parallel: S²-Attn .* use sequence_parallel: 1"):
        load_recipe("recipes/tiny.yaml", ["model.attention_pattern=s2", "stage2.sequence_parallel=2"])
    recipe = load_recipe("recipes/tiny.yaml", ["model.attention_pattern=s2"])
    assert recipe.model.s2_group_size(512) == 128 and recipe.model.s2_group_size(2048) == 512
    # a new option at its default leaves finished stages' digests as they were
    plain = load_recipe("recipes/tiny.yaml")
    assert plain.stage("stage1").config_digest() == load_recipe(
        "recipes/tiny.yaml", ["model.attention_pattern=full"]).stage("stage1").config_digest()
    assert plain.stage("stage1").config_digest() != recipe.stage("stage1").config_digest()
