"""The data stage scaled out, and what training from packed folders saves.

    .venv/bin/python bench/data_stage.py [--repeats 3]

1. Throughput of the tiny recipe's data stage (every stream its three training stages read: four
   domains) as one job, and split by domain (`parts: domain`) with 1 and 2 parts at a time
   (`jobs.max_parallel_parts`), each through the real pipeline and local job backend — tokens
   written per second of wall time, median of ``--repeats``, interleaved so drift hits each alike.
2. Time from the start of a run to a finished one-step stage 1, when stage 1 reads our own data
   stage's streams (tiny.yaml cut to data → stage1: prepare them first) vs the packed folders of
   ProLong's released layout (tiny-released.yaml cut to released → stage1 over
   builtin:tiny-prolong-mds: check them, then stream in place).
   Both include the same model load, step and export; the assets are built before timing.

Writes ``bench/results/data_stage-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def run_stages(recipe, stages: list[str], root: Path) -> tuple[float, dict]:
    from prolong.pipeline import RunContext, publish_recipe, run_stage
    from prolong.store import Store

    store = Store(str(root))
    ctx = RunContext(recipe, store, "bench", log_dir=root / "logs")
    publish_recipe(ctx)
    start = time.perf_counter()
    results = {s: run_stage(ctx, s) for s in stages}
    return time.perf_counter() - start, {s: r.manifest.metrics for s, r in results.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from prolong import assets
    from prolong.recipe import load_recipe, recipe_from_dict

    for asset in ("tiny-llama", "tiny-corpus", "tiny-prolong-mds"):
        assets.resolve(f"builtin:{asset}")
    data_cases = {
        "one job": ["stages.data.parts=one"],
        "parts, 1 at a time": ["stages.data.parts=domain", "jobs.max_parallel_parts=1"],
        "parts, 2 at a time": ["stages.data.parts=domain", "jobs.max_parallel_parts=2"],
    }
    first_step = {
        "own data stage": ("recipes/tiny.yaml", ["data", "stage1"]),
        "packed folders": ("recipes/tiny-released.yaml", ["released", "stage1"]),
    }
    one_step = ["stage1.steps=1", "stage1.checkpoint_every=0"]
    seconds: dict[str, list[float]] = {k: [] for k in [*data_cases, *first_step]}
    tokens = None
    with tempfile.TemporaryDirectory(prefix="bench-data-stage-") as tmp_:
        tmp = Path(tmp_)
        for rep in range(args.repeats):
            for name, overrides in data_cases.items():
                s, metrics = run_stages(load_recipe("recipes/tiny.yaml", overrides), ["data"], tmp / f"{rep}-{name}")
                seconds[name].append(s)
                tokens = metrics["data"]["tokens"]
            for name, (path, stages) in first_step.items():
                raw = load_recipe(path, one_step).model_dump(mode="json")
                raw["stages"] = {k: v for k, v in raw["stages"].items() if k in stages}  # what stage 1 needs only
                s, _ = run_stages(recipe_from_dict(raw), stages, tmp / f"{rep}-{name}")
                seconds[name].append(s)
    median = {k: statistics.median(v) for k, v in seconds.items()}
    result = {
        "benchmark": "data_stage", "machine": f"{'vm' if os.path.exists('/dev/vda') else 'host'} {platform.machine()}",
        "cpus": os.cpu_count(), "repeats": args.repeats, "data_tokens": tokens, "seconds": seconds,
        "median_seconds": median,
        "data_tokens_per_s_median": {k: round(tokens / median[k]) for k in data_cases},
        "ratio_2_parts_vs_1_part": round(median["parts, 1 at a time"] / median["parts, 2 at a time"], 2),
        "ratio_2_parts_vs_one_job": round(median["one job"] / median["parts, 2 at a time"], 2),
        "ratio_first_step_packed_vs_own": round(median["own data stage"] / median["packed folders"], 2),
    }
    out = ROOT / "bench" / "results" / f"data_stage-{platform.machine()}-{os.cpu_count()}cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
