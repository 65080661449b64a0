"""Loading models and tokenizers: any HF causal LM by hub id, local path, or ``builtin:NAME``."""

from __future__ import annotations

import logging

import torch

from prolong import assets
from prolong.errors import ConfigError
from prolong.model import attention
from prolong.model.rope import set_rope_scaling, set_rope_theta, uses_rope

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def load_config(ref: str, revision: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(assets.resolve(ref), revision=revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load a model config from {ref!r} ({str(e).splitlines()[0]})") from None


def check_long_context(config, ref: str, rope_theta: float, seq_len: int | None, field: str) -> None:
    """RoPE models extend to any length through θ; models with learned positions cannot."""
    if not uses_rope(config):
        raise ConfigError(f"{field}.rope_theta: model {ref!r} ({config.model_type}) has no rotary position "
                          f"embedding, so θ={rope_theta:g} cannot apply; long-context training needs a RoPE model")
    if seq_len and getattr(config, "max_position_embeddings", None) and seq_len > config.max_position_embeddings:
        log.info("%s: max_position_embeddings %d → %d (RoPE θ %g)", field, config.max_position_embeddings, seq_len,
                 rope_theta)
        config.max_position_embeddings = seq_len


def load_model(ref: str, *, rope_theta: float, seq_len: int | None = None, dtype: str = "bfloat16",
               revision: str | None = None, device: torch.device | str = "cpu", field: str = "model",
               rope_scaling=None, quantize: str | None = None):
    """An HF causal LM with θ written into its config and document-masked attention registered.

    The model stays a plain transformers model: parallelism is applied afterwards by
    ``prolong.parallel.parallelize``. ``quantize="nf4"``: QLoRA's base, as LongLoRA's
    supervised-fine-tune-qlora.py loads it (bitsandbytes NF4, double quantization, bf16 compute).
    """
    from transformers import AutoModelForCausalLM

    path = assets.resolve(ref)
    config = load_config(ref, revision)
    original = getattr(config, "max_position_embeddings", None)  # before it grows to the stage's length
    check_long_context(config, ref, rope_theta, seq_len, field)
    set_rope_theta(config, rope_theta)
    # ``rope_scaling``: a RopeScalingConfig; the stage's, or none (any earlier stage's is replaced)
    set_rope_scaling(config, rope_scaling.parameters(original) if rope_scaling is not None else None)
    config.use_cache = False  # a KV cache in training would silently break document isolation
    impl = attention.register()
    extra = {}
    if quantize == "nf4":
        if torch.device(device).type != "cuda":
            raise ConfigError(f"{field}.lora.quantize: nf4 (QLoRA) runs on GPUs only; this job's device is {device}")
        from transformers import BitsAndBytesConfig

        extra = {"quantization_config": BitsAndBytesConfig(
            load_in_4bit=True, llm_int8_threshold=6.0, llm_int8_has_fp16_weight=False,
            bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_use_double_quant=True, bnb_4bit_quant_type="nf4"),
            "device_map": {"": torch.device(device)}}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, config=config, revision=revision, dtype=DTYPES[dtype],
                                                     attn_implementation=impl, **extra)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: cannot load model {ref!r} ({str(e).splitlines()[0]})") from None
    log.info("loaded %s (%s, %.1fM parameters), rope θ=%g%s", ref, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, rope_theta,
             f", scaling {rope_scaling.type} ×{rope_scaling.factor:g}" if rope_scaling is not None else "")
    return model if quantize else model.to(device)
