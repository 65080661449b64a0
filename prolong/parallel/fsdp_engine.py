"""The default training engine: FSDP2 full sharding (or one rank), torch AdamW, DCP checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     get_state_dict, set_model_state_dict, set_optimizer_state_dict)

from prolong.config.train import TrainStageConfig
from prolong.parallel.optim import build_optimizer, restart_schedule
from prolong.parallel.world import World
from prolong.train.schedule import build_scheduler

log = logging.getLogger(__name__)


class FSDPEngine:
    """FSDP2 (or a single rank): torch AdamW, gradient clipping, LR schedule, DCP state."""

    name = "fsdp"

    def __init__(self, model: torch.nn.Module, cfg: TrainStageConfig, world: World):
        self.model, self.cfg, self.world = model, cfg, world
        self.optimizer = build_optimizer(model, cfg)
        # a LoRA stage: the frozen base comes from the base model again; checkpoints hold what trains
        self._options = StateDictOptions(ignore_frozen_params=any(not p.requires_grad for p in model.parameters()))
        self.scheduler = build_scheduler(self.optimizer, cfg)

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
        restart_schedule(self.optimizer, self.scheduler, self.cfg)

    # ------------------------------------------------------------ state
    def save_state(self, folder: Path) -> None:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=self._options)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(folder / "dcp"))

    def load_state(self, folder: Path, *, model: bool, optimizer: bool) -> None:
        # ask only for what is loaded: requesting the optimizer's state dict initialises Adam's state
        # (a zero step), which must not happen when only weights are taken over
        state = {}
        if model:
            state["model"] = get_model_state_dict(self.model, options=self._options)
        if optimizer:
            state["optim"] = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        if model:
            # without the frozen base, strictness is dcp.load's: it fails on any requested key it lacks
            set_model_state_dict(self.model, state["model"],
                                 options=StateDictOptions(strict=not self._options.ignore_frozen_params,
                                                          ignore_frozen_params=self._options.ignore_frozen_params))
        if optimizer:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        """Unsharded weights of the HF model on rank 0 (every rank must call this)."""
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                          ignore_frozen_params=trainable_only))
        return {k.removeprefix("lm."): v for k, v in state.items()}
