"""LongLoRA against full continued training, side by side: same tiny model, same data, same cores.

    .venv/bin/python bench/longlora_vs_full.py [--steps 20]

recipes/tiny-longlora.yaml's ``base`` (the tiny Llama pretrained at 128 tokens) is trained once; then
its 8× context extension to 1K tokens is trained twice from it, one after the other, on the same
streams and token count:

* **LongLoRA** — the recipe's ``longlora`` stage: LoRA r 8 on q/k/v/o with embeddings and norms in
  full, S²-Attn (groups of 256), position interpolation ×8, constant LR after warmup;
* **full (ProLong-style)** — every parameter trains, full attention, RoPE θ raised 16× (ProLong's
  5e5 → 8e6 for 8×) instead of interpolation, Table 9's cosine schedule;

each through the real pipeline and local job backend, then merged (LongLoRA) and evaluated with
LongLoRA's sliding-window perplexity on the recipe's long documents at 256, 512 and 1K tokens.
Reported: training tokens/s — in the stage jobs (median of their steps after the first), and the
ratio from the two configurations built in one process with their steps alternated (``--rounds``),
which load on the machine affects alike — the job's peak resident memory
(sum over its processes, sampled every 0.1 s), trainable parameters, the final checkpoint's size,
and perplexity by length for the base and both models. Writes
``bench/results/longlora_vs_full-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RECIPE = ROOT / "recipes" / "tiny-longlora.yaml"
EVAL = ["eval.perplexity.seq_lens=[256,512,1K]"]
# the stages each run keeps, and what it changes in the recipe's context extension (`longlora`)
VARIANTS = {
    # longlora is kept (not run) so that the data stage prepares its streams too: one data stage for all
    "base": (("data", "base", "longlora", "eval"), ["eval.model_from=base"]),
    "longlora": (("data", "base", "longlora", "merge", "eval"), ["eval.model_from=merge"]),
    "full": (("data", "base", "longlora", "eval"),
             ["longlora.lora=null", "model.attention_pattern=full", "longlora.rope_scaling=null",
              "longlora.rope_theta=1.6e5", "longlora.lr_schedule=cosine", "longlora.warmup_steps=null",
              "longlora.warmup_ratio=0.1", "longlora.min_lr_ratio=0.1", "longlora.optim.weight_decay=0.1",
              "eval.model_from=longlora"]),
}


def variant(name: str, steps: list[str]):
    from prolong.recipe import apply_overrides, read_recipe_file, recipe_from_dict

    keep, overrides = VARIANTS[name]
    raw = read_recipe_file(RECIPE)
    raw["stages"] = {k: v for k, v in raw["stages"].items() if k in keep}
    return recipe_from_dict(apply_overrides(raw, [*steps, *EVAL, *overrides]))


class PeakMemory:
    """Peak of the summed resident memory of this process's descendants (the job's processes)."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from prolong.jobs.supervise import descendants

        while not self._stop.wait(0.1):
            total = 0
            for pid in descendants(os.getpid()):
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
                except (OSError, ValueError, IndexError):
                    pass
            self.peak = max(self.peak, total)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def interleaved_tokens_per_s(recipes: dict, base_dir: str, rounds: int) -> dict[str, float]:
    """Training tokens/s of each variant's extension stage, measured in this process with the steps
    of the variants alternated (so the machine's load falls on each alike): each built as its job
    builds it (model from the base, LoRA/S²/θ/scaling from its config, the engine), then ``rounds``
    steps of 4 × 1K-token samples of packed documents each; median per variant."""
    import numpy as np
    import torch

    from prolong.model.load import load_model
    from prolong.parallel.engine import build_engine
    from prolong.parallel.world import init_world
    from prolong.train.batch import collate
    from prolong.train.lm import TrainingLM
    from prolong.train.trainer import Trainer

    world = init_world()
    rng = np.random.default_rng(0)
    lengths = [[300, 500, 224], [1024], [100, 924], [512, 512]]
    samples = [{"input_ids": rng.integers(10, 4000, 1024).astype("uint32"),
                "indices": np.array([[sum(d[:i]), sum(d[:i + 1])] for i in range(len(d))])} for d in lengths]
    built = {}
    for name, recipe in recipes.items():
        cfg = recipe.train_stage("longlora")
        torch.manual_seed(0)
        lm = load_model(base_dir, rope_theta=cfg.rope_theta, rope_scaling=cfg.rope_scaling, seq_len=cfg.seq_len,
                        dtype="float32")
        if cfg.lora is not None:
            from prolong.model.lora import apply_lora

            apply_lora(lm, cfg.lora, torch.float32, "longlora.lora")
        engine = build_engine(TrainingLM(lm, cfg.loss_chunk_size, s2_group_size=recipe.model.s2_group_size(1024)),
                              cfg, recipe.parallel, world, torch.float32, accumulation=1)
        built[name] = Trainer(engine, iter([]), cfg, world, accumulation=1, callbacks=[])
    times: dict[str, list[float]] = {name: [] for name in built}
    for r in range(rounds + 1):  # the first round warms up
        for name, trainer in built.items():
            start = time.perf_counter()
            trainer.train_step([collate(samples)])
            if r:
                times[name].append(time.perf_counter() - start)
    return {name: 4096 / statistics.median(t) for name, t in times.items()}


def count_params(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20, help="steps of the context extension (4K tokens each)")
    ap.add_argument("--rounds", type=int, default=10, help="alternated steps per variant for tokens/s")
    args = ap.parse_args()
    from prolong.layout import stage_prefix
    from prolong.manifest import read_manifest
    from prolong.pipeline import RunContext, publish_recipe, run_stage
    from prolong.store import Store

    steps = [f"longlora.steps={args.steps}", f"longlora.checkpoint_every={args.steps}"]
    root = Path(tempfile.mkdtemp(prefix="bench-longlora-"))
    out: dict = {"machine": f"{platform.machine()}-{os.cpu_count()}cpu", "torch_threads": None,
                 "extension": {"tokens": args.steps * 4096, "seq_len": 1024, "steps": args.steps}, "models": {}}
    try:
        import torch

        out["torch_threads"] = torch.get_num_threads()
        shared = root / "shared"
        ctx = RunContext(variant("base", steps), Store(str(shared)), "bench", log_dir=root / "logs")
        publish_recipe(ctx)
        for stage in ("data", "base"):
            run_stage(ctx, stage)
        out["models"]["base"] = {"perplexity_by_length": run_stage(ctx, "eval").manifest.metrics["perplexity"]["by_length"]}
        for name in ("longlora", "full"):
            store = Store(str(root / name))
            vctx = RunContext(variant(name, steps), store, "bench", log_dir=root / "logs")
            publish_recipe(vctx)
            for stage in ("data", "base"):  # the same streams and base model: done, not re-run
                shutil.copytree(shared / "bench" / stage, store.local_path(stage_prefix("bench", stage)))
            with PeakMemory() as memory:
                trained = run_stage(vctx, "longlora")
            assert not any(r.skipped for r in [trained]) and read_manifest(store, "bench", "base").digest == \
                read_manifest(Store(str(shared)), "bench", "base").digest
            trained = trained.manifest
            if name == "longlora":
                run_stage(vctx, "merge")
            evaluated = run_stage(vctx, "eval").manifest
            stage_dir = store.local_path("bench/longlora")
            rows = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
            rates = [r["tokens_per_s"] for r in rows[1:] if r.get("tokens_per_s")]
            total = trained.metrics.get("total_params") or count_params(stage_dir / "hf" / "model.safetensors")
            out["models"][name] = {
                "tokens_per_s_median": statistics.median(rates), "peak_rss_gib": memory.peak / 2**30,
                "trainable_params": trained.metrics.get("trainable_params", total), "total_params": total,
                "checkpoint_bytes": folder_bytes(stage_dir / trained.artifacts["checkpoint"]),
                "loss_first": trained.metrics["loss_first"], "loss_last10": trained.metrics["loss_last10"],
                "perplexity_by_length": evaluated.metrics["perplexity"]["by_length"],
            }
        rates = interleaved_tokens_per_s({n: variant(n, steps) for n in ("longlora", "full")},
                                         str(shared / "bench" / "base" / "hf"), args.rounds)
        for name, rate in rates.items():
            out["models"][name]["tokens_per_s_interleaved"] = rate
        lora, full = out["models"]["longlora"], out["models"]["full"]
        out["ratios_longlora_over_full"] = {
            "tokens_per_s": lora["tokens_per_s_interleaved"] / full["tokens_per_s_interleaved"],
            "tokens_per_s_in_the_stage_jobs": lora["tokens_per_s_median"] / full["tokens_per_s_median"],
            "peak_rss": lora["peak_rss_gib"] / full["peak_rss_gib"],
            "trainable_params": lora["trainable_params"] / full["trainable_params"],
            "checkpoint_bytes": lora["checkpoint_bytes"] / full["checkpoint_bytes"],
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out, indent=1))
    dest = ROOT / "bench" / "results" / f"longlora_vs_full-{out['machine']}.json"
    dest.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
