"""The model a recipe continues training (``model:``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from prolong.config.base import _Config


class ModelConfig(_Config):
    """The model to continue training: an HF hub id, a local directory, or ``builtin:NAME``."""

    path: str
    tokenizer: str | None = None  # defaults to `path`
    revision: str | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # auto: flash-attn varlen if installed on a GPU, else FlexAttention on a GPU, else SDPA.
    attention: Literal["auto", "sdpa", "flex", "flash"] = "auto"
    # while training: full attention, or LongLoRA's shifted sparse attention (S²-Attn) — groups of
    # group_size_ratio × seq_len tokens, half of the heads in groups shifted by half a group, within
    # documents. Evaluation and inference always attend in full.
    attention_pattern: Literal["full", "s2"] = "full"
    group_size_ratio: float = Field(default=0.25, gt=0, le=1)
    ADDED_LATER = frozenset({"attention_pattern", "group_size_ratio"})

    def s2_group_size(self, seq_len: int) -> int | None:
        """S²-Attn's group at ``seq_len`` (None with full attention); ValueError if it does not tile."""
        if self.attention_pattern != "s2":
            return None
        group = self.group_size_ratio * seq_len
        if not float(group).is_integer() or seq_len % int(group) or int(group) % 2:
            raise ValueError(f"model.group_size_ratio: {self.group_size_ratio} × seq_len {seq_len} = {group:g} tokens "
                             "is not an even group size that divides seq_len (S²-Attn's groups tile the sequence)")
        return int(group)

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path
