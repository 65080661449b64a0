"""The model card (``hf/README.md``) and the stage's report, generated from the run: what was
trained on what, how it scored, where every file came from, and how to run it."""

from __future__ import annotations

from prolong.config import format_tokens


def _recipe_table(recipe, chain: list[str]) -> list[str]:
    rows = ["| stage | length | RoPE θ | steps | tokens | LR | data |", "|---|---|---|---|---|---|---|"]
    for name in reversed(chain):
        cfg = recipe.stages[name]
        if cfg.kind != "train":
            continue
        mix = ", ".join(f"{k} {v:.0%}" for k, v in cfg.mixture.items())
        rows.append(f"| {name} | {format_tokens(cfg.seq_len)} | {cfg.rope_theta:g} | {cfg.steps} | "
                    f"{format_tokens(cfg.steps * cfg.batch_tokens)} | {cfg.lr:g} | {mix} |")
    return rows


def model_card(recipe, run: str, stage: str, source: str, chain: list[str], files: dict[str, dict],
               lineage: dict[str, str], code: dict, eval_report: str | None, theta: float, context: int) -> str:
    cfg = recipe.stages[stage]
    name = cfg.name or recipe.name
    front = ["---", f"license: {cfg.license}", f"base_model: {recipe.model.path}", "library_name: transformers",
             "pipeline_tag: text-generation", "tags: [long-context, prolong, gguf]", "---", ""]
    lines = [*front, f"# {name}", "",
             f"{name} is `{recipe.model.path}` continued-trained for long contexts with the ProLong recipe service "
             f"(run `{run}`, stage `{source}`): context length {context:,} tokens, RoPE θ {theta:g}.", "",
             "## Training", "", *_recipe_table(recipe, chain), ""]
    if eval_report:
        lines += ["## Evaluation", "", eval_report.strip(), ""]
    lines += ["## Files", "", "| file | bytes | sha256 |", "|---|---|---|"]
    lines += [f"| `{path}` | {f['bytes']:,} | `{f['sha256'][:16]}…` |" for path, f in sorted(files.items())]
    lines += ["", "## Lineage", "", "| manifest | sha256 |", "|---|---|"]
    lines += [f"| {s} | `{d}` |" for s, d in lineage.items()]
    commit = (code.get("git") or {}).get("commit")
    lines += ["", f"Code version {code['version']}" + (f", commit `{commit}`" if commit else "") + ".", "",
              "## Use", "", *usage(name, files)]
    return "\n".join(lines) + "\n"


def usage(name: str, files: dict[str, dict]) -> list[str]:
    ggufs = [p for p in files if p.endswith(".gguf")]  # in the order of export.gguf
    out = ["```bash", "# transformers",
           "python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer; "
           "m = AutoModelForCausalLM.from_pretrained('./hf'); t = AutoTokenizer.from_pretrained('./hf')\"",
           "# vLLM (OpenAI-compatible server)", "vllm serve ./hf --max-model-len $(jq .max_position_embeddings hf/config.json)"]
    if ggufs:
        out += ["# llama.cpp", f"llama-cli -m {ggufs[0]} -p 'Hello' -n 64",
                f"python -m llama_cpp.server --model {ggufs[0]} --host 127.0.0.1 --port 8080"]
    out.append("```")
    return out


def report(recipe, stage: str, files: dict[str, dict], checks: dict[str, dict], folder: str) -> str:
    """The stage's summary in the Prefect UI: files, what was read back from each GGUF, commands."""
    name = recipe.stages[stage].name or recipe.name
    lines = [f"## Export of `{name}`", "", f"In `{folder}`:", "", "| file | MB | sha256 |", "|---|---|---|"]
    lines += [f"| `{p}` | {f['bytes'] / 1e6:.1f} | `{f['sha256'][:12]}…` |" for p, f in sorted(files.items())]
    if checks:
        lines += ["", "Read back from each GGUF by gguf's reader:", "",
                  "| file | type | RoPE θ | context | vocabulary | pre-tokenizer |", "|---|---|---|---|---|---|"]
        lines += [f"| `{p}` | {c['file_type']} | {c['rope_theta']:g} | {c['context_length']} | {c['vocab_size']} | "
                  f"{c['pre_tokenizer']} |" for p, c in sorted(checks.items())]
    lines += ["", *usage(name, files)]
    return "\n".join(lines) + "\n"
