"""The model a recipe continues training (``model:``)."""

from __future__ import annotations

from typing import Literal

from prolong.config.base import _Config


class ModelConfig(_Config):
    """The model to continue training: an HF hub id, a local directory, or ``builtin:NAME``."""

    path: str
    tokenizer: str | None = None  # defaults to `path`
    revision: str | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # auto: flash-attn varlen if installed on a GPU, else FlexAttention on a GPU, else SDPA.
    attention: Literal["auto", "sdpa", "flex", "flash"] = "auto"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path
