"""The training module: an HF causal LM plus the chunked loss, as one ``nn.Module``.

Computing the loss inside this module's ``forward`` matters under FSDP2: the output embedding is
gathered for the duration of the root module's forward, so the chunked cross-entropy can use its
weight directly without ever building the full logits tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from prolong.model.attention import DocumentLayout
from prolong.train.loss import chunked_cross_entropy_sum


class TrainingLM(nn.Module):
    def __init__(self, lm: nn.Module, loss_chunk_size: int = 8192, s2_group_size: int | None = None):
        super().__init__()
        self.lm = lm
        self.loss_chunk_size = loss_chunk_size
        # LongLoRA's S²-Attn while training (prolong.model.attention); evaluation never passes it
        self.attention_kwargs = {"s2_group_size": s2_group_size} if s2_group_size else {}
        self.autocast_dtype: torch.dtype | None = None  # set by parallelize() when FSDP does not cast

    @property
    def backbone(self) -> nn.Module:
        return getattr(self.lm, self.lm.base_model_prefix)

    def forward(self, input_ids: torch.Tensor, targets: torch.Tensor, layout: DocumentLayout) -> torch.Tensor:
        """Σ token cross-entropy of the micro-batch (the trainer divides by the global token count)."""
        with torch.autocast(input_ids.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            hidden = self.backbone(input_ids=input_ids, use_cache=False, **layout.model_kwargs(),
                                   **self.attention_kwargs).last_hidden_state
            weight = self.lm.get_output_embeddings().weight
            return chunked_cross_entropy_sum(hidden, weight, targets, self.loss_chunk_size)
