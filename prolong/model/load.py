"""Loading models and tokenizers: any HF causal LM by hub id, local path, or ``builtin:NAME``."""

from __future__ import annotations

import logging

import torch

from prolong import assets
from prolong.errors import ConfigError
from prolong.model import attention
from prolong.model.rope import set_rope_theta

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_config(ref: str, revision: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(assets.resolve(ref), revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load a model config from {ref!r} ({str(e).splitlines()[0]})") from None


def load_model(ref: str, *, rope_theta: float, dtype: str = "bfloat16", revision: str | None = None,
               device: torch.device | str = "cpu"):
    """An HF causal LM with θ written into its config and document-masked attention registered.

    The model stays a plain transformers model: parallelism is applied afterwards by
    ``prolong.parallel.parallelize``.
    """
    from transformers import AutoModelForCausalLM

    path = assets.resolve(ref)
    config = load_config(ref, revision)
    set_rope_theta(config, rope_theta)
    config.use_cache = False  # a KV cache in training would silently break document isolation
    impl = attention.register()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, revision=revision, dtype=DTYPES[dtype],
                                                     attn_implementation=impl)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load model {ref!r} ({str(e).splitlines()[0]})") from None
    log.info("loaded %s (%s, %.1fM parameters), rope θ=%g", ref, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, rope_theta)
    return model.to(device)
