"""Document-masked attention, RoPE θ, and the chunked token-averaged loss."""

import pytest
import torch
import torch.nn.functional as F

from prolong.model import attention
from prolong.model.attention import DocumentLayout, document_attention
from prolong.train.lm import TrainingLM
from prolong.model.load import load_model
from prolong.model.rope import get_rope_theta, model_rope_theta, set_rope_theta
from prolong.train.loss import IGNORE, chunked_cross_entropy_sum, next_token_targets
from prolong.train.schedule import lr_factor


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model(request):
    torch.manual_seed(0)
    path = request.getfixturevalue("tiny_model_dir" if request.param == "llama" else "tiny_qwen2_dir")
    return load_model(path, rope_theta=8e6, dtype="float32").eval()


def dense_document_reference(q, k, v, lengths, scale):
    """Attention with an explicit [L, L] block-diagonal causal mask (what document masking means)."""
    total = sum(lengths)
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(total, total, dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("lengths", [
    [5, 1, 9, 5, 12],  # padded into shared buckets of 8 and 16
    [16] * 6,  # one batched call
    [2100, 7, 64, 33],  # a document longer than the largest bucket runs alone
])
def test_sdpa_document_backend_matches_a_dense_document_mask(lengths):
    torch.manual_seed(0)
    q = torch.randn(1, 4, sum(lengths), 16)
    k, v = torch.randn(1, 2, sum(lengths), 16), torch.randn(1, 2, sum(lengths), 16)
    layout = DocumentLayout.from_lengths([lengths])
    attention.select_backend("sdpa")

    class GQA:
        num_key_value_groups = 2

    for t in (q, k, v):
        t.requires_grad_(True)
    out, _ = document_attention(GQA(), q, k, v, None, scaling=0.25, cu_seq_lens_q=layout.cu_seqlens,
                                max_length_q=layout.max_seqlen)
    ref = dense_document_reference(q, k, v, lengths, 0.25).transpose(1, 2)
    assert_same_outputs_and_gradients(out, ref, (q, k, v))


def assert_same_outputs_and_gradients(out, ref, inputs) -> None:
    """``out`` equals ``ref``, and so do their gradients with respect to ``inputs`` (a random projection)."""
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), inputs, retain_graph=True)
    ref_grads = torch.autograd.grad((ref * weights).sum(), inputs, retain_graph=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_layout_positions_restart_per_document():
    layout = DocumentLayout.from_lengths([[2, 3], [5]])
    assert layout.cu_seqlens.tolist() == [0, 2, 5, 10] and layout.max_seqlen == 5
    assert layout.position_ids.tolist() == [[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]]
    with pytest.raises(ValueError, match="equal length"):
        DocumentLayout.from_lengths([[2, 3], [4]])


def test_a_documents_logits_inside_a_pack_equal_its_logits_alone(model):
    torch.manual_seed(1)
    lengths = [7, 13, 4, 8]
    ids = torch.randint(10, 4000, (1, sum(lengths)))
    layout = DocumentLayout.from_lengths([lengths])
    with torch.no_grad():
        packed = model(input_ids=ids, **layout.model_kwargs()).logits
        start = 0
        for n in lengths:
            alone = model(input_ids=ids[:, start:start + n]).logits
            torch.testing.assert_close(packed[:, start:start + n], alone, rtol=1e-5, atol=1e-5)
            start += n
    # without the layout the same pack would leak across documents: the test can tell the difference
    with torch.no_grad():
        leaky = model(input_ids=ids).logits
    assert (leaky[:, 7:20] - packed[:, 7:20]).abs().max() > 1e-3


def test_a_documents_gradients_inside_a_pack_equal_its_gradients_alone(model):
    """The loss on document B gives the same parameter gradients packed or alone, and no gradient
    reaches the tokens of the other documents."""
    torch.manual_seed(2)
    lm = TrainingLM(model, loss_chunk_size=5)
    lengths = [6, 10, 9]
    ids = torch.randint(10, 4000, (1, sum(lengths)))
    layout = DocumentLayout.from_lengths([lengths])
    targets = next_token_targets(ids, [lengths])
    only_b = torch.full_like(targets, IGNORE)
    only_b[:, 6:16] = targets[:, 6:16]

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = grads(lm(ids, only_b, layout))
    alone_ids = ids[:, 6:16]
    alone = grads(lm(alone_ids, next_token_targets(alone_ids, [[10]]), DocumentLayout.from_lengths([[10]])))
    for name in packed:
        torch.testing.assert_close(packed[name], alone[name], rtol=1e-4, atol=2e-6, msg=name)
    # gradient of B's loss with respect to the *inputs* of documents A and C is exactly zero
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    hidden = model.model(inputs_embeds=emb, use_cache=False, **layout.model_kwargs()).last_hidden_state
    chunked_cross_entropy_sum(hidden, model.get_output_embeddings().weight, only_b).backward()
    per_token = emb.grad.abs().sum(-1)[0]
    assert per_token[:6].max() == 0 and per_token[16:].max() == 0 and per_token[6:16].max() > 0


def test_rope_theta_is_written_into_the_config_and_used(tiny_model_dir):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    set_rope_theta(cfg, 1.28e8)
    assert get_rope_theta(cfg) == 1.28e8
    m = load_model(tiny_model_dir, rope_theta=1.28e8, dtype="float32")
    assert get_rope_theta(m.config) == 1.28e8
    assert model_rope_theta(m) == pytest.approx(1.28e8, rel=1e-6)


def test_next_token_targets_stop_at_document_ends_and_follow_the_mask():
    ids = torch.tensor([[10, 11, 12, 20, 21, 22]])
    assert next_token_targets(ids, [[3, 3]]).tolist() == [[11, 12, IGNORE, 21, 22, IGNORE]]
    mask = torch.tensor([[0, 0, 1, 0, 1, 1]])
    assert next_token_targets(ids, [[3, 3]], mask).tolist() == [[IGNORE, 12, IGNORE, 21, 22, IGNORE]]


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_chunked_cross_entropy_equals_plain_cross_entropy(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(3, 40, 32, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(500, 32, dtype=torch.float32, requires_grad=True)
    targets = torch.randint(0, 500, (3, 40))
    targets[0, :5] = IGNORE
    got = chunked_cross_entropy_sum(hidden, weight, targets, chunk)
    ref = F.cross_entropy((hidden @ weight.t()).reshape(-1, 500), targets.reshape(-1), ignore_index=IGNORE,
                          reduction="sum")
    assert abs(got.item() - ref.item()) / ref.item() < 1e-6
    g_got = torch.autograd.grad(got, (hidden, weight))
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(g_got, g_ref):  # summation order differs by chunk: compare at fp32 resolution of the scale
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


def test_schedule_warms_up_then_decays_to_the_min_ratio():
    f = [lr_factor(s, 100, 0.1, 0.1) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warmup over 10 steps
    assert all(a >= b for a, b in zip(f[9:], f[10:]))  # then monotone cosine decay
    assert lr_factor(100, 100, 0.1, 0.1) == pytest.approx(0.1)  # ends at min_lr_ratio × lr
    assert lr_factor(0, 10, 0.0, 0.0) == pytest.approx(1.0)


def test_flop_conventions(tiny_model_dir):
    from prolong.train.flops import FlopCounter, peak_flops

    lm = load_model(tiny_model_dir, rope_theta=8e6, dtype="float32")
    fc = FlopCounter.for_model(lm)
    c = lm.config
    n = sum(p.numel() for p in lm.parameters()) - c.vocab_size * c.hidden_size  # all but the input embedding
    assert fc.matmul_params == n and fc.layers == c.num_hidden_layers and fc.attention_width == c.hidden_size
    # nominal, causal: 6N + 6·layers·d·L per token
    assert fc.nominal(1024, 512) == 1024 * (6 * n + 6 * c.num_hidden_layers * c.hidden_size * 512)
    # document-aware: one document filling the sequence is the nominal count; packs of short ones cost less
    assert fc.document_aware(512, 512 ** 2) == fc.nominal(512, 512)
    assert fc.document_aware(512, 8 * 64 ** 2) < fc.nominal(512, 512)
    assert peak_flops(torch.device("cpu")) is None and peak_flops(torch.device("cpu"), 100.0) == 1e14


def test_models_without_rope_are_refused_for_long_context_training(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from prolong.errors import ConfigError

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ConfigError, match=r"stage1.rope_theta: model .* \(gpt2\) has no rotary position embedding"):
        load_model(str(tmp_path / "gpt2"), rope_theta=8e6, seq_len=512, dtype="float32", field="stage1")


def test_training_longer_than_the_model_was_configured_for_extends_its_positions(tiny_model_dir):
    m = load_model(tiny_model_dir, rope_theta=1.28e8, seq_len=16384, dtype="float32")
    assert m.config.max_position_embeddings == 16384
