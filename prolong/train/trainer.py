"""A small training loop; everything optional is a callback.

One optimizer step = ``accumulation`` micro-batches per rank. Before the first backward of a step
the loop knows every micro-batch of the step, which gives it two things the paper needs (§A.3):

* the exact token-averaged loss: the global number of target tokens (all ranks, all micro-batches)
  is summed first, and each micro-batch contributes Σ its token losses / that count;
* minibatch reordering: micro-batches run in order of their attention cost (Σ document length²),
  so ranks stepping through accumulation in lockstep process similar costs at the same time.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch

from prolong.config import TrainStageConfig
from prolong.errors import StageError
from prolong.parallel.world import World, all_reduce_sum, all_reduce_sums
from prolong.parallel.engine import Engine
from prolong.train.batch import MicroBatch
from prolong.train.callbacks import Callback

log = logging.getLogger(__name__)


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global sequences consumed
    tokens_seen: int = 0  # global tokens consumed


class Trainer:
    """``batches`` yields this rank's micro-batches (already sharded for sequence parallelism by the
    batch layer, prolong.train.batch.shard_batches); throughput and MFU are a callback
    (prolong.train.callbacks.Throughput), from the counts each step reports."""

    def __init__(self, engine: Engine, batches: Iterator[MicroBatch], cfg: TrainStageConfig, world: World,
                 *, accumulation: int, callbacks: list[Callback], state: TrainerState | None = None,
                 save_checkpoint: Callable[["Trainer"], None] | None = None):
        self.engine = engine
        self.batches, self.cfg, self.world = batches, cfg, world
        self.accumulation = accumulation
        self.callbacks = callbacks
        self.state = state or TrainerState()
        self.start_step = self.state.step
        self.total_steps = cfg.steps
        self.last_checkpoint_step = self.state.step if self.state.step else None
        self._save = save_checkpoint

    def save_checkpoint(self) -> None:
        if self._save is not None:
            self._save(self)
            self.last_checkpoint_step = self.state.step
            for cb in self.callbacks:
                cb.on_checkpoint(self)

    def train_step(self, micro_batches: list[MicroBatch]) -> dict:
        t0 = time.perf_counter()
        if self.cfg.reorder_minibatches:  # on whole samples' costs, so a sequence-parallel group agrees
            micro_batches = sorted(micro_batches, key=lambda mb: mb.sample_cost, reverse=True)
        # one all-reduce for the step's global counts: target tokens (the loss's divisor), tokens,
        # attention cost (Σ len², for FLOP accounting), sequence-parallel samples and micro-batches
        counts = all_reduce_sums([sum(mb.n_targets for mb in micro_batches), sum(mb.n_tokens for mb in micro_batches),
                                  sum(mb.attention_cost for mb in micro_batches),
                                  sum(mb.chunk is not None for mb in micro_batches), len(micro_batches)], self.world)
        global_targets, tokens, attention_cost, sp_samples, n_micro = counts
        if global_targets == 0:
            raise RuntimeError(f"step {self.state.step + 1}: no token of the batch has a target (all masked)")
        # FSDP averages gradients over ranks; scale so the result is Σ losses / global token count
        scale = self.world.world_size / global_targets
        self.engine.model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.world.device)
        lr = self.engine.lr
        for i, mb in enumerate(micro_batches):
            mb = mb.to(self.world.device)
            loss = self.engine(mb.input_ids, mb.targets, mb.layout(self.world.device))
            self.engine.backward(loss * scale, last_micro_batch=i == len(micro_batches) - 1)
            loss_sum += loss.detach().double()
        grad_norm = self.engine.step()

        loss_total = all_reduce_sum(loss_sum.item(), self.world)
        if not math.isfinite(loss_total) or not math.isfinite(float(grad_norm)):
            raise StageError(f"step {self.state.step + 1}: loss or gradient is not finite "
                             f"(loss {loss_total / global_targets}, grad norm {float(grad_norm)})")
        self.state.step += 1
        self.state.samples_seen += self.cfg.global_batch_size
        self.state.tokens_seen += int(tokens)
        elapsed = time.perf_counter() - t0
        metrics = {"step": self.state.step, "loss": loss_total / global_targets, "lr": lr, "grad_norm": float(grad_norm),
                   "target_tokens": int(global_targets), "tokens": int(tokens), "tokens_seen": self.state.tokens_seen,
                   "step_time_s": elapsed, "tokens_per_s": tokens / elapsed, "attention_cost": int(attention_cost)}
        if any(mb.sequence_parallel is not None or mb.shared for mb in micro_batches):
            # every rank of a group agrees, so the world-wide mean is the share of samples split
            metrics["sequence_parallel_share"] = sp_samples / n_micro
        return metrics

    def _next_step_batches(self) -> list[MicroBatch]:
        try:
            return [next(self.batches) for _ in range(self.accumulation)]
        except StopIteration:
            raise RuntimeError(f"the data loader ran out at step {self.state.step + 1} of {self.total_steps}") from None

    def fit(self) -> None:
        for cb in self.callbacks:
            cb.on_train_start(self)
        while self.state.step < self.total_steps:
            metrics = self.train_step(self._next_step_batches())
            for cb in self.callbacks:
                cb.on_step_end(self, metrics)
        for cb in self.callbacks:
            cb.on_train_end(self)

    def state_dict(self) -> dict:
        return {**asdict(self.state), "scheduler": self.engine.scheduler.state_dict()}
