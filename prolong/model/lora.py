"""LoRA through peft, as LongLoRA trains it: adapters on the attention projections, plus ("LoRA+")
the embeddings and norms trained in full.

A LoRA stage's model is the HF model with peft's LoRA layers injected in place (``get_peft_model``
wraps it, the wrapper's ``base_model.model`` *is* the HF model), so the training wrapper, FSDP2 and
DeepSpeed see a plain causal LM whose base weights do not require gradients. What the stage leaves
is LongLoRA's pair: a peft adapter folder (``adapter_config.json``, ``adapter_model.safetensors``)
and the fully trained parameters (``trainable_params.safetensors``, in the HF model's names — the
``trainable_params.bin`` of LongLoRA's fine-tune.py). :func:`merge` turns the pair and the base
model into full weights, as LongLoRA's merge_lora_weights_and_save_hf_model.py does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from prolong.config.train import LoraConfig
from prolong.errors import ConfigError, StageError

log = logging.getLogger(__name__)
TRAINABLE_FILE = "trainable_params.safetensors"
ADAPTER = "default"  # peft's adapter name; removed from the keys it saves


@dataclass
class LoraModel:
    peft_model: nn.Module  # peft's wrapper; its base_model.model is the HF model being trained
    trainable: int  # parameters that train (adapter + embeddings/norms)
    total: int

    def summary(self) -> str:
        return (f"{self.trainable / 1e6:.3f}M of {self.total / 1e6:.3f}M parameters train "
                f"({100 * self.trainable / self.total:.2f}%)")


def apply_lora(lm: nn.Module, cfg: LoraConfig, frozen_dtype: torch.dtype, field: str) -> LoraModel:
    """Inject LoRA into ``lm`` in place; the base frozen (cast to ``frozen_dtype``), adapters and the
    parameters named by ``cfg.trainable`` fp32 (the master weights AdamW updates)."""
    import peft

    config = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                             target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    try:
        peft_model = peft.get_peft_model(lm, config)
    except ValueError as e:  # "Target modules {...} not found in the base model"
        raise ConfigError(f"{field}.target_modules: {str(e).splitlines()[0]}") from None
    matched = set()
    for name, p in lm.named_parameters():
        hits = [k for k in cfg.trainable if k in name]
        if hits and "lora_" not in name:
            p.requires_grad_(True)
            matched.update(hits)
    missing = [k for k in cfg.trainable if k not in matched]
    if missing:
        raise ConfigError(f"{field}.trainable: no parameter of {type(lm).__name__} is named like {missing} "
                          f"(its names: {', '.join(sorted({n.split('.')[-2] for n, _ in lm.named_parameters()}))})")
    for p in lm.parameters():
        if p.is_floating_point():  # an NF4 base (QLoRA) stays as bitsandbytes packed it
            p.data = p.data.to(torch.float32 if p.requires_grad else frozen_dtype)
    out = LoraModel(peft_model, trainable=sum(p.numel() for p in lm.parameters() if p.requires_grad),
                    total=sum(p.numel() for p in lm.parameters()))
    log.info("LoRA r=%d alpha=%g on %s, full training of %s: %s", cfg.r, cfg.alpha, ", ".join(cfg.target_modules),
             ", ".join(cfg.trainable) or "nothing else", out.summary())
    return out


def trainable_names(lm: nn.Module) -> set[str]:
    return {n for n, p in lm.named_parameters() if p.requires_grad}


def save_adapter(lora: LoraModel, state: dict[str, torch.Tensor], out: Path, base_ref: str) -> None:
    """The adapter (peft's format) and the fully trained parameters, from ``state`` — the gathered
    weights of the HF model (the engine's full state dict, in its names)."""
    from safetensors.torch import save_file

    lm = lora.peft_model.base_model.model
    trained = trainable_names(lm)
    full = {k: v.contiguous() for k, v in state.items() if k in trained and "lora_" not in k}
    config = lora.peft_model.peft_config[ADAPTER]
    config.base_model_name_or_path = base_ref
    # peft picks the adapter's tensors out of the wrapper's state dict (keys under base_model.model.)
    lora.peft_model.save_pretrained(str(out), state_dict={f"base_model.model.{k}": v for k, v in state.items()},
                                    safe_serialization=True, save_embedding_layers=False)
    save_file(full, str(out / TRAINABLE_FILE), metadata={"format": "pt"})


def merge(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """``base`` with the fully trained parameters loaded and the adapter merged into its weights
    (peft's ``merge_and_unload``): a plain HF model. The embeddings are resized first when the
    trained ones have more rows (a pad token added for training, as LongLoRA's SFT does)."""
    import peft
    from safetensors.torch import load_file

    path = adapter_dir / TRAINABLE_FILE
    trained = load_file(str(path)) if path.exists() else {}
    embed = base.get_input_embeddings()
    rows = {v.shape[0] for k, v in trained.items() if v.ndim == 2 and v.shape[1] == embed.weight.shape[1]
            and v.shape[0] != embed.weight.shape[0] and ("embed" in k or "lm_head" in k)}
    if rows:
        base.resize_token_embeddings(max(rows))
    own = dict(base.named_parameters())
    unknown = [k for k in trained if k not in own]
    if unknown:
        raise StageError(f"{path}: parameters {unknown[:3]} are not in the base model "
                         f"({type(base).__name__}); was the adapter trained on another model?")
    for k, v in trained.items():
        if own[k].shape != v.shape:
            raise StageError(f"{path}: {k} has shape {tuple(v.shape)}, the base model's {tuple(own[k].shape)}")
        with torch.no_grad():
            own[k].copy_(v.to(own[k].dtype))
    try:
        model = peft.PeftModel.from_pretrained(base, str(adapter_dir))
    except (ValueError, RuntimeError, OSError) as e:
        raise StageError(f"{adapter_dir}: the adapter does not load onto the base model ({str(e).splitlines()[0]})") \
            from None
    return model.merge_and_unload()
