"""RoPE base frequency (θ): the one place that reads and writes it on an HF config.

ProLong raises θ from Llama-3's 5e5 to 8e6 for 64K training and to 1.28e8 for 512K (Table 9);
LongLoRA keeps θ and interpolates positions (linear RoPE scaling) — both are set here.
transformers ≥ 5 keeps θ in ``config.rope_parameters`` (per layer type for hybrid models);
earlier versions in ``config.rope_theta``. θ must be set *before* the model is built: the rotary
embedding computes its inverse frequencies at construction.
"""

from __future__ import annotations


def _param_dicts(config) -> list[dict]:
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return []
    if "rope_theta" in params or "rope_type" in params:
        return [params]
    return [v for v in params.values() if isinstance(v, dict)]  # per layer type


def uses_rope(config) -> bool:
    return bool(_param_dicts(config)) or getattr(config, "rope_theta", None) is not None


def get_rope_theta(config) -> float:
    dicts = _param_dicts(config)
    if dicts:
        thetas = {float(d["rope_theta"]) for d in dicts if "rope_theta" in d}
        if len(thetas) == 1:
            return thetas.pop()
    return float(getattr(config, "rope_theta"))


def set_rope_theta(config, theta: float) -> None:
    dicts = _param_dicts(config)
    for d in dicts:
        d["rope_theta"] = float(theta)
    if not dicts or hasattr(config, "rope_theta"):
        config.rope_theta = float(theta)


def set_rope_scaling(config, parameters: dict | None) -> None:
    """RoPE scaling (``{"rope_type": "linear", "factor": 8}`` ...) or none, with θ kept: each stage's
    recipe decides both, so a stage without scaling resets what an earlier stage's model carried."""
    parameters = dict(parameters or {"rope_type": "default"})
    dicts = _param_dicts(config)
    for d in dicts:
        theta = d.get("rope_theta")
        d.clear()
        d.update(parameters)
        if theta is not None:
            d["rope_theta"] = theta
    if not dicts:  # transformers 4's form
        kind = parameters.pop("rope_type")
        config.rope_scaling = None if kind == "default" else {"type": kind, "rope_type": kind, **parameters}


def get_rope_scaling(config) -> dict | None:
    """The scaling a config carries (``rope_type`` and its fields, θ left out), or None."""
    dicts = _param_dicts(config)
    if dicts:
        params = {k: v for k, v in dicts[0].items() if k != "rope_theta"}
        return None if params.get("rope_type", "default") == "default" else params
    scaling = getattr(config, "rope_scaling", None)
    return dict(scaling) if scaling else None


def model_rope_theta(model) -> float:
    """θ actually in use by a built model (reads the rotary module's frequencies back)."""
    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if inv_freq is not None and inv_freq.numel() > 1:
            dim = 2 * inv_freq.numel()
            # inv_freq[1] = θ^(-2/dim)  →  θ = inv_freq[1]^(-dim/2)
            return float(inv_freq[1].double() ** (-dim / 2))
    raise ValueError("model has no rotary embedding")


def portable_config(config: dict, dtype: str | None = None) -> dict:
    """A saved ``config.json`` that every reader gets θ from: transformers ≥ 5 reads
    ``rope_parameters``, transformers 4.x and the converters and servers built on it (llama.cpp's
    ``convert_hf_to_gguf.py``, many vLLM/SGLang installs) read top-level ``rope_theta`` and
    ``rope_scaling`` — and silently take θ = 10000 when it is absent. Both are written, with the
    same values, and ``torch_dtype`` beside ``dtype``."""
    out = dict(config)
    params = out.get("rope_parameters")
    if isinstance(params, dict) and ("rope_theta" in params or "rope_type" in params):
        if "rope_theta" in params:
            out["rope_theta"] = params["rope_theta"]
        kind = params.get("rope_type", "default")
        if kind != "default":  # transformers 4's form of the same scaling
            out["rope_scaling"] = {**{k: v for k, v in params.items() if k != "rope_theta"}, "type": kind}
        else:
            out.pop("rope_scaling", None)
    if dtype is not None:
        out["dtype"] = out["torch_dtype"] = dtype
    elif "dtype" in out:
        out["torch_dtype"] = out["dtype"]
    return out


def write_portable_config(folder, **changes) -> dict:
    """Rewrite ``folder/config.json`` (as ``save_pretrained`` left it) in the portable form, with
    ``changes`` applied first (``dtype=...`` also sets ``torch_dtype``). Returns what was written."""
    import json
    from pathlib import Path

    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    dtype = changes.pop("dtype", None)
    config = portable_config({**config, **changes}, dtype=dtype)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config
