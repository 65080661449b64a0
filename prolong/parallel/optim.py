"""The optimizer every engine uses: AdamW as in Table 9, and the LR schedule's restart at a hand-off."""

from __future__ import annotations

import torch

from prolong.config.train import TrainStageConfig


def build_optimizer(model: torch.nn.Module, cfg: TrainStageConfig) -> torch.optim.Optimizer:
    """AdamW over the parameters that train; norms and biases (1-D parameters) are not decayed."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.optim.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    on_gpu = any(p.is_cuda for p in params)  # fused CUDA kernel on GPUs; the plain loop on CPUs
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, fused=on_gpu or None,
                             foreach=False if not on_gpu else None)


def restart_schedule(optimizer: torch.optim.Optimizer, scheduler, cfg: TrainStageConfig) -> None:
    """After taking over another stage's optimizer state (its Adam moments): this stage's
    hyperparameters, and step 0's LR of this stage's schedule."""
    for group, decay, base in zip(optimizer.param_groups, (cfg.optim.weight_decay, 0.0), scheduler.base_lrs):
        group.update(initial_lr=cfg.lr, betas=cfg.optim.betas, eps=cfg.optim.eps, weight_decay=decay,
                     lr=base * scheduler.lr_lambdas[0](scheduler.last_epoch))
