"""GPU backends against the exact SDPA path; NCCL across two GPUs. Skipped without CUDA."""

import pytest
import torch

from prolong.model import attention
from prolong.model.attention import DocumentLayout, document_attention

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class GQA:
    num_key_value_groups = 4


def run(backend, q, k, v, lengths):
    attention.select_backend(backend, "cuda")
    layout = DocumentLayout.from_lengths([lengths], device="cuda")
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, _ = document_attention(GQA(), q, k, v, None, scaling=q.shape[-1] ** -0.5, cu_seq_lens_q=layout.cu_seqlens,
                                max_length_q=layout.max_seqlen)
    out.float().pow(2).sum().backward()
    return out.float(), [t.grad.float() for t in (q, k, v)]


@cuda
@pytest.mark.parametrize("backend", ["flex", "flash"])
def test_gpu_backends_match_sdpa(backend):
    if backend == "flash" and not attention.flash_available():
        pytest.skip("flash-attn is not installed")
    torch.manual_seed(0)
    lengths = [1000, 24, 3000, 96, 4072]
    q = torch.randn(1, 8, sum(lengths), 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, sum(lengths), 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ref_out, ref_grads = run("sdpa", q, k, v, lengths)
    out, grads = run(backend, q, k, v, lengths)
    torch.testing.assert_close(out, ref_out, rtol=2e-2, atol=2e-2)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=5e-2, atol=5e-2)


@cuda
def test_auto_picks_a_gpu_backend():
    assert attention.select_backend("auto", "cuda") in ("flash", "flex")


@cuda
def test_qlora_trains_adapters_on_an_nf4_base(tiny_model_dir):
    """lora.quantize: nf4 — the frozen base in bitsandbytes NF4 as LongLoRA's QLoRA script loads it;
    adapters, embeddings and norms train in fp32 and the loss falls over a few steps."""
    pytest.importorskip("bitsandbytes")
    from prolong.config.train import LoraConfig
    from prolong.model.load import load_model
    from prolong.model.lora import apply_lora
    from prolong.train.lm import TrainingLM
    from prolong.train.loss import next_token_targets

    torch.manual_seed(0)
    lm = load_model(tiny_model_dir, rope_theta=8e6, dtype="bfloat16", quantize="nf4", device="cuda")
    assert type(lm.model.layers[0].mlp.up_proj.weight).__name__ == "Params4bit"
    apply_lora(lm, LoraConfig(quantize="nf4"), torch.bfloat16, "sft.lora")
    attention.select_backend("sdpa", "cuda")
    model = TrainingLM(lm)
    model.autocast_dtype = torch.bfloat16
    lengths = [[40, 24], [64]]
    layout = DocumentLayout.from_lengths(lengths, device="cuda")
    ids = torch.randint(0, lm.config.vocab_size, (2, 64), device="cuda")
    targets = next_token_targets(ids, lengths)
    opt = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(ids, targets, layout)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses


def test_qlora_on_a_machine_without_a_gpu_is_a_one_line_error_before_anything_runs(prefect_env, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from tests.conftest import prolong_cli

    store = tmp_path / "runs"
    p = prolong_cli("run", "recipes/tiny-longlora.yaml", "--store", str(store), "--run-name", "q",
                    "--set", "sft.lora.quantize=nf4", env=prefect_env)
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().splitlines()[-1] == (
        "error: sft.lora.quantize: nf4 (QLoRA) quantizes the frozen base with bitsandbytes, which runs on GPUs "
        "only, and this machine has no GPU; remove lora.quantize to train the adapter on a 16-bit base")
    assert not store.exists() or not any(store.rglob("manifest.json"))  # nothing ran
