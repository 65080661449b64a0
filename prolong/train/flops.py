"""FLOPs and MFU, under two stated conventions.

* **nominal** (PaLM appendix B / torchtitan, causal): per token ``6·N + 6·layers·d·L`` — N the
  parameters that do matmuls (all but the input embedding, which is a lookup), d the attention width
  (heads × head_dim), L the sequence length. 6·N covers forward + backward of the weights; the
  attention scores and their use cost 12·layers·d·L per token, halved by the causal mask.
* **document-aware**: the attention term counts what document masking actually computes,
  ``6·layers·d·Σ len²`` per sequence (Σ over its documents) instead of ``6·layers·d·L²``; the
  weight term is the same. Packs of short documents need far fewer FLOPs than L² suggests, so this
  MFU is the honest one for document-masked training, the nominal one the comparable one.

MFU = achieved FLOP/s per device ÷ the device's peak (dense bf16, no sparsity). Activation
recomputation is not counted (it is overhead, not model FLOPs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 peak TFLOP/s per device (vendor figures, no 2:4 sparsity).
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "H800": 989.4, "A100": 312.0, "A800": 312.0, "L40S": 362.1,
               "A10G": 125.0, "L4": 121.0, "V100": 125.0}


@dataclass(frozen=True)
class FlopCounter:
    matmul_params: int  # N
    layers: int
    attention_width: int  # d = heads × head_dim

    @classmethod
    def for_model(cls, lm) -> "FlopCounter":
        config = lm.config
        embedding = lm.get_input_embeddings().weight
        tied = lm.get_output_embeddings().weight is embedding  # then it is the output matmul too
        n = sum(p.numel() for p in lm.parameters()) - (0 if tied else embedding.numel())
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(matmul_params=n, layers=config.num_hidden_layers, attention_width=config.num_attention_heads * head_dim)

    def nominal(self, tokens: int, seq_len: int) -> float:
        return tokens * (6 * self.matmul_params + 6 * self.layers * self.attention_width * seq_len)

    def document_aware(self, tokens: int, sum_len_sq: int) -> float:
        return 6 * self.matmul_params * tokens + 6 * self.layers * self.attention_width * sum_len_sq


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of one device, from the override or the GPU's name; None when unknown (CPUs)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
