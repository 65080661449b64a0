"""Check the per-rank memory model (prolong.parallel.memory) against measured peaks, then apply it
to Llama-3-8B at 512K with SP = 8 (docs/memory-model.md).

    .venv/bin/python bench/memory_model.py

Measured cases: the tiny Llama (4 layers, 6 heads / 2 KV heads, vocab 4096) in fp32 on CPU, one
sequence of three documents, fused chunked loss, with and without activation checkpointing, at
SP = 1 in this process and SP = 2 on two gloo ranks (each rank measures its own step). The peak is
read from torch.distributed's MemTracker: bytes at the moment of peak, minus parameters.
Prints one JSON line and writes ``bench/results/memory_model-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CASES = [(2048, 512, False), (4096, 1024, False), (4096, 1024, True), (8192, 1024, True)]
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8)


def three_documents(seq_len: int, vocab: int) -> dict:
    """One packed sample; its middle document is longer than L/2, so SP = 2 splits it across ranks."""
    import numpy as np

    ends = np.cumsum([seq_len // 8, seq_len * 3 // 4, seq_len - seq_len // 8 - seq_len * 3 // 4])
    ids = np.random.default_rng(0).integers(10, vocab, seq_len).astype("uint32")
    return {"input_ids": ids, "indices": np.stack([np.r_[0, ends[:-1]], ends], 1), "domain": "bench"}


def measure(seq_len: int, chunk: int, ac: bool, sp=None, world=None) -> dict:
    """One micro-batch's measured and predicted activation peak on this rank."""
    import torch

    from prolong.model import attention
    from prolong.train.lm import TrainingLM
    from prolong.model.load import load_model
    from prolong.parallel.parallelize import parallelize
    from prolong.parallel.world import World
    from prolong.parallel.memory import Shape, estimate, measure_step
    from prolong.train.batch import collate

    attention.select_backend("sdpa", torch.device("cpu"))
    lm = load_model("builtin:tiny-llama", rope_theta=8e6, dtype="float32")
    world = world or World(0, 1, 0, torch.device("cpu"))
    # no FSDP: the states are not what is measured, and every rank keeps the whole (tiny) model
    model = parallelize(TrainingLM(lm, chunk), world, activation_checkpointing=ac, compile=False,
                        param_dtype=torch.float32, shard=False)
    mb = collate([three_documents(seq_len, lm.config.vocab_size)])
    if sp is not None:
        mb = mb.shard(sp)
    peak = measure_step(model, mb)
    measured = peak["total"] - peak["param"] - peak["buffer"]
    est = estimate(Shape.of(lm.config), seq_len=seq_len, sequence_parallel=sp.size if sp else 1,
                   activation_checkpointing=ac, loss_chunk_size=chunk, compute_bytes=4)
    return {"seq_len": seq_len, "loss_chunk": chunk, "activation_checkpointing": ac,
            "sequence_parallel": sp.size if sp else 1, "measured_bytes": measured,
            "predicted_bytes": est.activations, "ratio": round(measured / est.activations, 3)}


def sp_worker(out: str) -> None:
    """Under torchrun: every rank measures its own step at SP = world size."""
    from prolong.parallel.dims import ParallelDims
    from prolong.parallel.ulysses import build_group
    from prolong.parallel.world import init_world, shutdown

    world = init_world()
    sp = build_group(world, ParallelDims(world.world_size, world.world_size))
    rows = [measure(seq_len, chunk, ac, sp=sp, world=world) for seq_len, chunk, ac in CASES if ac]
    if world.is_main:
        Path(out).write_text(json.dumps(rows))
    shutdown()


def measure_sp(nproc: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "sp.json"
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        __file__, "--sp-worker", str(out)], check=True, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
        return json.loads(out.read_text())


def llama3_8b_at_512k() -> dict:
    from transformers import LlamaConfig

    from prolong.parallel.memory import GiB, Shape, estimate, report

    shape = Shape.of(LlamaConfig(**LLAMA3_8B))
    out = {}
    for name, kwargs in {"sp8_world8": dict(sequence_parallel=8, world_size=8),
                         "sp8_world64": dict(sequence_parallel=8, world_size=64),
                         "sp1_world8": dict(sequence_parallel=1, world_size=8)}.items():
        est = estimate(shape, seq_len=512 * 1024, loss_chunk_size=8192, compute_bytes=2, **kwargs)
        out[name] = {"peak_gib": round(est.total / GiB, 1), "phase": est.peak_phase, "report": report(est)}
    return out


def main() -> None:
    rows = [measure(*case) for case in CASES] + measure_sp(2)
    result = {"benchmark": "memory_model", "machine": f"{platform.machine()}-{os.cpu_count()}cpu",
              "measured": rows, "llama3_8b_512k": llama3_8b_at_512k()}
    print(json.dumps({"ratios": [r["ratio"] for r in rows],
                      "llama3_8b_512k_sp8_gib": result["llama3_8b_512k"]["sp8_world8"]["peak_gib"]}))
    path = ROOT / "bench" / "results" / f"memory_model-{result['machine']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--sp-worker", metavar="OUT")
    args = parser.parse_args()
    sp_worker(args.sp_worker) if args.sp_worker else main()
