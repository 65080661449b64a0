"""Parallelism and precision, in one place (torchtitan's pattern): the model code knows nothing of it.

``parallelize`` applies, in this fixed order, activation checkpointing per decoder layer →
optional ``torch.compile`` per layer → FSDP2 full sharding (per layer, then the root). Parameters
and optimizer states stay fp32 (the master copy); compute runs in ``param_dtype`` (bf16 on GPUs):
FSDP2's mixed-precision policy casts per layer and reduces gradients in fp32, and a single rank
without FSDP computes under autocast instead.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger(__name__)


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


def all_reduce_sum(value: float | int, world: World, device: torch.device | None = None) -> float:
    if not world.distributed:
        return value
    t = torch.tensor(float(value), dtype=torch.float64, device=device or world.device)
    dist.all_reduce(t)
    return t.item()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of an HF causal LM (Llama, Qwen2, Mistral, ... all name them `layers`)."""
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return module
    raise ValueError(f"{type(model).__name__}: cannot find its decoder layers")


def parallelize(model: nn.Module, world: World, *, activation_checkpointing: bool, compile: bool,
                param_dtype: torch.dtype, shard: bool = True) -> nn.Module:
    """Apply AC → compile → FSDP2 to `model` (the training wrapper around the HF model).

    ``shard=False`` stops after compile: the DeepSpeed engine shards and casts the model itself.
    """
    layers = decoder_layers(model)
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, layer in enumerate(layers):
            layers[i] = checkpoint_wrapper(layer, preserve_rng_state=False)
    if compile:
        for i, layer in enumerate(layers):
            layers[i] = torch.compile(layer, fullgraph=False)
    if not shard:
        pass
    elif world.distributed:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        for i, layer in enumerate(layers):
            # the last layer's parameters are needed again at once by backward: keep them gathered
            fully_shard(layer, mp_policy=mp, reshard_after_forward=i < len(layers) - 1)
        fully_shard(model, mp_policy=mp)
    elif param_dtype != torch.float32:
        model.autocast_dtype = param_dtype
    log.info("parallelize: activation checkpointing=%s compile=%s fsdp=%s (world %d)", activation_checkpointing,
             compile, shard and world.distributed, world.world_size)
    return model
