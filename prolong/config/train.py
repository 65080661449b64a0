"""A training stage (kind ``train``): continued pretraining at a length and θ, or SFT — Table 9."""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, model_validator

from prolong.config.base import StageConfig, Tokens, _Config, parse_tokens

class OptimConfig(_Config):
    """AdamW as in Table 9."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)


class RopeScalingConfig(_Config):
    """RoPE scaling beside θ, as transformers implements it: ``linear`` (position interpolation,
    LongLoRA's: factor = target length / original), ``dynamic`` (NTK), ``yarn``, ``llama3``."""

    type: Literal["linear", "dynamic", "yarn", "llama3"]
    factor: float = Field(gt=0)
    # the length the base model was trained at (dynamic, yarn, llama3); default: its config's
    original_max_position_embeddings: int | None = Field(default=None, gt=0)
    low_freq_factor: float | None = Field(default=None, gt=0)  # llama3
    high_freq_factor: float | None = Field(default=None, gt=0)  # llama3
    beta_fast: float | None = Field(default=None, gt=0)  # yarn
    beta_slow: float | None = Field(default=None, gt=0)  # yarn
    attention_factor: float | None = Field(default=None, gt=0)  # yarn

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "llama3" and (self.low_freq_factor is None or self.high_freq_factor is None):
            raise ValueError("llama3 scaling needs low_freq_factor and high_freq_factor (Llama-3.1: 1 and 4)")
        return self

    def parameters(self, original_max_position_embeddings: int | None = None) -> dict:
        """transformers' rope parameters (``rope_type`` and its fields)."""
        out = {"rope_type": self.type, **self.model_dump(exclude={"type"}, exclude_none=True)}
        if self.type != "linear" and "original_max_position_embeddings" not in out and original_max_position_embeddings:
            out["original_max_position_embeddings"] = original_max_position_embeddings
        return out


class LoraConfig(_Config):
    """Low-rank training through peft, as LongLoRA's fine-tune.py: LoRA on the attention projections,
    and ("LoRA+") the parameters named in ``trainable`` trained in full — embeddings and norms."""

    r: int = Field(default=8, gt=0)
    alpha: float = Field(default=16, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj"]
    # parameters trained in full beside the adapter: every parameter whose name contains one of these
    # (LongLoRA's --trainable_params embed,norm: embed_tokens and every RMSNorm; lm_head stays frozen)
    trainable: list[str] = ["embed", "norm"]
    quantize: Literal["nf4"] | None = None  # QLoRA: the frozen base in bitsandbytes NF4 (GPUs only)

    @model_validator(mode="after")
    def _names(self):
        if not self.target_modules:
            raise ValueError("target_modules: LoRA needs at least one module to adapt (LongLoRA: q/k/v/o_proj)")
        if any(not n.strip() for n in [*self.target_modules, *self.trainable]):
            raise ValueError("target_modules/trainable: empty names match every parameter")
        return self


class MixtureComponent(_Config):
    """One stream of a stage: a domain, and for long domains the document length it is cut to."""

    domain: str
    doc_len: int | None  # None: packed to the stage's sequence length
    proportion: float


class TrainStageConfig(StageConfig):
    """``kind: train``: continued pretraining, or SFT when its mixture holds sft domains."""

    kind: Literal["train"] = "train"
    seq_len: Tokens
    rope_theta: float = Field(gt=0)
    rope_scaling: RopeScalingConfig | None = None  # none: θ alone (ProLong); linear: LongLoRA's interpolation
    lora: LoraConfig | None = None  # none: every parameter trains (ProLong); set: an adapter (LongLoRA)
    steps: int = Field(gt=0)
    batch_tokens: Tokens  # global batch; accumulation = batch_tokens / (seq_len · micro_batch · dp)
    micro_batch_size: int = Field(default=1, gt=0)
    lr: float = Field(gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    warmup_steps: int | None = Field(default=None, ge=0)  # instead of warmup_ratio (LongLoRA: 20)
    # cosine: Table 9's (to min_lr_ratio × lr); constant_with_warmup: LongLoRA's, transformers' own
    lr_schedule: Literal["cosine", "constant_with_warmup"] = "cosine"
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    optim: OptimConfig = OptimConfig()
    # "domain" or "domain@LEN" (long domains cut to LEN-token documents) → proportion of samples.
    mixture: dict[str, float]
    init_from: str | None = None  # "model" or an earlier stage; default: the training stage declared before
    data_from: str = "data"  # the data stage whose streams it reads
    # sft: chat domains only, loss on assistant tokens; pretrain: long/short domains; auto: by the mixture
    objective: Literal["auto", "pretrain", "sft"] = "auto"
    keep_optimizer_state: bool = False  # carry Adam moments from init_from (ProLong stage 2)
    sequence_parallel: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=0, ge=0)  # 0: only the final checkpoint
    loss_chunk_size: int = Field(default=8192, gt=0)
    reorder_minibatches: bool = True
    activation_checkpointing: bool = True
    compile: bool = False
    seed: int | None = None
    ADDED_LATER = frozenset({"rope_scaling", "lora", "warmup_steps", "lr_schedule"})

    @property
    def warmup(self) -> int:
        """Warmup steps: ``warmup_steps``, or ``warmup_ratio`` of the stage's steps."""
        return self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_ratio * self.steps))

    @property
    def global_batch_size(self) -> int:
        return self.batch_tokens // self.seq_len

    def components(self) -> list[MixtureComponent]:
        out = []
        for key, proportion in self.mixture.items():
            domain, _, length = key.partition("@")
            out.append(MixtureComponent(domain=domain, doc_len=parse_tokens(length) if length else None,
                                        proportion=proportion))
        return out

    @model_validator(mode="after")
    def _shape(self):
        if self.batch_tokens % self.seq_len:
            raise ValueError(f"batch_tokens: {self.batch_tokens} is not a multiple of seq_len {self.seq_len}")
        if self.seq_len % self.sequence_parallel:
            raise ValueError(f"sequence_parallel: {self.sequence_parallel} does not divide seq_len {self.seq_len}")
        if self.sequence_parallel > 1 and self.micro_batch_size != 1:
            raise ValueError(f"micro_batch_size: must be 1 with sequence_parallel {self.sequence_parallel} "
                             "(a sequence-parallel group shares one sequence)")
        if self.warmup_steps is not None and self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps: {self.warmup_steps} is not fewer than the stage's {self.steps} steps")
        if self.lora is not None and self.keep_optimizer_state:
            raise ValueError("keep_optimizer_state: a LoRA stage trains new parameters; there are no Adam moments "
                             "to carry over")
        total = sum(self.mixture.values())
        if not self.mixture or not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"mixture: proportions sum to {total:.6g}, not 1")
        for key, p in self.mixture.items():
            if p <= 0:
                raise ValueError(f"mixture.{key}: proportion must be > 0, got {p}")
            _, _, length = key.partition("@")
            if length:
                try:
                    n = parse_tokens(length)
                except ValueError as e:
                    raise ValueError(f"mixture.{key}: {e}") from None
                if n > self.seq_len or self.seq_len % n:
                    raise ValueError(f"mixture.{key}: document length {n} must divide seq_len {self.seq_len}")
        return self
