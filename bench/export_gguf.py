"""The export stage's cost and what the exported files buy: export time and file size per GGUF type,
and greedy decoding speed of llama.cpp on the GGUF vs HF ``generate`` on the same CPU cores.

    .venv/bin/python bench/export_gguf.py [--repeats 3] [--new-tokens 128] [--models tiny,llama-100m]

Models, both built locally with the tiny BPE tokenizer (4096 tokens): the tiny recipe's Llama
(~3M parameters) and a ~100M-parameter Llama (hidden 768, 12 layers, 12 heads, MLP 2560).
Each is exported as the stage does it (``prolong.export.main``: bf16 safetensors, then every
GGUF type by llama.cpp's converter or quantizer). Decoding: a 64-token prompt, ``--new-tokens``
greedy tokens, one sequence, all cores, median of ``--repeats``; HF in float32 (CPU bf16 matmuls
are slower), llama.cpp on the f16 and q8_0 files (``n_threads`` = the cores). Writes
``bench/results/export_gguf-<machine>.json``; needs llama-cpp-python (infra/install.sh --llama-cpp).
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

TYPES = ["bf16", "f16", "q8_0", "Q6_K", "Q5_K_M", "Q4_K_M"]
LLAMA_100M = dict(hidden_size=768, intermediate_size=2560, num_hidden_layers=12, num_attention_heads=12,
                  num_key_value_heads=12, max_position_embeddings=4096, rope_theta=8e6)


def build_model(name: str, out: Path) -> int:
    """An HF folder for ``name`` (float32 weights); returns its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from prolong import assets

    tok = AutoTokenizer.from_pretrained(assets.resolve("builtin:tiny-bpe"))
    if name == "tiny":
        model = AutoModelForCausalLM.from_pretrained(assets.resolve("builtin:tiny-llama"), dtype=torch.float32)
    else:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **LLAMA_100M)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def export_costs(source: Path, work: Path) -> tuple[Path, dict]:
    """The stage's own functions, timed one GGUF type at a time."""
    from prolong.export.main import write_gguf, write_hf

    t0 = time.perf_counter()
    write_hf(source, work / "hf", "bfloat16", "5GB", 4096)
    out = {"hf_bf16": {"seconds": round(time.perf_counter() - t0, 2),
                       "bytes": sum(p.stat().st_size for p in (work / "hf").glob("*.safetensors"))}}
    for t in TYPES:
        t0 = time.perf_counter()
        (path,) = write_gguf(work / "hf", work / f"gguf-{t}", "bench", [t], "auto", work / "export.log").values()
        out[t] = {"seconds": round(time.perf_counter() - t0, 2), "bytes": path.stat().st_size}
        if t not in ("f16", "q8_0"):
            path.unlink()  # keep the disk small; decoding uses f16 and q8_0
    return work / "hf", out


def prompt_ids(hf: Path, n: int = 64) -> list[int]:
    from transformers import AutoTokenizer

    from prolong import assets

    tok = AutoTokenizer.from_pretrained(hf)
    text = (Path(assets.resolve("builtin:tiny-corpus")) / "books.jsonl").read_text()
    return [tok.bos_token_id, *tok(json.loads(text.splitlines()[0])["text"], add_special_tokens=False).input_ids][:n]


def hf_decode_s(hf: Path, ids: list[int], new: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    with torch.no_grad():
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return time.perf_counter() - t0


def llama_cpp_decode_s(gguf: Path, ids: list[int], new: int) -> float:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + new + 8, n_threads=os.cpu_count(), verbose=False, seed=0)
    llm.eval(ids[:4])  # warm-up
    llm.reset()
    t0 = time.perf_counter()
    made = 0
    for _ in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):  # EOS does not stop it here
        made += 1
        if made == new:
            break
    seconds = time.perf_counter() - t0
    llm.close()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--models", default="tiny,llama-100m")
    # how the installed llama-cpp-python was built (pip does not record CMAKE_ARGS); system_info shows
    # the CPU features it was compiled for either way
    ap.add_argument("--build-flags", default="infra/install.sh --llama-cpp: -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF")
    args = ap.parse_args()
    import llama_cpp
    import torch

    torch.set_num_threads(os.cpu_count())
    result = {"benchmark": "export_gguf", "machine": f"{'vm' if os.path.exists('/dev/vda') else 'host'} "
              f"{platform.machine()}", "cpus": os.cpu_count(), "llama_cpp_python": llama_cpp.__version__,
              "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(),
              "build_flags": args.build_flags,
              "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
              "repeats": args.repeats, "models": {}}
    with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp_:
        tmp = Path(tmp_)
        for name in args.models.split(","):
            source = tmp / name / "source"
            params = build_model(name, source)
            hf, costs = export_costs(source, tmp / name)
            ids = prompt_ids(hf)
            ggufs = {t: tmp / name / f"gguf-{t}" / f"bench.{t}.gguf" for t in ("f16", "q8_0")}
            runs = {"hf_fp32": [], **{f"llama_cpp_{t}": [] for t in ggufs}}
            for _ in range(args.repeats):  # interleaved, so drift on a noisy machine hits every side alike
                runs["hf_fp32"].append(hf_decode_s(source, ids, args.new_tokens))
                for t, path in ggufs.items():
                    runs[f"llama_cpp_{t}"].append(llama_cpp_decode_s(path, ids, args.new_tokens))
            tps = {k: round(args.new_tokens / statistics.median(v), 1) for k, v in runs.items()}
            result["models"][name] = {
                "parameters": params, "export": costs, "decode_tokens_per_s_median": tps,
                "decode_seconds": {k: [round(x, 3) for x in v] for k, v in runs.items()},
                "ratio_llama_cpp_f16_vs_hf": round(tps["llama_cpp_f16"] / tps["hf_fp32"], 2),
                "ratio_llama_cpp_q8_0_vs_hf": round(tps["llama_cpp_q8_0"] / tps["hf_fp32"], 2)}
            print(json.dumps({name: result["models"][name]}), flush=True)
    out = ROOT / "bench" / "results" / f"export_gguf-{platform.machine()}-{os.cpu_count()}cpu.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
