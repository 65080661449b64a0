"""Training engines: what owns the optimizer step and the sharded state.

The trainer talks to one small interface, :class:`Engine` — forward, backward, step, save/load
state, full weights — so the loop, the exact token-averaged loss and the checkpoint protocol are
the same whether the model is sharded with FSDP2 (the default: ``parallelize`` + torch AdamW + DCP
checkpoints, prolong.parallel.fsdp_engine) or by DeepSpeed ZeRO-2/3 (``parallel.engine:
deepspeed``, prolong.parallel.deepspeed_engine). The two implementations stand side by side;
neither derives from the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from prolong.config.jobs import ParallelConfig
from prolong.config.train import TrainStageConfig
from prolong.parallel.parallelize import parallelize
from prolong.parallel.world import World


class Engine(Protocol):
    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object

    @property
    def lr(self) -> float: ...

    def __call__(self, *args) -> torch.Tensor: ...

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None: ...

    def step(self) -> float:
        """Clip, update, advance the schedule, clear gradients; returns the pre-clip gradient norm."""

    def restart_schedule(self) -> None:
        """After taking over another stage's optimizer state: this stage's hyperparameters and LR."""

    def save_state(self, folder: Path) -> None: ...

    def load_state(self, folder: Path, *, model: bool, optimizer: bool) -> None: ...

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Unsharded weights of the HF model on rank 0 (every rank must call this); ``trainable_only``:
        the parameters that train (a LoRA stage's adapter and fully trained parameters)."""


def build_engine(model: torch.nn.Module, cfg: TrainStageConfig, parallel: ParallelConfig, world: World,
                 param_dtype: torch.dtype, accumulation: int = 1) -> Engine:
    """``accumulation``: micro-batches per optimizer step on each rank (DeepSpeed must be told)."""
    if parallel.engine == "deepspeed":
        from prolong.parallel.deepspeed_engine import DeepSpeedEngine

        model = parallelize(model, world, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                            param_dtype=param_dtype, shard=False)
        return DeepSpeedEngine(model, cfg, parallel, world, param_dtype, accumulation)
    from prolong.parallel.fsdp_engine import FSDPEngine

    model = parallelize(model, world, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                        param_dtype=param_dtype)
    return FSDPEngine(model, cfg, world)
