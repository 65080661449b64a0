"""Throughput of the whole data-preparation path against raw tokenizer batch encoding.

    .venv/bin/python bench/data_prep.py [--mb 40] [--repeats 3]

Both sides tokenize the same documents with the same tokenizer on the same cores:

* raw: ``tokenizers.Tokenizer.encode_batch`` over the texts already in memory (the ceiling);
* prepare: ``prolong.data.prepare`` end to end — read jsonl, shuffle, tokenize with BOS/EOS,
  pack to 4K with carry-over, write zstd-compressed, hashed MDS shards, move them into the store,
  write the manifest.

Prints one JSON line (tokens/s of each, their ratio; goal ≥ 0.8) and writes it to
``bench/results/data_prep-<machine>.json``.
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


def corpus(target_mb: float, out: Path) -> list[str]:
    """Real text: the tiny corpus's prose plus standard-library source, repeated to `target_mb`."""
    from prolong import assets

    base = Path(assets.resolve("builtin:tiny-corpus"))
    texts = [json.loads(x)["text"] for name in ("books", "short") for x in open(base / f"{name}.jsonl")]
    texts += [p.read_text(errors="replace") for p in sorted(assets.stdlib_dir().glob("*.py"))]
    size = sum(map(len, texts))
    reps = max(1, int(target_mb * 1e6 / size + 0.999))
    docs = [t for _ in range(reps) for t in texts]
    with open(out, "w") as f:
        for t in docs:
            f.write(json.dumps({"text": t}) + "\n")
    return docs


def raw_tokens_per_s(texts: list[str], tok_path: str) -> tuple[float, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(Path(tok_path) / "tokenizer.json"))
    t0 = time.perf_counter()
    n = sum(len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False))
    return n / (time.perf_counter() - t0), n


def prepare_tokens_per_s(path: Path, total_tokens: int, work: Path) -> tuple[float, int]:
    from prolong.recipe import recipe_from_dict
    from prolong.data.prepare import prepare
    from prolong.store import Store

    seq = 4096
    recipe = recipe_from_dict({
        "name": "bench", "model": {"path": "builtin:tiny-llama", "tokenizer": "builtin:tiny-bpe"},
        "data": {"domains": {"text": {"kind": "short", "source": {"type": "files", "path": str(path)}}}},
        "stage1": {"seq_len": seq, "rope_theta": 1e4, "steps": total_tokens // seq, "batch_tokens": seq,
                   "lr": 1e-4, "mixture": {"text": 1.0}},
    })
    store = Store(str(work / "store"))
    t0 = time.perf_counter()
    manifest = prepare(recipe, store, "bench", workdir=work)
    elapsed = time.perf_counter() - t0
    tokens = manifest.metrics["tokens"]
    return tokens / elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=40.0, help="MB of text")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from prolong import assets

    tok_path = assets.resolve("builtin:tiny-bpe")
    raw, full = [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        texts = corpus(args.mb, tmp / "corpus.jsonl")
        for i in range(args.repeats):
            r, total = raw_tokens_per_s(texts, tok_path)
            raw.append(r)
            work = tmp / f"run{i}"
            work.mkdir()
            p, _ = prepare_tokens_per_s(tmp / "corpus.jsonl", total, work)
            full.append(p)
    result = {
        "benchmark": "data_prep", "machine": f"{platform.node()} {platform.machine()}", "cpus": os.cpu_count(),
        "text_mb": args.mb, "tokens": total, "repeats": args.repeats,
        "raw_tokens_per_s_median": statistics.median(raw), "prepare_tokens_per_s_median": statistics.median(full),
        "ratio_median": statistics.median(p / r for p, r in zip(full, raw)), "goal": ">= 0.8",
    }
    print(json.dumps(result))
    out = ROOT / "bench" / "results" / f"data_prep-{platform.machine()}-{os.cpu_count()}cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
