"""Training throughput and MFU of a Llama-3-8B-shaped model at 64K tokens on one GPU.

    .venv/bin/python bench/train_throughput.py [--layers 4] [--seq 65536] [--steps 8] [--layout single|packed]

The model has Llama-3-8B's width (hidden 4096, 32 heads, 8 KV heads, MLP 14336, vocabulary 128256)
with fewer layers so that one GPU holds it with fp32 master weights and AdamW states. It trains
through this project's engine: document-masked attention (backend `auto`), activation
checkpointing, bf16 compute, fused chunked cross-entropy. `single`: one 64K document per sequence
(nominal MFU = document-aware MFU); `packed`: documents of ShortMix-like lengths. Prints one JSON
line (goal ≥ 44% nominal MFU; ProLong reports 31%) and writes ``bench/results/train_throughput-<gpu>.json``.
Needs a CUDA GPU; ``--smoke`` runs a few steps of a narrow model on whatever device there is (CPU
too) to check the script, and writes nothing.
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
    parser.add_argument("--smoke", action="store_true", help="narrow model, any device, nothing written")
    args = parser.parse_args()
    if args.smoke:
        args.layers, args.seq, args.steps, args.warmup = 2, 1024, 2, 1
    elif not torch.cuda.is_available():
        print("train_throughput: needs a CUDA GPU; none is visible", file=sys.stderr)
        return 2
    from transformers import LlamaConfig, LlamaForCausalLM

    from prolong.recipe import load_recipe
    from prolong.model import attention
    from prolong.train.lm import TrainingLM
    from prolong.parallel.world import World
    from prolong.train.batch import collate
    from prolong.parallel.engine import build_engine
    from prolong.train.flops import FlopCounter, peak_flops
    from prolong.train.callbacks import Throughput
    from prolong.train.trainer import Trainer

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    world = World(rank=0, world_size=1, local_rank=0, device=device)
    width = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256)
    if args.smoke:
        width = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
                     vocab_size=4096)
    config = LlamaConfig(**width, num_hidden_layers=args.layers, max_position_embeddings=args.seq,
                         rope_theta=8e6, tie_word_embeddings=False)
    attention.register()
    config._attn_implementation = attention.ATTN_IMPLEMENTATION
    config.use_cache = False
    with torch.device(device):
        lm = LlamaForCausalLM(config)
    backend = attention.select_backend(args.attention, device)
    recipe = load_recipe(ROOT / "recipes" / ("tiny.yaml" if args.smoke else "prolong-8b.yaml"), [
        f"stage1.seq_len={args.seq}", f"stage1.batch_tokens={args.seq}", f"stage1.compile={args.compile}",
        "stage1.activation_checkpointing=true", "stage1.steps=1000"])
    engine = build_engine(TrainingLM(lm, loss_chunk_size=8192), recipe.train_stage("stage1"), recipe.parallel, world,
                          torch.bfloat16 if cuda else torch.float32)
    meter = Throughput(FlopCounter.for_model(lm), peak_flops(device) if cuda else None, args.seq, 1)
    trainer = Trainer(engine, iter([]), recipe.train_stage("stage1"), world, accumulation=1, callbacks=[meter])
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
        if cuda:
            torch.cuda.synchronize()
        m = trainer.train_step([batch()])
        meter.on_step_end(trainer, m)
        if cuda:
            torch.cuda.synchronize()
        if step >= args.warmup:
            rows.append(m)
    med = lambda k: statistics.median(r[k] for r in rows if r.get(k) is not None) \
        if any(r.get(k) is not None for r in rows) else None  # noqa: E731
    if args.smoke:
        print(json.dumps({"benchmark": "train_throughput", "smoke": True, "device": str(device),
                          "tokens_per_s_median": med("tokens_per_s"), "loss": rows[-1]["loss"]}))
        return 0
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
