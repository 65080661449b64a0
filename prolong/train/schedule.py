"""Learning-rate schedules: Table 9's (linear warmup, then cosine decay to ``min_lr_ratio × lr``),
and LongLoRA's ``constant_with_warmup`` — transformers' own, as its Trainer steps it.

Each stage builds a fresh schedule from step 0 — stage 2 "restarts the LR schedule" even when it
carries the optimizer's moments over from stage 1.
"""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Multiplier of the peak LR for optimizer step `step` (0-based)."""
    warmup = int(round(warmup_ratio * total_steps))
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule of a training stage's config (``lr_schedule``, its warmup and floor)."""
    if cfg.lr_schedule == "constant_with_warmup":
        from transformers import get_constant_schedule_with_warmup

        return get_constant_schedule_with_warmup(optimizer, cfg.warmup)
    ratio = cfg.warmup / cfg.steps
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, cfg.steps, ratio, cfg.min_lr_ratio))
