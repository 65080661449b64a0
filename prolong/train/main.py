"""A training stage as a job (stage1, stage2, sft): runs under torchrun, one process per device.

Started twice with the same inputs it resumes from its newest complete checkpoint. Stage hand-off
needs no manual step: weights come from the upstream stage's ``hf/`` export, θ from this stage's
config, the LR schedule starts afresh, and with ``keep_optimizer_state`` the Adam moments are
loaded from the upstream stage's final checkpoint.
"""

from __future__ import annotations

import functools
import logging
import json
import tempfile
from pathlib import Path

import torch

from prolong import layout
from prolong.config import TrainStageConfig
from prolong.data.mds import data_errors, mixture_dataset
from prolong.data.tokenize import load_tokenizer
from prolong.errors import StageError
from prolong.layout import stage_prefix
from prolong.manifest import StageRecorder, read_manifest
from prolong.model import attention
from prolong.model.load import DTYPES
from prolong.parallel.engine import Engine
from prolong.parallel.world import World, init_world, node_scratch, on_main, remove_scratch

from prolong.recipe import Recipe
from prolong.store import Store
from prolong.train.batch import collate, shard_batches
from prolong.train.build import build_stage, export_adapter, export_hf, verify_upstream
from prolong.train.callbacks import Checkpointing, ConsoleLogger, MetricsFile, ProgressFile, StageReport, Throughput
from prolong.train.checkpoint import Checkpointer
from prolong.train.flops import FlopCounter, peak_flops
from prolong.train.preemption import StopOnSignal
from prolong.train.trainer import Trainer, TrainerState

log = logging.getLogger(__name__)

def _restore(ckpt: Checkpointer, rec: StageRecorder, engine: Engine, recipe: Recipe, run: str, stage: str):
    """Resume this stage from its newest checkpoint made for the same inputs, or — on a fresh
    start with ``keep_optimizer_state`` — take Adam's moments from the upstream stage."""
    cfg = recipe.train_stage(stage)
    usable = ckpt.usable_steps()
    if usable and ckpt.trainer_state(usable[-1]).get("input_key") != rec.input_key:
        # An unfinished attempt of another recipe or upstream: never overwrite it silently.
        raise StageError(f"{stage}: checkpoints in {ckpt.store.uri(ckpt.prefix)} were made for other inputs "
                         f"(a different recipe or upstream stage); re-run with --from-stage {stage} to discard them")
    failed = None
    for step in reversed(usable):  # the newest that loads; a damaged one falls back to the one before
        try:
            saved = ckpt.load(step, engine)
        except StageError as e:
            log.warning("%s: cannot resume from step %d (%s); trying the checkpoint before it", stage, step, e)
            failed = e
            continue
        log.info("resuming %s at step %d", stage, saved["step"])
        state = TrainerState(step=saved["step"], samples_seen=saved["samples_seen"], tokens_seen=saved["tokens_seen"])
        return step, state, saved.get("loader"), saved.get("scheduler")
    if failed is not None:
        raise StageError(f"{stage}: no checkpoint of this attempt loads (newest: {failed}); re-run with "
                         f"--from-stage {stage} to start it afresh")
    init = recipe.init_source(stage)
    # a LoRA stage adapts the upstream model's exported weights (its base, frozen); a full stage
    # continues from the upstream's fp32 master weights in its final checkpoint
    if init != "model" and cfg.lora is None and recipe.stages[init].kind == "train":
        # Hand-off: the upstream stage's final checkpoint holds its fp32 master weights (the HF export
        # is in the model's dtype) and, with keep_optimizer_state, the Adam moments to carry over.
        m = read_manifest(ckpt.store, run, init)
        final = m.artifacts.get("checkpoint") if m else None
        if not final:
            raise StageError(f"{stage}: {init} left no final checkpoint to start from")
        on_main(ckpt.world, lambda: verify_upstream(ckpt.store, run, stage, init, final))
        step = layout.step_of(final.rsplit("/", 1)[-1])
        ckpt.load(step, engine, prefix=stage_prefix(run, init), optimizer_too=cfg.keep_optimizer_state,
                  restore_rng=False)
        if cfg.keep_optimizer_state:
            engine.restart_schedule()
    return None, TrainerState(), None, None

def _finish(rec: StageRecorder, store: Store, trainer: Trainer, cfg: TrainStageConfig, resumed_from: int | None,
            out_dir: Path, accumulation: int, world: World, lora) -> None:
    model_out = "adapter" if lora is not None else "hf"
    rec.put_dir(out_dir, model_out)
    final = layout.checkpoint_in_stage(trainer.state.step)
    rec.record_existing(final)
    rec.record_existing("metrics.jsonl")
    rec.record_existing("report")
    rows = [json.loads(x) for x in store.read_text(rec.rel("metrics.jsonl")).splitlines() if x.strip()]
    losses = [r["loss"] for r in rows]

    def mean(key: str) -> float | None:
        values = [r[key] for r in rows if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    rec.finish(
        metrics={"steps": trainer.state.step, "tokens": trainer.state.tokens_seen,
                 "loss_first": losses[0] if losses else None, "loss_last": losses[-1] if losses else None,
                 "loss_last10": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
                 "tokens_per_s": mean("tokens_per_s"), "tflops_nominal": mean("tflops_nominal"),
                 "tflops_document": mean("tflops_document"), "mfu_nominal": mean("mfu_nominal"),
                 "mfu_document": mean("mfu_document"),
                 "rope_theta": cfg.rope_theta, "world_size": world.world_size, "accumulation": accumulation,
                 "sequence_parallel": cfg.sequence_parallel,
                 "sequence_parallel_share": mean("sequence_parallel_share") if cfg.sequence_parallel > 1 else None,
                 "attention": attention.current_backend(), "resumed_from_step": resumed_from,
                 **({"trainable_params": lora.trainable, "total_params": lora.total} if lora is not None else {})},
        artifacts={("adapter" if lora is not None else "hf_model"): model_out, "checkpoint": final,
                   "metrics": "metrics.jsonl", "report": "report/report.md", "loss_curve": "report/loss_curve.png"})

def run_train_stage(recipe: Recipe, store: Store, run: str, stage: str) -> None:
    world = init_world()
    cfg = recipe.train_stage(stage)
    seed = recipe.stage_seed(stage)
    torch.manual_seed(seed)
    rec = StageRecorder(store, run, recipe, stage)
    scratch = node_scratch(world, f"{run}-{stage}")  # shared by this node's ranks
    with tempfile.TemporaryDirectory(prefix=f"prolong-{stage}-") as tmp_:
        tmp = Path(tmp_)  # this rank's own
        built = build_stage(recipe, store, run, stage, world, scratch)
        lm, engine, sp, accumulation = built.lm, built.engine, built.sequence_parallel, built.accumulation
        ckpt = Checkpointer(store, rec.prefix, world, staging=scratch / "checkpoints")
        resumed_from, state, loader_state, scheduler_state = _restore(ckpt, rec, engine, recipe, run, stage)
        if scheduler_state:
            engine.scheduler.load_state_dict(scheduler_state)
        data = recipe.stage(cfg.data_from)
        on_main(world, lambda: data.verify_streams(store, run, stage))  # before the first step, what it reads
        if world.is_main:
            rec.invalidate()  # only now, with every input checked: a failed start changes nothing

        cache = recipe.jobs.stream_cache
        cache_dir = Path(cache.dir).expanduser() / scratch.name if cache.dir else scratch / "streams"
        dataset = mixture_dataset(data.stream_sources(store, run, stage), cache_dir=cache_dir, seed=seed,
                                  cache_limit=cache.limit,
                                  batch_size=cfg.micro_batch_size, epoch_size=cfg.steps * cfg.global_batch_size,
                                  replication=cfg.sequence_parallel if sp is not None else None)
        if loader_state:
            dataset.load_state_dict(loader_state)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.micro_batch_size, num_workers=0,
                                             collate_fn=functools.partial(collate, seq_len=cfg.seq_len))

        def save(trainer: Trainer) -> None:
            loader_pos = dataset.state_dict(num_samples=trainer.state.samples_seen, from_beginning=True) \
                if world.is_main else None
            ckpt.save(trainer.state.step, engine,
                      {**trainer.state_dict(), "loader": loader_pos, "input_key": rec.input_key, "engine": engine.name,
                       "rope_theta": cfg.rope_theta, "seq_len": cfg.seq_len,
                       "rope_scaling": cfg.rope_scaling.parameters() if cfg.rope_scaling else None})

        meter = Throughput(FlopCounter.for_model(lm), peak_flops(world.device, recipe.jobs.peak_tflops), cfg.seq_len,
                           world.world_size)
        callbacks = [meter, ConsoleLogger(), MetricsFile(store, rec.rel("metrics.jsonl"), tmp / "metrics.jsonl"),
                     ProgressFile(store, layout.progress(rec.prefix), stage), Checkpointing(cfg.checkpoint_every),
                     StageReport(store, rec.prefix, stage, tmp / "metrics.jsonl", tmp),
                     StopOnSignal(stage)]  # last: it sees this step's metrics and checkpoint already recorded
        batches = shard_batches(data_errors(loader, fix=f"re-run the data stage with --from-stage {cfg.data_from}"), sp)
        trainer = Trainer(engine, batches, cfg, world, accumulation=accumulation, callbacks=callbacks, state=state,
                          save_checkpoint=save)
        trainer.fit()
        tokenizer = load_tokenizer(recipe.model.tokenizer_path, recipe.model.revision)
        if built.lora is not None:
            init = recipe.init_source(stage)  # what the adapter applies to, for peft's adapter_config.json
            base_ref = recipe.model.path if init == "model" else store.uri(f"{stage_prefix(run, init)}/hf")
            export_adapter(engine, built.lora, tokenizer, tmp / "out", world, base_ref=base_ref)
        else:
            export_hf(engine, lm, tokenizer, tmp / "out", world, DTYPES[recipe.model.dtype])
        if world.is_main:
            _finish(rec, store, trainer, cfg, resumed_from, tmp / "out", accumulation, world, built.lora)
        ckpt.close()
        remove_scratch(world, scratch)
        if cache.dir:
            remove_scratch(world, cache_dir)
