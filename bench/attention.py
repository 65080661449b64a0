"""Document-masked attention vs dense attention with a document mask: forward + backward on CPU.

    .venv/bin/python bench/attention.py [--length 16384] [--docs 1024] [--heads 8] [--kv-heads 2] [--dim 64]

Both compute exactly the same outputs (checked): the dense path runs SDPA over the whole sequence
with an L×L block-diagonal causal mask; the document path (``prolong.model.attention``) runs SDPA
per document, documents of equal length batched. Two layouts: equal lengths (L/docs each) and
random lengths with the same total. Prints one JSON line (goal: ≥ 8× faster; ideal 16×) and writes
``bench/results/attention-<machine>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prolong.model import attention  # noqa: E402
from prolong.model.attention import DocumentLayout, document_attention  # noqa: E402


class GQA:
    def __init__(self, groups):
        self.num_key_value_groups = groups


def inputs(length, heads, kv_heads, dim, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, length, dim, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, length, dim, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, length, dim, generator=g, requires_grad=True)
    return q, k, v


def dense(q, k, v, lengths):
    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    mask = (doc[:, None] == doc[None, :]) & torch.ones(len(doc), len(doc), dtype=torch.bool).tril()
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)


def documents(q, k, v, lengths, groups):
    layout = DocumentLayout.from_lengths([lengths])
    out, _ = document_attention(GQA(groups), q, k, v, None, cu_seq_lens_q=layout.cu_seqlens,
                                max_length_q=layout.max_seqlen)
    return out


def time_fwd_bwd(fn, q, k, v, repeats):
    times, out = [], None
    for _ in range(repeats):
        for t in (q, k, v):
            t.grad = None
        t0 = time.perf_counter()
        out = fn(q, k, v)
        out.sum().backward()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--docs", type=int, default=1024)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    attention.select_backend("sdpa")
    rng = torch.Generator().manual_seed(1)
    cuts = sorted(torch.randperm(args.length - 1, generator=rng)[:args.docs - 1].add(1).tolist())
    layouts = {"equal": [args.length // args.docs] * args.docs,
               "random": [b - a for a, b in zip([0, *cuts], [*cuts, args.length])]}
    result = {"benchmark": "attention", "machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "length": args.length, "docs": args.docs,
              "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.dim, "dtype": "float32",
              "repeats": args.repeats, "goal": ">= 8x (ideal 16x)"}
    groups = args.heads // args.kv_heads
    for name, lengths in layouts.items():
        q, k, v = inputs(args.length, args.heads, args.kv_heads, args.dim)
        t_doc, o_doc = time_fwd_bwd(lambda a, b, c: documents(a, b, c, lengths, groups), q, k, v, args.repeats)
        g_doc = [t.grad.clone() for t in (q, k, v)]
        t_dense, o_dense = time_fwd_bwd(lambda a, b, c: dense(a, b, c, lengths), q, k, v, max(1, args.repeats - 1))
        torch.testing.assert_close(o_doc, o_dense, rtol=1e-4, atol=1e-5)
        for a, b in zip(g_doc, (q.grad, k.grad, v.grad)):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)
        result[f"{name}_document_s"] = round(t_doc, 4)
        result[f"{name}_dense_s"] = round(t_dense, 3)
        result[f"{name}_speedup"] = round(t_dense / t_doc, 1)
        result[f"{name}_distinct_lengths"] = len(set(lengths))
    print(json.dumps(result))
    (ROOT / "bench" / "results" / f"attention-{platform.machine()}-{os.cpu_count()}cpu.json").write_text(
        json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
