"""Stop cleanly when the scheduler asks: checkpoint at the next step boundary, then exit 75.

Schedulers warn before they take GPUs away: Slurm sends SIGUSR1 ahead of the time limit (our
sbatch script asks for it with ``--signal``) and SIGTERM on preemption or ``scancel``; the local
backend sends SIGTERM on cancel. The handler only records the signal — a checkpoint cannot be
written from inside a signal handler halfway through a collective. After each optimizer step
every rank reports whether it saw a signal, so all ranks stop at the same step even when the
signal reached them at different moments, save one complete checkpoint, and exit with
:data:`REQUEUE_EXIT_CODE` ("checkpointed, run me again"), which the Slurm script turns into a
requeue and which a re-run of the stage resumes from.
"""

from __future__ import annotations

import logging
import signal

from prolong.errors import ProlongError
from prolong.jobs.base import REQUEUE_EXIT_CODE
from prolong.parallel.world import all_reduce_sum
from prolong.train.callbacks import Callback

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(ProlongError):
    """Training stopped on a scheduler's signal after saving a checkpoint."""

    exit_code = REQUEUE_EXIT_CODE


class StopOnSignal(Callback):
    """Install SIGTERM/SIGUSR1 handlers for the training loop; checkpoint and stop when one fires."""

    def __init__(self, stage: str):
        self.stage = stage
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _record(self, signum, _frame) -> None:
        if self.received is None:
            self.received = signum
            # logging from a handler can deadlock on the logging lock; print is enough here
            print(f"{signal.Signals(signum).name} received: stopping after this step with a checkpoint", flush=True)

    def on_train_start(self, trainer) -> None:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._record)

    def on_step_end(self, trainer, metrics: dict) -> None:
        # every rank takes part every step: a rank that decided alone would leave the others in a collective
        if all_reduce_sum(1 if self.received is not None else 0, trainer.world) == 0:
            return
        step = trainer.state.step
        if step >= trainer.total_steps:
            return  # the stage is finishing anyway; its final checkpoint and weights follow
        self.restore()
        if trainer.last_checkpoint_step != step:
            trainer.save_checkpoint()
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        raise Preempted(f"{self.stage}: stopped by {name} at step {step}/{trainer.total_steps}; "
                        f"checkpoint saved, running the stage again resumes from step {step}")

    def on_train_end(self, trainer) -> None:
        self.restore()

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
