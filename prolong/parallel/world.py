"""The job's processes: rank, world size, device, the process group, and collectives the loop needs.

Torch is imported here; the torch-free parallelism arithmetic (ranks, sequence-parallel groups,
accumulation) is prolong.parallel.dims.
"""

from __future__ import annotations

import datetime
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist



@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_world(timeout_minutes: float = 30) -> World:
    """Read torchrun's environment; start a process group when there is more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(minutes=timeout_minutes))
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def node_scratch(world: World, name: str) -> Path:
    """A scratch folder shared by the ranks of this node and unique to this job (torchrun's run id):
    mosaicml-streaming needs one local cache per node that every local rank agrees on."""
    job = os.environ.get("TORCHELASTIC_RUN_ID") or str(os.getppid() if world.distributed else os.getpid())
    path = Path(tempfile.gettempdir()) / "prolong-scratch" / f"{name}-{job}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def remove_scratch(world: World, path: Path) -> None:
    if world.distributed:
        dist.barrier()
    if world.local_rank == 0:
        shutil.rmtree(path, ignore_errors=True)


def shutdown() -> None:
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sums(values: list[float | int], world: World) -> list[float]:
    """Several sums across ranks in one collective."""
    if not world.distributed:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=world.device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum(value: float | int, world: World, device: torch.device | None = None) -> float:
    if not world.distributed:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device or world.device)
    dist.all_reduce(t)
    return t.item()


def on_main(world: World, fn):
    """Run ``fn`` on rank 0 only (a check that reads the store once); if it raises, every rank
    raises the same error, so no rank is left waiting in a collective for one that gave up."""
    error = result = None
    if world.is_main:
        try:
            result = fn()
        except Exception as e:
            error = e
    if world.distributed:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error
    return result


def raise_together(world: World, error: Exception | None) -> None:
    """Raise ``error`` on this rank, and a StageError on every other rank when any rank failed."""
    failed = all_reduce_sum(1 if error is not None else 0, world)
    if error is not None:
        raise error
    if failed:
        from prolong.errors import StageError

        raise StageError("another rank failed (its error is in this job's log)")
