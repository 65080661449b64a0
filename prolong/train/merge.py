"""The merge stage as a job: a LoRA stage's adapter + fully trained parameters merged into the base
it adapted, saved as full HF weights (prolong.stages.merge). One process; a GPU when there is one.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from prolong.data.tokenize import load_tokenizer
from prolong.layout import stage_prefix
from prolong.manifest import StageRecorder, read_manifest
from prolong.model.load import DTYPES, load_model
from prolong.model.lora import merge
from prolong.model.rope import write_portable_config
from prolong.parallel.world import init_world
from prolong.recipe import Recipe
from prolong.store import Store
from prolong.train.build import upstream_model_dir, verify_upstream

log = logging.getLogger(__name__)


def lora_base(recipe: Recipe, store: Store, run: str, lora_stage: str, world, scratch: Path) -> str:
    """The model ``lora_stage`` adapted: the recipe's, or its upstream stage's checked weights (every
    rank calls this)."""
    init = recipe.init_source(lora_stage)
    return recipe.model.path if init == "model" else upstream_model_dir(store, run, init, world, scratch)


def merge_to_hf(recipe: Recipe, lora_stage: str, base_ref: str, adapter: Path, out: Path, device) -> dict:
    """``base_ref`` as ``lora_stage`` adapted it (its θ and RoPE scaling, fp32 for an exact merge) with
    the adapter folder ``adapter`` merged in, saved to ``out`` as HF weights in the model's dtype with
    the adapter's tokenizer. Returns the merge's metrics."""
    cfg = recipe.train_stage(lora_stage)
    init = recipe.init_source(lora_stage)
    base = load_model(base_ref, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, seq_len=cfg.seq_len,
                      dtype="float32", revision=recipe.model.revision if init == "model" else None,
                      device=device, field=lora_stage)
    merged_modules = sum(1 for n, _ in base.named_modules() if n.endswith(tuple(cfg.lora.target_modules)))
    model = merge(base, adapter)
    dtype = DTYPES[recipe.model.dtype]
    model.config.dtype = dtype
    with torch.no_grad():
        model.save_pretrained(out, state_dict={k: v.to(dtype) for k, v in model.state_dict().items()},
                              safe_serialization=True)
    write_portable_config(out)  # θ and scaling where transformers 4, converters and servers read them
    load_tokenizer(str(adapter)).save_pretrained(out)  # as trained: with any token the stage added
    params = sum(p.numel() for p in model.parameters())
    log.info("merged %s's adapter into %s (%d modules, %.1fM parameters)", lora_stage, base_ref, merged_modules,
             params / 1e6)
    return {"merged_modules": merged_modules, "params": params, "rope_theta": cfg.rope_theta}


def run_merge_stage(recipe: Recipe, store: Store, run: str, stage: str) -> None:
    world = init_world()
    lora_stage = recipe.stages[stage].model_from
    adapter_sub = read_manifest(store, run, lora_stage).artifacts["adapter"]
    rec = StageRecorder(store, run, recipe, stage)
    with tempfile.TemporaryDirectory(prefix=f"prolong-{stage}-") as tmp_:
        tmp = Path(tmp_)
        adapter_rel = f"{stage_prefix(run, lora_stage)}/{adapter_sub}"
        adapter = Path(store.local_path(adapter_rel)) if store.is_local else store.get_dir(adapter_rel, tmp / "adapter")
        verify_upstream(store, run, stage, lora_stage, adapter_sub, local_dir=None if store.is_local else adapter)
        base_ref = lora_base(recipe, store, run, lora_stage, world, tmp)
        rec.invalidate()  # every input checked
        metrics = merge_to_hf(recipe, lora_stage, base_ref, adapter, tmp / "hf", world.device)
        rec.put_dir(tmp / "hf", "hf")
    rec.finish(metrics=metrics, artifacts={"hf_model": "hf"})
