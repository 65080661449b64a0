"""Training engines: what owns the optimizer step and the sharded state.

The trainer talks to one small interface — forward, backward, step, save/load state, full weights
— so the loop, the exact token-averaged loss and the checkpoint protocol are the same whether the
model is sharded with FSDP2 (the default: ``parallelize`` + torch AdamW + DCP checkpoints) or by
DeepSpeed ZeRO-2/3 (``parallel.engine: deepspeed``, for teams that run DeepSpeed).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_model_state_dict, set_optimizer_state_dict)

from prolong.config import ParallelConfig, TrainStageConfig
from prolong.parallel.parallelize import parallelize
from prolong.parallel.world import World
from prolong.train.schedule import build_scheduler

log = logging.getLogger(__name__)


def build_optimizer(model: torch.nn.Module, cfg: TrainStageConfig) -> torch.optim.Optimizer:
    """AdamW; norms and biases (1-D parameters) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    on_gpu = any(p.is_cuda for p in params)  # fused CUDA kernel on GPUs; the plain loop on CPUs
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=on_gpu or None,
                             foreach=False if not on_gpu else None)


class Engine:
    """FSDP2 (or a single rank): torch AdamW, gradient clipping, LR schedule, DCP state."""

    name = "fsdp"

    def __init__(self, model: torch.nn.Module, cfg: TrainStageConfig, world: World):
        self.model, self.cfg, self.world = model, cfg, world
        self.optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(self.optimizer, cfg.steps, cfg.warmup_ratio, cfg.min_lr_ratio)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def __call__(self, *args):
        return self.model(*args)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        if hasattr(self.model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter once per step
            self.model.set_requires_gradient_sync(last_micro_batch)
        loss.backward()

    def step(self) -> float:
        """Clip, update, advance the schedule, clear gradients; returns the pre-clip gradient norm."""
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def restart_schedule(self) -> None:
        """After taking over another stage's optimizer state: this stage's hyperparameters, step 0's LR."""
        for group, decay, base in zip(self.optimizer.param_groups, (self.cfg.optim.weight_decay, 0.0),
                                      self.scheduler.base_lrs):
            group.update(initial_lr=self.cfg.lr, betas=self.cfg.optim.betas, eps=self.cfg.optim.eps,
                         weight_decay=decay, lr=base * self.scheduler.lr_lambdas[0](self.scheduler.last_epoch))

    # ------------------------------------------------------------ state
    def save_state(self, folder: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / "dcp"))

    def load_state(self, folder: Path, *, model: bool, optimizer: bool) -> None:
        # ask only for what is loaded: requesting the optimizer's state dict initialises Adam's state
        # (a zero step), which must not happen when only weights are taken over
        state = {}
        if model:
            state["model"] = get_model_state_dict(self.model)
        if optimizer:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        if model:
            set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=True))
        if optimizer:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Unsharded weights of the HF model on rank 0 (every rank must call this)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k.removeprefix("lm."): v for k, v in state.items()}


def build_engine(model: torch.nn.Module, cfg: TrainStageConfig, parallel: ParallelConfig, world: World,
                 param_dtype: torch.dtype, accumulation: int = 1) -> Engine:
    """``accumulation``: micro-batches per optimizer step on each rank (DeepSpeed must be told)."""
    if parallel.engine == "deepspeed":
        from prolong.parallel.deepspeed_engine import DeepSpeedEngine

        model = parallelize(model, world, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                            param_dtype=param_dtype, shard=False)
        return DeepSpeedEngine(model, cfg, parallel, world, param_dtype, accumulation)
    model = parallelize(model, world, activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile,
                        param_dtype=param_dtype)
    return Engine(model, cfg, world)
