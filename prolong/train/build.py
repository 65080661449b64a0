"""Building what a training stage's job trains, from the recipe: the model (from the base or the
upstream stage's weights, checked against its manifest), its attention backend, the parallelism and
the engine — one builder for training (prolong.train.main) and checkpoint export (prolong.train.export).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from prolong.errors import ConfigError, ProlongError, StageError
from prolong.integrity import outputs_under, verify_outputs
from prolong.layout import stage_prefix
from prolong.manifest import read_manifest
from prolong.model import attention
from prolong.model.load import DTYPES, load_model
from prolong.model.rope import write_portable_config
from prolong.parallel.dims import ParallelDims
from prolong.parallel.engine import Engine, build_engine
from prolong.parallel.ulysses import build_group, check_model_heads
from prolong.parallel.world import World, raise_together
from prolong.recipe import Recipe
from prolong.store import Store
from prolong.train.lm import TrainingLM

log = logging.getLogger(__name__)


@dataclass
class Built:
    lm: torch.nn.Module  # the HF model (its parameters fp32: the master weights)
    engine: Engine
    dims: ParallelDims
    accumulation: int
    sequence_parallel: object | None  # the SP group of this rank, when dims.sp > 1
    lora: object | None = None  # prolong.model.lora.LoraModel of a LoRA stage


def build_stage(recipe: Recipe, store: Store, run: str, stage: str, world: World, scratch: Path, *,
                sequence_parallel: bool = True) -> Built:
    """Model + engine for ``stage`` on this job's ranks (``sequence_parallel=False``: no SP group,
    for jobs that only load and gather weights)."""
    cfg = recipe.train_stage(stage)
    dims = ParallelDims.for_stage(recipe, stage, world.world_size)
    accumulation = dims.accumulation(cfg.global_batch_size, cfg.micro_batch_size, f"{stage}.batch_tokens")
    sp = build_group(world, dims) if sequence_parallel and dims.sp > 1 else None
    init = recipe.init_source(stage)
    model_ref = recipe.model.path if init == "model" else upstream_model_dir(store, run, init, world, scratch)
    # fp32 parameters: the master weights AdamW updates; parallelize() sets the bf16 compute
    quantize = cfg.lora.quantize if cfg.lora is not None else None
    if quantize and world.world_size > 1:
        raise ConfigError(f"{stage}.lora.quantize: QLoRA runs as one process per job here ({world.world_size} "
                          "ranks asked); set jobs.nproc_per_node: 1")
    lm = load_model(model_ref, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, seq_len=cfg.seq_len,
                    dtype="bfloat16" if quantize else "float32", quantize=quantize,
                    revision=recipe.model.revision if init == "model" else None, device=world.device, field=stage)
    lora = None
    if cfg.lora is not None:
        from prolong.model.lora import apply_lora

        # the adapters' initial values from the stage's seed alone, whatever loading the model drew
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.stage_seed(stage))
            # the frozen base in the compute dtype (bf16 on GPUs): the memory LoRA saves
            lora = apply_lora(lm, cfg.lora, DTYPES[recipe.model.dtype], stage + ".lora")
    attention.select_backend(recipe.model.attention, world.device)
    if sp is not None:
        check_model_heads(lm.config, dims)
    group = recipe.model.s2_group_size(cfg.seq_len)
    if group is not None:
        log.info("%s: S²-Attn while training, groups of %d tokens (half of the heads shifted by %d)", stage, group,
                 group // 2)
    engine = build_engine(TrainingLM(lm, cfg.loss_chunk_size, s2_group_size=group), cfg, recipe.parallel, world,
                          DTYPES[recipe.model.dtype], accumulation=accumulation)
    return Built(lm, engine, dims, accumulation, sp, lora)


def verify_upstream(store: Store, run: str, stage: str, upstream: str, sub: str, local_dir: Path | None = None) -> None:
    """Check the files of ``upstream``'s output folder ``sub`` against its manifest before using them:
    sizes and contents (of the store's files locally, of the downloaded copy ``local_dir`` for remote
    stores). A damaged file is one line naming it and the stage to re-run."""
    m = read_manifest(store, run, upstream)
    entries = outputs_under(m.outputs, sub)
    if not entries:
        raise StageError(f"{stage}: {upstream}'s manifest lists no {sub}/ to start from")
    # paths relative to the folder ``sub`` itself (which is what ``local_dir`` holds)
    entries = [{**e, "path": e["path"][len(sub) + 1:]} for e in entries]
    verify_outputs(store, f"{stage_prefix(run, upstream)}/{sub}", entries, content=store.is_local or local_dir is not None,
                   local_dir=local_dir, fix=f"re-run it with --from-stage {upstream}")


def upstream_model_dir(store: Store, run: str, init: str, world: World, scratch: Path) -> str:
    rel = f"{stage_prefix(run, init)}/hf"
    local = store.local_path(rel) if store.is_local else scratch / "init"
    failure = None
    if world.local_rank == 0:  # one check per node, of the copy that node reads
        try:
            if not store.is_local:
                store.get_dir(rel, local)
            verify_upstream(store, run, "hand-off", init, "hf", local_dir=None if store.is_local else local)
        except ProlongError as e:
            failure = e
    raise_together(world, failure)
    return str(local)


def export_adapter(engine: Engine, lora, tokenizer, out: Path, world: World, base_ref: str) -> None:
    """A LoRA stage's output: the adapter and the fully trained parameters (fp32) + tokenizer."""
    from prolong.model.lora import save_adapter

    state = engine.full_state_dict(trainable_only=True)
    if world.is_main:
        save_adapter(lora, state, out, base_ref)
        tokenizer.save_pretrained(out)


def export_hf(engine: Engine, lm, tokenizer, out: Path, world: World, dtype: torch.dtype) -> None:
    """Full (unsharded) weights in the model's dtype as HF safetensors + config (with this stage's θ)
    + tokenizer. The fp32 master weights stay in the checkpoint, which the next stage starts from."""
    state = engine.full_state_dict()
    if world.is_main:
        state = {k: v.to(dtype) for k, v in state.items()}
        lm.config.dtype = dtype
        lm.save_pretrained(out, state_dict=state, safe_serialization=True)
        write_portable_config(out)  # θ where transformers 4, converters and servers read it too
        tokenizer.save_pretrained(out)
