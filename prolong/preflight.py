"""Checks before a run starts: whatever would fail a job for a reason that is known already.

A typo in a data path, a model folder that does not exist, ``sequence_parallel`` that does not
divide the ranks, ``attention: flash`` with no GPU — found now, in one line, before any stage runs
or any earlier output is set aside, and for *every* stage that will run (stage 2's SP is checked
before data preparation and stage 1 spend hours). Jobs check again where they can check more (a
model's weights, a dataset on the hub).

Torch-free: it reads configs as JSON and looks at files; nothing here imports a model.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

from prolong import assets
from prolong.config import FileSource, HFSource, Recipe, RepoSource, TRAIN_STAGES
from prolong.errors import ConfigError, DataError, StoreError
from prolong.integrity import outputs_under, verify_outputs
from prolong.layout import stage_prefix
from prolong.manifest import DamagedManifest, read_manifest, stage_state
from prolong.parallel.dims import ParallelDims, job_ranks
from prolong.stages import upstream

log = logging.getLogger(__name__)
# model types whose positions are learned or ALiBi: θ cannot extend them
_NO_ROPE = {"gpt2", "gpt_bigcode", "opt", "bloom", "mpt", "bert", "roberta", "t5"}


def stages_to_run(ctx, chosen: list[str], forced: set[str]) -> list[str]:
    """The chosen stages that will run: forced, not done, or downstream of one that runs."""
    out: list[str] = []
    for stage in chosen:
        state, _ = stage_state(ctx.store, ctx.run, ctx.recipe, stage)
        if stage in forced or state != "done" or any(u in out for u in upstream(ctx.recipe, stage)):
            out.append(stage)
    return out


def check_run(ctx, chosen: list[str], forced: set[str]) -> list[str]:
    """Check everything the stages about to run need; returns those stages. Raises a one-line
    ProlongError naming the field or file."""
    ctx.store.check_writable(ctx.run)
    for stage in chosen:
        if stage not in forced:
            try:
                read_manifest(ctx.store, ctx.run, stage)
            except DamagedManifest as e:  # days of work may hang on it: rebuilding is the user's call
                raise DamagedManifest(f"{e}; `prolong doctor {ctx.run}` checks the whole run") from None
    todo = stages_to_run(ctx, chosen, forced)
    recipe = ctx.recipe
    for stage in todo:
        if stage == "data":
            check_data(recipe)
        elif stage in TRAIN_STAGES:
            check_train(ctx, stage, reruns=set(todo))
        elif stage == "eval":
            check_eval(recipe)
    return todo


# ---------------------------------------------------------------- references


def _looks_local(ref: str) -> bool:
    return ref.startswith(("/", "./", "../", "~")) or os.path.exists(os.path.expanduser(ref))


def check_path(ref: str, field: str, *, folder: bool | None = None, error=DataError) -> None:
    """A path-like reference exists (built-in: a known asset; a URL: the store answers for it)."""
    if assets.is_builtin(ref):
        assets.check_ref(ref, field)
        return
    if "://" in ref:
        import fsspec

        from prolong.store import storage_options

        try:
            fs, root = fsspec.core.url_to_fs(ref, **storage_options(ref))
            found = fs.exists(root) or bool(fs.glob(root))
        except Exception as e:  # unreachable endpoint, no credentials: say so now, not in a job
            raise error(f"{field}: cannot reach {ref} ({type(e).__name__}: {e})") from None
        if not found:
            raise error(f"{field}: {ref} does not exist")
        return
    path = Path(ref).expanduser()
    if any(c in ref for c in "*?["):
        if not list(path.parent.glob(path.name)):
            raise error(f"{field}: {ref} matches no files")
    elif not path.exists():
        raise error(f"{field}: {ref} does not exist")
    elif folder is True and not path.is_dir():
        raise error(f"{field}: {ref} is not a folder")


def model_config(ref: str, field: str) -> dict | None:
    """The model's config.json as a dict: None for a hub id (checked by the job, which can fetch it)."""
    if assets.is_builtin(ref):
        assets.check_ref(ref, field)
        return assets.builtin_model_config(ref)
    if not _looks_local(ref):
        return None
    check_path(ref, field, folder=True, error=ConfigError)
    path = Path(ref).expanduser() / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{field}: {path} does not exist (not a Hugging Face model folder)") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{field}: {path} is not a readable model config ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{field}: {path} is not a model config (a JSON object)")
    return config


def check_tokenizer(ref: str) -> None:
    if assets.is_builtin(ref):
        return assets.check_ref(ref, "model.tokenizer")
    if not _looks_local(ref):
        return None
    folder = Path(ref).expanduser()
    check_path(ref, "model.tokenizer", folder=True)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise DataError(f"model.tokenizer: {ref} holds no tokenizer (tokenizer.json or tokenizer_config.json)")


# ---------------------------------------------------------------- per stage


def check_data(recipe: Recipe) -> None:
    check_tokenizer(recipe.model.tokenizer_path)
    used = {c.domain for s in recipe.present_train_stages() for c in recipe.train_stage(s).components()}
    for name in sorted(used):
        src = recipe.data.domains[name].source
        field = f"data.domains.{name}.source"
        if isinstance(src, RepoSource):
            check_path(src.path, f"{field}.path", folder=True)
        elif isinstance(src, FileSource):
            check_path(src.path, f"{field}.path")
        elif isinstance(src, HFSource) and _looks_local(src.name):
            check_path(src.name, f"{field}.name")


def _gpus_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (torch-free: the driver's files)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def check_backends(recipe: Recipe) -> None:
    jobs, attention = recipe.jobs, recipe.model.attention
    if attention in ("flash", "flex"):
        gpus = jobs.slurm.gpus_per_node > 0 if jobs.backend == "slurm" else _gpus_visible()
        if not gpus:
            where = "jobs.slurm.gpus_per_node is 0" if jobs.backend == "slurm" else "this machine has no GPU"
            raise ConfigError(f"model.attention: {attention} runs on GPUs only and {where}; use sdpa (or auto)")
        if attention == "flash" and importlib.util.find_spec("flash_attn") is None:
            raise ConfigError("model.attention: flash needs the flash-attn package, which is not installed "
                              "(pip install flash-attn; or use auto)")
    if recipe.parallel.engine == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("parallel.engine: deepspeed is not installed (pip install deepspeed)")


def check_train(ctx, stage: str, reruns: set[str]) -> None:
    recipe = ctx.recipe
    cfg = recipe.train_stage(stage)
    dims = ParallelDims.for_stage(recipe, stage, job_ranks(recipe.jobs, all_nodes=True))
    dims.accumulation(cfg.global_batch_size, cfg.micro_batch_size, f"{stage}.batch_tokens")
    check_backends(recipe)
    config = model_config(recipe.model.path, "model.path")  # every stage keeps the base architecture
    if config is not None:
        if not any(k in config for k in ("rope_theta", "rope_parameters", "rope_scaling")) and \
                config.get("model_type") in _NO_ROPE:
            raise ConfigError(f"{stage}.rope_theta: model {recipe.model.path!r} ({config['model_type']}) has no "
                              "rotary position embedding; long-context training needs a RoPE model")
        if dims.sp > 1 and "num_attention_heads" in config:
            heads = config["num_attention_heads"]
            dims.kv_expansion(heads, config.get("num_key_value_heads") or heads)
    # what it reads from stages that will not run again must still be as recorded (sizes: cheap)
    init = recipe.init_source(stage)
    reads = [("data", f"streams/L{_len(cfg.seq_len)}")]
    if init != "model":
        reads.append((init, "hf"))
        m = read_manifest(ctx.store, ctx.run, init) if init not in reruns else None
        if m is not None and m.artifacts.get("checkpoint"):
            reads.append((init, m.artifacts["checkpoint"]))
    for up, sub in reads:
        if up in reruns:
            continue
        m = read_manifest(ctx.store, ctx.run, up)
        if m is not None:
            verify_outputs(ctx.store, stage_prefix(ctx.run, up), outputs_under(m.outputs, sub), content=False,
                           error=DataError if up == "data" else StoreError,
                           fix=f"re-run it with --from-stage {up}")


def _len(n: int) -> str:
    from prolong.config import format_tokens

    return format_tokens(n)


def check_eval(recipe: Recipe) -> None:
    cfg = recipe.eval
    if cfg.helmet is not None and cfg.helmet.data_dir is not None:
        check_path(cfg.helmet.data_dir, "eval.helmet.data_dir")
    if cfg.needle is not None:
        check_path(cfg.needle.haystack, "eval.needle.haystack")
    if cfg.perplexity is not None and isinstance(cfg.perplexity.source, (FileSource, RepoSource)):
        check_path(cfg.perplexity.source.path, "eval.perplexity.source.path")
    if cfg.lm_eval is not None and cfg.lm_eval.include_path:
        check_path(cfg.lm_eval.include_path, "eval.lm_eval.include_path", folder=True)
    # the longest prompt must fit the evaluated model: its base length, raised by every stage on the way
    config = model_config(recipe.model.path, "model.path") or {}
    limit, stage = config.get("max_position_embeddings") or 0, cfg.model_from
    while stage != "model":
        limit = max(limit, recipe.train_stage(stage).seq_len)
        stage = recipe.init_source(stage)
    tasks = [t for t in (cfg.json_kv, cfg.helmet, cfg.passkey, cfg.needle) if t is not None]
    longest = max((length for t in tasks for length in cfg.lengths_of(t)), default=0)
    if limit and longest > limit:
        raise ConfigError(f"eval.lengths: {longest} tokens is beyond the {limit} positions of the evaluated "
                          f"model ({cfg.model_from})")
