"""Peak memory of the chunked (fused) cross-entropy vs the plain one: 16K tokens × 32K vocabulary.

    .venv/bin/python bench/loss.py [--tokens 16384] [--vocab 32768] [--hidden 4096]

Each variant runs forward + backward in a fresh process; its peak is the growth of the process's
maximum resident set size over the inputs alone (CPU, fp32). Prints one JSON line (goal: chunked
≤ 1/4 of plain) for chunks of 8192 (the default), 4096 and 2048 tokens, and writes
``bench/results/loss-<machine>.json``. The chunk's logits are the floor: a chunk of half the
benchmark's tokens cannot go below half of plain's logits.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(variant: str, tokens: int, vocab: int, hidden: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F

    from prolong.train.loss import chunked_cross_entropy_sum

    torch.manual_seed(0)
    h = torch.randn(tokens, hidden, requires_grad=True)
    w = (torch.randn(vocab, hidden) * 0.02).requires_grad_(True)
    t = torch.randint(0, vocab, (tokens,))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "plain":
        loss = F.cross_entropy(h @ w.t(), t, reduction="sum")
    else:
        loss = chunked_cross_entropy_sum(h, w, t, chunk_size=int(variant))
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"variant": variant, "peak_mib": (peak - base) / 1024, "loss": loss.item()}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--child", default=None)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.tokens, args.vocab, args.hidden)
    rows = {}
    for variant in ("plain", "8192", "4096", "2048"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--tokens", str(args.tokens), "--vocab",
                              str(args.vocab), "--hidden", str(args.hidden)], capture_output=True, text=True, check=True)
        rows[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    plain = rows["plain"]["peak_mib"]
    result = {
        "benchmark": "loss", "machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
        "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "dtype": "float32",
        "plain_peak_mib": round(plain, 1),
        **{f"chunked_{k}_peak_mib": round(v["peak_mib"], 1) for k, v in rows.items() if k != "plain"},
        **{f"chunked_{k}_ratio": round(v["peak_mib"] / plain, 3) for k, v in rows.items() if k != "plain"},
        "max_loss_rel_diff": max(abs(v["loss"] - rows["plain"]["loss"]) / rows["plain"]["loss"] for v in rows.values()),
        "goal": "chunked peak <= 0.25 x plain",
        "goal_met_at_chunk_sizes": [int(k) for k, v in rows.items() if k != "plain" and v["peak_mib"] / plain <= 0.25],
    }
    print(json.dumps(result))
    (ROOT / "bench" / "results" / f"loss-{platform.machine()}-{os.cpu_count()}cpu.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
