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

from prolong.config import Recipe, TrainStageConfig
from prolong.data.mds import mixture_dataset, stage_streams
from prolong.data.tokenize import load_tokenizer
from prolong.errors import ConfigError, StageError
from prolong.manifest import StageRecorder, stage_prefix
from prolong.model import attention
from prolong.model.lm import TrainingLM
from prolong.model.load import DTYPES, load_model
from prolong.parallel import World, init_world, node_scratch, remove_scratch
from prolong.parallel.engine import Engine, build_engine
from prolong.parallel.ulysses import build_group, check_model_heads
from prolong.progress import PROGRESS
from prolong.store import Store
from prolong.train.batch import collate
from prolong.train.callbacks import Checkpointing, ConsoleLogger, MetricsFile, ProgressFile, StageReport
from prolong.train.flops import FlopCounter, peak_flops
from prolong.train.checkpoint import Checkpointer, step_dir
from prolong.train.preemption import StopOnSignal
from prolong.train.trainer import Trainer, TrainerState

log = logging.getLogger(__name__)


def accumulation_steps(cfg: TrainStageConfig, stage: str, data_parallel: int) -> int:
    per_pass = cfg.micro_batch_size * data_parallel
    if cfg.global_batch_size % per_pass:
        raise ConfigError(f"{stage}.batch_tokens: {cfg.global_batch_size} sequences per step do not divide into "
                          f"micro-batches of {cfg.micro_batch_size} on {data_parallel} data-parallel ranks")
    return cfg.global_batch_size // per_pass


def upstream_model_dir(store: Store, run: str, init: str, world: World, scratch: Path) -> str:
    rel = f"{stage_prefix(run, init)}/hf"
    if store.is_local:
        return str(store.local_path(rel))
    local = scratch / "init"
    if world.local_rank == 0:
        store.get_dir(rel, local)
    if world.distributed:
        torch.distributed.barrier()
    return str(local)


def export_hf(engine: Engine, lm, tokenizer, out: Path, world: World, dtype: torch.dtype) -> None:
    """Full (unsharded) weights in the model's dtype as HF safetensors + config (with this stage's θ)
    + tokenizer. The fp32 master weights stay in the checkpoint, which the next stage starts from."""
    state = engine.full_state_dict()
    if world.is_main:
        state = {k: v.to(dtype) for k, v in state.items()}
        lm.config.dtype = dtype
        lm.save_pretrained(out, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(out)


def _restore(ckpt: Checkpointer, rec: StageRecorder, engine: Engine, recipe: Recipe, run: str, stage: str):
    """Resume this stage from its newest checkpoint made for the same inputs, or — on a fresh
    start with ``keep_optimizer_state`` — take Adam's moments from the upstream stage."""
    cfg = recipe.train_stage(stage)
    latest = ckpt.latest()
    if latest is not None and ckpt.trainer_state(latest).get("input_key") != rec.input_key:
        # An unfinished attempt of another recipe or upstream: never overwrite it silently.
        raise StageError(f"{stage}: checkpoints in {ckpt.store.uri(ckpt.prefix)} were made for other inputs "
                         f"(a different recipe or upstream stage); re-run with --from-stage {stage} to discard them")
    if latest is not None:
        saved = ckpt.load(latest, engine)
        log.info("resuming %s at step %d", stage, saved["step"])
        state = TrainerState(step=saved["step"], samples_seen=saved["samples_seen"], tokens_seen=saved["tokens_seen"])
        return latest, state, saved.get("loader"), saved.get("scheduler")
    init = recipe.init_source(stage)
    if init != "model":
        # Hand-off: the upstream stage's final checkpoint holds its fp32 master weights (the HF export
        # is in the model's dtype) and, with keep_optimizer_state, the Adam moments to carry over.
        upstream_ckpt = f"{stage_prefix(run, init)}/checkpoints"
        steps = ckpt.complete_steps(upstream_ckpt)
        if not steps:
            raise StageError(f"{stage}: {init} left no complete checkpoint to start from")
        ckpt.load(steps[-1], engine, prefix=upstream_ckpt, optimizer_too=cfg.keep_optimizer_state, restore_rng=False)
        if cfg.keep_optimizer_state:
            engine.restart_schedule()
    return None, TrainerState(), None, None


def _finish(rec: StageRecorder, store: Store, trainer: Trainer, cfg: TrainStageConfig, resumed_from: int | None,
            hf_dir: Path, accumulation: int, world: World) -> None:
    rec.put_dir(hf_dir, "hf")
    final = f"checkpoints/{step_dir(trainer.state.step)}"
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
                 "attention": attention.current_backend(), "resumed_from_step": resumed_from},
        artifacts={"hf_model": "hf", "checkpoint": final, "metrics": "metrics.jsonl", "report": "report/report.md",
                   "loss_curve": "report/loss_curve.png"})


def run_train_stage(recipe: Recipe, store: Store, run: str, stage: str) -> None:
    world = init_world()
    cfg = recipe.train_stage(stage)
    sp = build_group(world, cfg.sequence_parallel, field=f"{stage}.sequence_parallel") \
        if cfg.sequence_parallel > 1 else None
    seed = recipe.stage_seed(stage)
    torch.manual_seed(seed)
    rec = StageRecorder(store, run, recipe, stage)
    accumulation = accumulation_steps(cfg, stage, world.world_size // cfg.sequence_parallel)
    init = recipe.init_source(stage)
    scratch = node_scratch(world, f"{run}-{stage}")  # shared by this node's ranks
    with tempfile.TemporaryDirectory(prefix=f"prolong-{stage}-") as tmp_:
        tmp = Path(tmp_)  # this rank's own
        model_ref = recipe.model.path if init == "model" else upstream_model_dir(store, run, init, world, scratch)
        # fp32 parameters: the master weights AdamW updates; parallelize() sets the bf16 compute
        lm = load_model(model_ref, rope_theta=cfg.rope_theta, seq_len=cfg.seq_len, dtype="float32",
                        revision=recipe.model.revision if init == "model" else None, device=world.device,
                        field=stage)
        attention.select_backend(recipe.model.attention, world.device)
        if sp is not None:
            check_model_heads(lm.config, sp.size, field=f"{stage}.sequence_parallel")
        engine = build_engine(TrainingLM(lm, cfg.loss_chunk_size), cfg, recipe.parallel, world,
                              DTYPES[recipe.model.dtype], accumulation=accumulation)
        ckpt = Checkpointer(store, rec.prefix, world, staging=scratch / "checkpoints")
        resumed_from, state, loader_state, scheduler_state = _restore(ckpt, rec, engine, recipe, run, stage)
        if scheduler_state:
            engine.scheduler.load_state_dict(scheduler_state)
        if world.is_main:
            rec.invalidate()  # only now, with every input checked: a failed start changes nothing

        dataset = mixture_dataset(store, run, stage_streams(recipe, stage), cache_dir=scratch / "streams", seed=seed,
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
                       "rope_theta": cfg.rope_theta, "seq_len": cfg.seq_len})

        callbacks = [ConsoleLogger(), MetricsFile(store, rec.rel("metrics.jsonl"), tmp / "metrics.jsonl"),
                     ProgressFile(store, rec.rel(PROGRESS), stage), Checkpointing(cfg.checkpoint_every),
                     StageReport(store, rec.prefix, stage, tmp / "metrics.jsonl", tmp),
                     StopOnSignal(stage)]  # last: it sees this step's metrics and checkpoint already recorded
        trainer = Trainer(engine, iter(loader), cfg, world, accumulation=accumulation,
                          callbacks=callbacks, state=state, save_checkpoint=save, flops=FlopCounter.for_model(lm),
                          peak_flops=peak_flops(world.device, recipe.jobs.peak_tflops), sequence_parallel=sp)
        trainer.fit()
        export_hf(engine, lm, load_tokenizer(recipe.model.tokenizer_path, recipe.model.revision), tmp / "hf", world,
                  DTYPES[recipe.model.dtype])
        if world.is_main:
            _finish(rec, store, trainer, cfg, resumed_from, tmp / "hf", accumulation, world)
        ckpt.close()
        remove_scratch(world, scratch)
