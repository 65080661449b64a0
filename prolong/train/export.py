"""Turn a training checkpoint into HF weights, so a stage still running can be evaluated.

A finished stage already has ``hf/``; an unfinished one has only sharded checkpoints, whose layout
depends on the engine (FSDP2 DCP or DeepSpeed ZeRO) and the world size that wrote them. The sure
way to read one back is the way training does: build the same model and engine on the same
number of ranks, load the model part of the checkpoint, and gather full weights. It runs as a
job (``python -m prolong.jobs.entry export-checkpoint STORE RUN STAGE STEP OUT``), never in the
orchestrator; ``OUT/manifest.json``, written last, says it is done.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from prolong.data.tokenize import load_tokenizer
from prolong.errors import StageError
from prolong.integrity import checkpoint_identity
from prolong.layout import stage_prefix
from prolong.manifest import StageRecorder
from prolong.model.load import DTYPES
from prolong.parallel.world import init_world, node_scratch, remove_scratch
from prolong.recipe import Recipe
from prolong.store import Store
from prolong.train.build import build_stage, export_adapter, export_hf
from prolong.train.checkpoint import Checkpointer
from prolong.train.merge import lora_base, merge_to_hf

log = logging.getLogger(__name__)


def export_checkpoint(recipe: Recipe, store: Store, run: str, stage: str, step: int | str, out_rel: str) -> None:
    step = int(step)
    world = init_world()
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
        # the optimizer is built (engines expect one) but never loaded: only weights are exported
        built = build_stage(recipe, store, run, stage, world, scratch, sequence_parallel=False)
        lm, engine = built.lm, built.engine
        ckpt.load(step, engine, optimizer_too=False, restore_rng=False)
        tokenizer = load_tokenizer(recipe.model.tokenizer_path, recipe.model.revision)
        if built.lora is not None:  # a LoRA stage's snapshot: its adapter merged, as the merge stage does
            base_ref = lora_base(recipe, store, run, stage, world, scratch)
            export_adapter(engine, built.lora, tokenizer, tmp / "adapter", world, base_ref=base_ref)
            if world.is_main:
                merge_to_hf(recipe, stage, base_ref, tmp / "adapter", tmp / "hf", world.device)
        else:
            export_hf(engine, lm, tokenizer, tmp / "hf", world, DTYPES[recipe.model.dtype])
        if world.is_main:
            # keyed like the snapshot's evaluation: the training stage's config and this checkpoint
            tag = f"{stage}-step{step:08d}"
            rec = StageRecorder(store, run, recipe, stage, prefix=out_rel,
                                upstream={tag: checkpoint_identity(store, stage_prefix(run, stage), step)})
            rec.put_dir(tmp / "hf", "hf")
            rec.finish(metrics={"step": step}, artifacts={"hf_model": "hf"})
            log.info("exported %s step %d to %s", stage, step, store.uri(out_rel))
        ckpt.close()
    remove_scratch(world, scratch)
