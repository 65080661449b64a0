"""Turn a training checkpoint into HF weights, so a stage still running can be evaluated.

A finished stage already has ``hf/``; an unfinished one has only sharded checkpoints, whose layout
depends on the engine (FSDP2 DCP or DeepSpeed ZeRO) and the world size that wrote them. The sure
way to read one back is the way training does: build the same model and engine on the same
number of ranks, load the model part of the checkpoint, and gather full weights. It runs as a
job (``python -m prolong.jobs.entry export STORE RUN STAGE STEP OUT``), never in the orchestrator.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from prolong.config import Recipe
from prolong.data.tokenize import load_tokenizer
from prolong.errors import StageError
from prolong.model import attention
from prolong.model.lm import TrainingLM
from prolong.model.load import DTYPES, load_model
from prolong.parallel.world import init_world, node_scratch, remove_scratch
from prolong.parallel.engine import build_engine
from prolong.store import Store
from prolong.train.checkpoint import Checkpointer
from prolong.parallel.dims import ParallelDims
from prolong.train.main import export_hf, upstream_model_dir
from prolong.layout import stage_prefix

log = logging.getLogger(__name__)


def export_checkpoint(recipe: Recipe, store: Store, run: str, stage: str, step: int, out_rel: str) -> None:
    world = init_world()
    cfg = recipe.train_stage(stage)
    scratch = node_scratch(world, f"{run}-{stage}-export")
    with tempfile.TemporaryDirectory(prefix="prolong-export-") as tmp_:
        tmp = Path(tmp_)
        ckpt = Checkpointer(store, stage_prefix(run, stage), world, staging=scratch / "checkpoints")
        if step not in ckpt.complete_steps():
            raise StageError(f"{store.uri(ckpt.prefix)}: no complete checkpoint at step {step} "
                             f"(complete: {ckpt.complete_steps() or 'none'})")
        saved_world = ckpt.trainer_state(step).get("world_size")
        if saved_world not in (None, world.world_size):
            raise StageError(f"{stage} step {step}: the checkpoint was written by {saved_world} ranks; "
                             f"export it with jobs.nproc_per_node giving {saved_world} ranks, not {world.world_size}")
        init = recipe.init_source(stage)
        model_ref = recipe.model.path if init == "model" else upstream_model_dir(store, run, init, world, scratch)
        lm = load_model(model_ref, rope_theta=cfg.rope_theta, seq_len=cfg.seq_len, dtype="float32",
                        revision=recipe.model.revision if init == "model" else None, device=world.device, field=stage)
        attention.select_backend(recipe.model.attention, world.device)
        # the optimizer is built (engines expect one) but never loaded: only weights are exported
        engine = build_engine(TrainingLM(lm, cfg.loss_chunk_size), cfg, recipe.parallel, world,
                              DTYPES[recipe.model.dtype],
                              accumulation=ParallelDims.for_stage(recipe, stage, world.world_size).accumulation(
                                  cfg.global_batch_size, cfg.micro_batch_size, f"{stage}.batch_tokens"))
        ckpt.load(step, engine, optimizer_too=False, restore_rng=False)
        export_hf(engine, lm, load_tokenizer(recipe.model.tokenizer_path, recipe.model.revision), tmp / "hf", world,
                  DTYPES[recipe.model.dtype])
        if world.is_main:
            store.put_dir(tmp / "hf", out_rel)
            log.info("exported %s step %d to %s", stage, step, store.uri(out_rel))
        ckpt.close()
    remove_scratch(world, scratch)
