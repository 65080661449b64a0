"""Parallelism and precision, in one place (torchtitan's pattern): the model code knows nothing of it.

``parallelize`` applies, in this fixed order, activation checkpointing per decoder layer →
optional ``torch.compile`` per layer → FSDP2 full sharding (per layer, then the root). Parameters
and optimizer states stay fp32 (the master copy); compute runs in ``param_dtype`` (bf16 on GPUs):
FSDP2's mixed-precision policy casts per layer and reduces gradients in fp32, and a single rank
without FSDP computes under autocast instead.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from prolong.parallel.world import World

log = logging.getLogger(__name__)


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
