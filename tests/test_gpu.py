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
