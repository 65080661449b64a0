"""The evaluation stage as a job: long-context recall (JSON KV) and lm-eval short tasks.

Writes per-item JSONL, ``results.json`` and ``results.md`` (the table shown in the Prefect UI)
into ``{run}/eval/``, then the manifest. Greedy decoding throughout.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from prolong import assets
from prolong.config import Recipe
from prolong.errors import ConfigError
from prolong.eval.json_kv import make_examples
from prolong.eval.metrics import substring_exact_match
from prolong.manifest import StageRecorder, read_manifest, stage_prefix
from prolong.model.load import DTYPES
from prolong.parallel import init_world
from prolong.store import Store

log = logging.getLogger(__name__)


def _load_for_generation(path: str, dtype: str, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 62
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="sdpa").to(device)
    model.eval()
    return model, tok


@torch.no_grad()
def run_json_kv(model, tok, cfg, use_chat_template: bool, device) -> tuple[list[dict], dict]:
    examples = make_examples(tok, cfg.lengths, cfg.depths, cfg.samples_per_depth, cfg.max_new_tokens, cfg.seed,
                             use_chat_template)
    items = []
    for ex in examples:
        ids = tok(ex.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=cfg.max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
        prediction = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        items.append({"task": "json_kv", "length": ex.length, "depth": ex.depth, "num_pairs": ex.num_pairs,
                      "input_tokens": ids.shape[1], "answer": ex.answer, "prediction": prediction,
                      "subem": substring_exact_match(prediction, ex.answer), "seconds": time.perf_counter() - t0})
    by_len, by_depth = defaultdict(list), defaultdict(list)
    for it in items:
        by_len[it["length"]].append(it["subem"])
        by_depth[f'{it["length"]}@{it["depth"]}'].append(it["subem"])
    summary = {
        "by_length": {str(k): 100 * sum(v) / len(v) for k, v in sorted(by_len.items())},
        "by_depth": {k: 100 * sum(v) / len(v) for k, v in sorted(by_depth.items())},
    }
    summary["mean"] = sum(summary["by_length"].values()) / len(summary["by_length"])
    return items, summary


def run_lm_eval(model_dir: str, cfg, max_length: int, dtype: str, device) -> dict:
    """One lm-eval call per distinct shot count (the Open LLM Leaderboard v1 convention)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = assets.resolve(cfg.include_path) if cfg.include_path else None
    manager = TaskManager(include_path=include) if include else TaskManager()
    by_shots = defaultdict(list)
    for task in cfg.tasks:
        by_shots[cfg.shots(task)].append(task)
    results = {}
    for shots, tasks in sorted(by_shots.items()):
        out = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": model_dir, "dtype": dtype, "max_length": max_length},
            tasks=tasks, num_fewshot=shots, limit=cfg.limit, batch_size=cfg.batch_size, device=str(device),
            task_manager=manager, log_samples=False, bootstrap_iters=0)
        for task, metrics in out["results"].items():
            # lm-eval names metrics "acc,none", "acc_stderr,none", ...; keep metric values only
            results[task] = {"num_fewshot": shots, **{k.split(",")[0]: v for k, v in metrics.items()
                                                       if "," in k and isinstance(v, (int, float))}}
    return results


def results_markdown(run: str, model_from: str, summary: dict) -> str:
    lines = [f"# Evaluation of `{run}` ({model_from})", ""]
    if "json_kv" in summary:
        kv = summary["json_kv"]
        lengths = list(kv["by_length"])
        lines += ["## Recall — JSON KV (SubEM, %)", "", "| " + " | ".join(["length", *lengths, "mean"]) + " |",
                  "|" + "---|" * (len(lengths) + 2),
                  "| JSON KV | " + " | ".join(f"{kv['by_length'][k]:.1f}" for k in lengths) + f" | {kv['mean']:.1f} |", ""]
    if "lm_eval" in summary:
        lines += ["## Short-context tasks (lm-eval)", "", "| task | shots | metric | value |", "|---|---|---|---|"]
        for task, m in sorted(summary["lm_eval"].items()):
            for key, value in sorted(m.items()):
                if key != "num_fewshot" and "stderr" not in key:
                    lines.append(f"| {task} | {m['num_fewshot']} | {key} | {value:.4f} |")
        lines.append("")
    return "\n".join(lines)


def run_eval_stage(recipe: Recipe, store: Store, run: str) -> None:
    world = init_world()
    cfg = recipe.eval
    rec = StageRecorder(store, run, recipe, "eval")
    if not world.is_main:
        return  # evaluation runs on one process; extra ranks have nothing to do
    rec.invalidate()
    upstream = read_manifest(store, run, cfg.model_from)
    seq_len = recipe.train_stage(cfg.model_from).seq_len
    with tempfile.TemporaryDirectory(prefix="prolong-eval-") as tmp_:
        tmp = Path(tmp_)
        rel = f"{stage_prefix(run, cfg.model_from)}/{upstream.artifacts['hf_model']}"
        model_dir = str(store.local_path(rel)) if store.is_local else str(store.get_dir(rel, tmp / "model"))
        summary, items = {}, []
        if cfg.json_kv is not None:
            model, tok = _load_for_generation(model_dir, recipe.model.dtype, world.device)
            chat = cfg.model_from == "sft"  # HELMET: chat template for instruction-tuned models only
            kv_items, summary["json_kv"] = run_json_kv(model, tok, cfg.json_kv, chat, world.device)
            items += kv_items
            del model
        if cfg.lm_eval is not None:
            max_length = cfg.lm_eval.max_length or seq_len
            summary["lm_eval"] = run_lm_eval(model_dir, cfg.lm_eval, max_length, recipe.model.dtype, world.device)
        if not summary:
            raise ConfigError("eval: enable at least one of json_kv, lm_eval")
        (tmp / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        rec.put_file(tmp / "items.jsonl", "items.jsonl")
        rec.write_json("results.json", summary)
        md = results_markdown(run, cfg.model_from, summary)
        (tmp / "results.md").write_text(md)
        rec.put_file(tmp / "results.md", "results.md")
    rec.finish(metrics=summary, artifacts={"results": "results.json", "report": "results.md", "items": "items.jsonl"})
