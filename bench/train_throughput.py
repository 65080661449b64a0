"""Training throughput and MFU of a Llama-3-8B-shaped model at 64K tokens on one GPU.

    .venv/bin/python bench/train_throughput.py [--layers 4] [--seq 65536] [--steps 8] [--layout single|packed]

The model has Llama-3-8B's width (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocabulary 128256)
with fewer layers so that one GPU holds it with fp32 master weights and AdamW states. It trains
through this project's engine: document-masked attention (backend `auto`), activation
checkpointing, bf16 compute, fused chunked cross-entropy. `single`: one 64K document per sequence
(nominal MFU = document-aware MFU); `packed`: documents of ShortMix-like lengths. Prints one JSON
line (goal ≥ 44% nominal MFU; ProLong reports 31%) and writes ``bench/results/train_throughput-<gpu>.json``.
Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=65536)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--layout", choices=["single", "packed"], default="single")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--compile", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("train_throughput: needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    from prolong.config import load_recipe
    from prolong.model import attention
    from prolong.model.lm import TrainingLM
    from prolong.parallel import World, parallelize
    from prolong.train.batch import collate
    from prolong.train.flops import FlopCounter, peak_flops
    from prolong.train.main import build_optimizer
    from prolong.train.schedule import build_scheduler
    from prolong.train.trainer import Trainer

    device = torch.device("cuda")
    world = World(rank=0, world_size=1, local_rank=0, device=device)
    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         num_hidden_layers=args.layers, vocab_size=128256, max_position_embeddings=args.seq,
                         rope_theta=8e6, tie_word_embeddings=False)
    attention.register()
    config._attn_implementation = attention.ATTN_IMPLEMENTATION
    config.use_cache = False
    with torch.device(device):
        lm = LlamaForCausalLM(config)
    backend = attention.select_backend(args.attention, device)
    model = parallelize(TrainingLM(lm, loss_chunk_size=8192), world, activation_checkpointing=True,
                        compile=args.compile, param_dtype=torch.bfloat16)
    cfg = load_recipe(ROOT / "recipes" / "prolong-8b.yaml", [f"stage1.seq_len={args.seq}",
                                                             f"stage1.batch_tokens={args.seq}"]).stage1
    optimizer = build_optimizer(model, cfg)
    trainer = Trainer(model, optimizer, build_scheduler(optimizer, 1000, 0.0, 0.1), iter([]), cfg, world, accumulation=1,
                      callbacks=[], flops=FlopCounter.for_model(lm), peak_flops=peak_flops(device))
    g = torch.Generator().manual_seed(0)

    def batch():
        if args.layout == "single":
            lengths = [args.seq]
        else:  # ShortMix-like: mostly short documents, a few long ones, packed to the sequence
            lengths, left = [], args.seq
            while left:
                n = min(left, int(torch.empty(1).log_normal_(6.5, 1.2, generator=g).clamp(16, 32768)))
                lengths.append(n)
                left -= n
        ids = torch.randint(0, config.vocab_size, (args.seq,), generator=g)
        spans = torch.tensor([[sum(lengths[:i]), sum(lengths[:i + 1])] for i in range(len(lengths))])
        return collate([{"input_ids": ids.numpy(), "indices": spans.numpy(), "domain": "bench"}])

    rows = []
    for step in range(args.warmup + args.steps):
        torch.cuda.synchronize()
        m = trainer.train_step([batch()])
        torch.cuda.synchronize()
        if step >= args.warmup:
            rows.append(m)
    med = lambda k: statistics.median(r[k] for r in rows)  # noqa: E731
    result = {"benchmark": "train_throughput", "device": torch.cuda.get_device_name(device), "host": platform.node(),
              "layers": args.layers, "seq_len": args.seq, "layout": args.layout, "attention": backend,
              "compile": args.compile, "params_b": sum(p.numel() for p in lm.parameters()) / 1e9,
              "tokens_per_s_median": med("tokens_per_s"), "mfu_nominal_median": med("mfu_nominal"),
              "mfu_document_median": med("mfu_document"), "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
              "goal": "mfu_nominal >= 0.44 (ProLong: 0.31)"}
    print(json.dumps(result))
    name = torch.cuda.get_device_name(device).replace(" ", "_")
    (ROOT / "bench" / "results" / f"train_throughput-{name}-{args.layout}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
