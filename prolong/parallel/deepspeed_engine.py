"""DeepSpeed ZeRO-2/3 as the training engine (``parallel.engine: deepspeed``).

Our AdamW and LR schedule are handed to DeepSpeed as client objects, so optimisation is the same
as with FSDP2; DeepSpeed partitions optimizer states (ZeRO-2) and parameters too (ZeRO-3), clips
gradients and steps at each accumulation boundary. The loss keeps its exact token averaging:
DeepSpeed's own division by the accumulation count is switched off (``scale_wrt_gas=False``).
State is saved with DeepSpeed's checkpoint format inside our checkpoint folders.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from prolong.config.jobs import ParallelConfig
from prolong.config.train import TrainStageConfig
from prolong.parallel.optim import build_optimizer, restart_schedule
from prolong.parallel.world import World
from prolong.train.schedule import build_scheduler

log = logging.getLogger(__name__)
TAG = "deepspeed"


class DeepSpeedEngine:
    name = "deepspeed"

    def __init__(self, model: torch.nn.Module, cfg: TrainStageConfig, parallel: ParallelConfig, world: World,
                 param_dtype: torch.dtype, accumulation: int):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "torch_extensions"))
        import deepspeed

        self.cfg, self.world = cfg, world
        self.accumulation = accumulation
        optimizer = build_optimizer(model, cfg)
        scheduler = build_scheduler(optimizer, cfg)
        ds_config = {
            "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
            "gradient_accumulation_steps": self.accumulation,
            "gradient_clipping": cfg.optim.grad_clip,
            "zero_optimization": {"stage": parallel.zero_stage, "overlap_comm": world.device.type == "cuda"},
            "zero_allow_untested_optimizer": True,  # our torch AdamW, wrapped by ZeRO
            "bf16": {"enabled": param_dtype == torch.bfloat16},
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        if parallel.zero_stage == 3:
            # the loss reads the output embedding's weight inside the wrapper's forward
            deepspeed.zero.register_external_parameter(model, model.lm.get_output_embeddings().weight)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.model = self.ds.module
        self.zero_stage = parallel.zero_stage
        # a LoRA stage: checkpoints hold what trains; the frozen base comes from the base model again
        self.frozen = {n for n, p in self.model.named_parameters() if not p.requires_grad}
        log.info("deepspeed: ZeRO-%d, %d accumulation steps, bf16=%s", parallel.zero_stage, self.accumulation,
                 ds_config["bf16"]["enabled"])

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def __call__(self, *args):
        return self.ds(*args)

    def backward(self, loss: torch.Tensor, last_micro_batch: bool) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)
        self.ds.step()  # a no-op until the accumulation boundary

    def step(self) -> float:
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def restart_schedule(self) -> None:
        restart_schedule(self.optimizer, self.scheduler, self.cfg)

    def save_state(self, folder: Path) -> None:
        self.ds.save_checkpoint(str(folder), tag=TAG, save_latest=False, exclude_frozen_parameters=bool(self.frozen))

    def load_state(self, folder: Path, *, model: bool, optimizer: bool) -> None:
        path, _ = self.ds.load_checkpoint(str(folder), tag=TAG, load_module_strict=not self.frozen,
                                          load_optimizer_states=optimizer, load_lr_scheduler_states=False,
                                          load_module_only=not optimizer)
        if path is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint")

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        if self.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()  # gathered on rank 0
        else:
            state = self.model.state_dict() if self.world.is_main else {}
        return {k.removeprefix("lm."): v.detach().cpu() for k, v in (state or {}).items()
                if not (trainable_only and k in self.frozen)}
