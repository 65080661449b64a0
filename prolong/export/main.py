"""The export stage as a job: a model of the run → ``hf/`` (safetensors in the export dtype) and
``gguf/`` (llama.cpp's files), every GGUF read back and checked before the manifest is written.

The source is the HF export of ``from`` (a training stage's ``hf/``: its fp32 master weights cast
once to ``model.dtype``); this job casts it to ``export.dtype`` — never to more precision than it
was saved with (the recipe is refused before that). Nothing reaches the store before every file is
made and checked: a failed conversion leaves the stage as it was.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from pathlib import Path

from prolong import layout
from prolong.errors import StageError
from prolong.export import card
from prolong.export.llama_cpp import convert, quantize, read_metadata
from prolong.fingerprint import TOKENIZER_FILES
from prolong.integrity import outputs_under, verify_outputs
from prolong.layout import stage_prefix
from prolong.progress import StageProgress
from prolong.manifest import StageRecorder, git_state, read_manifest, read_manifest_at
from prolong.model.rope import write_portable_config
from prolong.recipe import Recipe, recipe_from_dict
from prolong.stages.base import code_version
from prolong.stages.export import CONVERTER_TYPES
from prolong.store import Store, sha256_file

log = logging.getLogger(__name__)


def _source_dir(store: Store, model_rel: str, tmp: Path) -> Path:
    """The HF folder to export, here locally, checked against the manifest that recorded it."""
    prefix, sub = model_rel.rsplit("/", 1)
    m = read_manifest_at(store, prefix)
    if m is None:
        raise StageError(f"{store.uri(prefix)} has no manifest: nothing finished to export there")
    entries = [{**e, "path": e["path"][len(sub) + 1:]} for e in outputs_under(m.outputs, sub)]
    local = store.local_path(model_rel) if store.is_local else store.get_dir(model_rel, tmp / "source")
    verify_outputs(store, model_rel, entries, content=True, local_dir=Path(local),
                   fix=f"re-run the stage that wrote {store.uri(prefix)}")
    return Path(local)


def write_hf(source: Path, out: Path, dtype: str, max_shard_size: str, context: int) -> dict:
    """Safetensors in ``dtype`` (sharded with an index above ``max_shard_size``), a portable config,
    the tokenizer and a generation config. Returns the config written."""
    import torch
    from huggingface_hub import save_torch_state_dict
    from safetensors.torch import load_file
    from transformers import GenerationConfig, PretrainedConfig

    target = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    state = {}
    for shard in sorted(source.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    if not state:
        raise StageError(f"{source}: no safetensors weights to export")
    out.mkdir(parents=True)
    save_torch_state_dict({k: v.to(target).contiguous() for k, v in state.items()}, out, max_shard_size=max_shard_size)
    shutil.copyfile(source / "config.json", out / "config.json")
    # the longest length the model was trained on: what servers size their context by
    config = write_portable_config(out, max_position_embeddings=context, dtype=dtype)
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    if (source / "generation_config.json").is_file():
        shutil.copyfile(source / "generation_config.json", out / "generation_config.json")
    else:
        GenerationConfig.from_model_config(PretrainedConfig.from_dict(config)).save_pretrained(out)
    return config


def write_gguf(hf: Path, out: Path, name: str, types: list[str], pre_tokenizer: str, log_path: Path) -> dict[str, Path]:
    """One GGUF per type: converter types directly, k-quants from a 16-bit conversion (kept only if
    it was asked for)."""
    out.mkdir(parents=True)
    made: dict[str, Path] = {}
    for t in [t for t in types if t in CONVERTER_TYPES]:
        made[t] = out / f"{name}.{t}.gguf"
        convert(hf, made[t], t, pre_tokenizer=pre_tokenizer, log=log_path)
    quantized = [t for t in types if t not in CONVERTER_TYPES]
    if quantized:
        base = next((made[t] for t in ("f32", "bf16", "f16") if t in made), None)
        if base is None:  # the quantizer's input: a 16-bit file, not published
            base = out.parent / f"{name}.f16.intermediate.gguf"
            convert(hf, base, "f16", pre_tokenizer=pre_tokenizer, log=log_path)
        for t in quantized:
            made[t] = out / f"{name}.{t}.gguf"
            quantize(base, made[t], t, log=log_path)
    return made


def check_gguf(path: Path, theta: float, context: int, vocab: int) -> dict:
    """A GGUF whose θ, context length or vocabulary differ from the model's fails the stage."""
    meta = read_metadata(path)
    problems = []
    if meta["rope_theta"] is None or not math.isclose(float(meta["rope_theta"]), theta, rel_tol=1e-6):
        problems.append(f"RoPE θ {meta['rope_theta']:g} (trained with {theta:g})")
    if meta["context_length"] != context:
        problems.append(f"context length {meta['context_length']} (trained to {context})")
    if meta["vocab_size"] != vocab:
        problems.append(f"vocabulary of {meta['vocab_size']} tokens (the model has {vocab})")
    if problems:
        raise StageError(f"{path.name}: llama.cpp's file does not match the model: {'; '.join(problems)}")
    return meta


def _eval_report(recipe: Recipe, store: Store, run: str, stage: str, source: str, snapshot: str | None) -> str | None:
    """The table of a finished evaluation of this model, for the model card: an eval stage of the
    exported (or the source) model, or the snapshot's own evaluation."""
    if snapshot is not None:
        evaluated = snapshot.rsplit("/", 1)[0]
        return store.read_text(f"{evaluated}/results.md") if read_manifest_at(store, evaluated) else None
    evals = [s for s in recipe.graph.of_kind("eval") if recipe.stages[s].model_from in (source, stage)]
    return next((store.read_text(f"{stage_prefix(run, s)}/results.md") for s in evals
                 if read_manifest(store, run, s) is not None), None)


def run_export_stage(recipe: Recipe, store: Store, run: str, stage: str, snapshot: str | None = None) -> None:
    """The export stage on ``from``'s model; with ``snapshot`` (a folder prolong.snapshots wrote,
    holding request.json) the same export of a snapshot's model, into that folder."""
    request = store.read_json(f"{snapshot}/request.json") if snapshot is not None else None
    if request is None:
        cfg = recipe.stages[stage]
        source = cfg.model_from
        chain = recipe.graph.model_chain(stage)
        model_rel = f"{stage_prefix(run, source)}/{read_manifest(store, run, source).artifacts['hf_model']}"
        rec = StageRecorder(store, run, recipe, stage)
    else:
        recipe = recipe_from_dict(request["recipe"])
        stage, source, model_rel = request["stage"], request["model_stage"], request["model"]
        cfg = recipe.stages[stage]
        chain = [stage, *recipe.graph.model_chain(source)]
        rec = StageRecorder(store, run, recipe, stage, prefix=snapshot, upstream=request["upstream"])
    trained = [s for s in chain if recipe.stages[s].kind == "train"]
    theta = recipe.stages[trained[0]].rope_theta  # the newest training stage's θ
    context = max(recipe.stages[s].seq_len for s in trained)
    name = cfg.name or recipe.name
    rec.invalidate()
    progress = StageProgress(store, layout.progress(rec.prefix), stage, total=3, unit="parts")
    with tempfile.TemporaryDirectory(prefix="prolong-export-") as tmp_:
        tmp = Path(tmp_)
        progress.update(0, phase=f"hf: {cfg.dtype} safetensors", force=True)
        src = _source_dir(store, model_rel, tmp)
        config = write_hf(src, tmp / "hf", cfg.dtype, cfg.max_shard_size, context)
        progress.update(1, phase=f"gguf: {', '.join(cfg.gguf) or 'none'}")
        made = write_gguf(tmp / "hf", tmp / "gguf", name, cfg.gguf, cfg.pre_tokenizer, tmp / "export.log")
        progress.update(2, phase="checks, model card, upload")
        checks = {f"gguf/{p.name}": check_gguf(p, theta, context, config["vocab_size"]) for p in made.values()}
        files = {f"hf/{p.relative_to(tmp / 'hf')}": {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted((tmp / "hf").rglob("*")) if p.is_file()}
        files.update({f"gguf/{p.name}": {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in made.values()})
        eval_report = _eval_report(recipe, store, run, stage, source, snapshot)
        lineage = {s: m.digest for s in [*chain[1:], *recipe.graph.of_kind("data")]
                   if (m := read_manifest(store, run, s)) is not None}
        (tmp / "hf" / "README.md").write_text(card.model_card(
            recipe, run, stage, source, chain, files, lineage, {"version": code_version(), "git": git_state()},
            eval_report, theta, context))
        (tmp / "report.md").write_text(card.report(recipe, stage, files, checks, store.uri(rec.prefix)))
        rec.put_dir(tmp / "hf", "hf")
        rec.put_dir(tmp / "gguf", "gguf")
        rec.put_file(tmp / "report.md", "report.md")
        if (tmp / "export.log").exists():
            rec.put_file(tmp / "export.log", f"{layout.LOGS}/export.log")
    hf_bytes = sum(f["bytes"] for p, f in files.items() if p.startswith("hf/"))
    rec.finish(metrics={"dtype": cfg.dtype, "hf_bytes": hf_bytes, "rope_theta": theta, "context_length": context,
                        "gguf": {t: files[f"gguf/{p.name}"]["bytes"] for t, p in made.items()}},
               artifacts={"hf_model": "hf", "gguf": {t: f"gguf/{p.name}" for t, p in made.items()},
                          "report": "report.md", "model_card": "hf/README.md"})
    progress.finish()
