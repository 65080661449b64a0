"""Checks of what a recipe names, without loading anything: paths exist, a model folder has a
config with RoPE, the attention backend has a GPU. Stage kinds use them before a run starts
(prolong.preflight); jobs check again where they can check more (weights, datasets on the hub).

Torch-free: configs are read as JSON; nothing here imports a model.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from prolong import assets
from prolong.errors import ConfigError, DataError


def looks_local(ref: str) -> bool:
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


def check_mds_folder(uri: str, storage_options: dict, field: str) -> None:
    """An MDS folder read in place has its index.json (a built-in asset: a known one)."""
    from prolong.data import remote

    if assets.is_builtin(uri):
        assets.check_ref(uri, field)
        return
    index = remote.join(uri, remote.INDEX)
    try:
        fs, path = remote.filesystem(index, storage_options)
        found = fs.exists(path)
    except DataError:
        raise
    except Exception as e:  # unreachable endpoint, no credentials, a refused requester-pays bucket
        raise DataError(f"{field}: cannot reach {index} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                        ) from None
    if not found:
        raise DataError(f"{field}: {index} does not exist (not an MDS folder)")


def model_config(ref: str, field: str) -> dict | None:
    """The model's config.json as a dict: None for a hub id (checked by the job, which can fetch it)."""
    if assets.is_builtin(ref):
        assets.check_ref(ref, field)
        return assets.builtin_model_config(ref)
    if not looks_local(ref):
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
    if not looks_local(ref):
        return None
    folder = Path(ref).expanduser()
    check_path(ref, "model.tokenizer", folder=True)
    if not any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise DataError(f"model.tokenizer: {ref} holds no tokenizer (tokenizer.json or tokenizer_config.json)")


def _gpus_visible() -> bool:
    """Whether this machine shows an NVIDIA GPU (torch-free: the driver's files)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def check_quantized_lora(recipe, field: str) -> None:
    """QLoRA's NF4 base runs in bitsandbytes' CUDA kernels only."""
    jobs = recipe.jobs
    gpus = jobs.slurm.gpus_per_node > 0 if jobs.backend == "slurm" else _gpus_visible()
    if not gpus:
        where = "jobs.slurm.gpus_per_node is 0" if jobs.backend == "slurm" else "this machine has no GPU"
        raise ConfigError(f"{field}: nf4 (QLoRA) quantizes the frozen base with bitsandbytes, which runs on GPUs "
                          f"only, and {where}; remove lora.quantize to train the adapter on a 16-bit base")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{field}: nf4 needs the bitsandbytes package, which is not installed "
                          "(pip install bitsandbytes)")


def check_backends(recipe) -> None:
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
