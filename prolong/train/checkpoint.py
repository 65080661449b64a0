"""Sharded checkpoints, kept in the artifact store.

``{run}/{stage}/checkpoints/step_00000040/`` holds the engine's shards of model and optimizer
(torch.distributed.checkpoint for FSDP2, DeepSpeed's format for ZeRO), the trainer state (step,
scheduler, data-loader position, input key, θ) as JSON, each rank's RNG state, and — written last —
``COMPLETE``, which lists every file of the checkpoint with its size. Only complete checkpoints
whose files still have those sizes are resumed from (a truncated newest checkpoint falls back to
the one before it); older ones are pruned after a newer one completes. Shards are written to a
node-shared staging folder and then uploaded (for a local store, written in place).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from prolong import layout
from prolong.errors import StageError, StoreError
from prolong.integrity import checkpoint_damage
from prolong.layout import COMPLETE, complete_steps, step_dir
from prolong.parallel.world import World, all_reduce_sum
from prolong.store import Store, describe_os_error

log = logging.getLogger(__name__)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


class Checkpointer:
    def __init__(self, store: Store, prefix: str, world: World, staging: Path | None = None, keep: int = 2):
        """``prefix``: the stage folder. ``staging``: a folder shared by the ranks of a node (remote
        stores write shards there first)."""
        self.store, self.world, self.keep = store, world, keep
        self.stage_prefix = prefix
        self.prefix = layout.checkpoints(prefix)
        self._own_staging = staging is None and not store.is_local
        self._staging = staging if staging is not None else (Path(tempfile.mkdtemp(prefix="prolong-ckpt-"))
                                                             if not store.is_local else None)

    # ------------------------------------------------------------ discovery
    def complete_steps(self, prefix: str | None = None) -> list[int]:
        """Complete checkpoints of this stage, or of the stage folder ``prefix``."""
        return complete_steps(self.store, prefix or self.stage_prefix)

    def usable_steps(self, prefix: str | None = None) -> list[int]:
        """Complete checkpoints whose files are as they were saved, ascending; damaged ones are named
        in the log and skipped."""
        out = []
        for step in self.complete_steps(prefix):
            problem = checkpoint_damage(self.store, prefix or self.stage_prefix, step)
            if problem is None:
                out.append(step)
            else:
                log.warning("checkpoint %s is damaged (%s): not resuming from it",
                            self.store.uri(layout.checkpoint(prefix or self.stage_prefix, step)), problem)
        return out

    def latest(self) -> int | None:
        steps = self.usable_steps()
        return steps[-1] if steps else None

    def trainer_state(self, step: int) -> dict:
        rel = f"{self.prefix}/{step_dir(step)}/trainer.json"
        return self.store.read_json(rel) if self.store.exists(rel) else {}

    def _local_dir(self, rel: str, *, download: bool) -> Path:
        if self.store.is_local:
            return Path(self.store.path(rel))
        local = self._staging / rel
        if download and self.world.local_rank == 0 and not (local / COMPLETE).exists():
            self.store.get_dir(rel, local)
        _barrier(self.world)
        return local

    # ------------------------------------------------------------ save
    def save(self, step: int, engine, trainer_state: dict) -> str:
        rel = f"{self.prefix}/{step_dir(step)}"
        local = self._local_dir(rel, download=False)
        if self.world.is_main and self.store.exists(rel):
            self.store.delete(rel)  # an incomplete leftover of a crashed save
        _barrier(self.world)
        failure = None
        try:
            local.mkdir(parents=True, exist_ok=True)
            engine.save_state(local)
            torch.save(rng_state(), local / f"rng_rank{self.world.rank}.pt")
            if self.world.is_main:
                (local / "trainer.json").write_text(json.dumps({**trainer_state, "world_size": self.world.world_size},
                                                               indent=2))
        except (Exception, CheckpointException) as e:  # torch's zip writer says "unexpected pos 704 vs 598" on a full disk
            failure = self._why(e, local)
        # every rank learns of a failure on any rank: none may wait in a barrier for a rank that gave up
        if all_reduce_sum(1 if failure else 0, self.world):
            raise StoreError(f"{self.store.uri(rel)}: saving the checkpoint failed "
                             f"({failure or 'on another rank; see its log lines'})")
        if not self.store.is_local and self.world.local_rank == 0:
            self.store.put_dir(local, rel)
        _barrier(self.world)
        if self.world.is_main:
            # COMPLETE last, listing every file: a later truncation shows as a size that differs
            files = self.store.sizes(rel)
            self.store.write_bytes_atomic(f"{rel}/{COMPLETE}", json.dumps({"step": step, "files": files},
                                                                           indent=1, sort_keys=True).encode())
            self._prune(step)
        _barrier(self.world)
        log.info("checkpoint saved: %s", self.store.uri(rel))
        return rel

    @staticmethod
    def _why(e: Exception, local: Path) -> str:
        if isinstance(e, OSError):
            return describe_os_error(e)
        try:
            free = shutil.disk_usage(local).free
        except OSError:
            free = None
        if free is not None and free < 64 << 20:
            return f"no space left on device ({free} bytes free)"
        text = str(e).strip().splitlines()
        return f"{type(e).__name__}: {text[-1] if text else ''}"

    def _prune(self, newest: int) -> None:
        for step in self.complete_steps()[:-self.keep]:
            if step != newest:
                self.store.delete(f"{self.prefix}/{step_dir(step)}")

    # ------------------------------------------------------------ load
    def load(self, step: int, engine, *, prefix: str | None = None, model_too: bool = True,
             optimizer_too: bool = True, restore_rng: bool = True) -> dict:
        """Restore model and/or optimizer from a complete checkpoint (another stage's: ``prefix`` is
        that stage's folder)."""
        rel = layout.checkpoint(prefix or self.stage_prefix, step)
        local = self._local_dir(rel, download=True)
        try:
            engine.load_state(local, model=model_too, optimizer=optimizer_too)
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException with rank tracebacks
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise StageError(f"{self.store.uri(rel)}: checkpoint does not match this model/optimizer ({first})") from None
        trainer_state = json.loads((local / "trainer.json").read_text()) if (local / "trainer.json").exists() else {}
        rng_file = local / f"rng_rank{self.world.rank}.pt"
        if restore_rng and rng_file.exists() and trainer_state.get("world_size") == self.world.world_size:
            set_rng_state(torch.load(rng_file, weights_only=False))
        log.info("checkpoint loaded: %s (%s)", self.store.uri(rel),
                 "+".join(k for k, on in (("model", model_too), ("optimizer", optimizer_too)) if on))
        return trainer_state

    def close(self) -> None:
        if self._own_staging:
            shutil.rmtree(self._staging, ignore_errors=True)
