"""Scores → the paper's categories, a markdown table and PNG charts; LongLoRA's passkey accuracy
and perplexity by evaluation length (its Table 1) as tables of their own.

Aggregation (HELMET / ProLong Tables 10-13): the mean over items gives a dataset's score at a
length; the mean over a category's datasets gives the category at that length; the mean over
lengths gives the category. Failed items (e.g. the judge never answered) are counted and left out
of means — a category with only failures has no score, never 0.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from prolong.eval.helmet.datasets import CATEGORIES


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def aggregate(items: list[dict]) -> dict:
    """items: {"dataset", "length", "score" (0-100) or "failed", optional "depth"}."""
    scores, failed, counts = defaultdict(list), defaultdict(int), defaultdict(int)
    depth = defaultdict(list)
    for it in items:
        key = (it["dataset"], it["length"])
        counts[key] += 1
        if it.get("failed"):
            failed[key] += 1
            continue
        scores[key].append(it["score"])
        if it.get("depth") is not None:
            depth[(it["dataset"], it["length"], it["depth"])].append(it["score"])
    datasets: dict[str, dict] = defaultdict(dict)
    for (ds, length), n in sorted(counts.items()):
        datasets[ds][str(length)] = {"score": _mean(scores[(ds, length)]), "items": n, "failed": failed[(ds, length)]}
    categories = {}
    for cat, members in CATEGORIES.items():
        present = [d for d in members if d in datasets]
        if not present:
            continue
        lengths = sorted({int(k) for d in present for k in datasets[d]})
        by_length = {str(L): _mean(datasets[d].get(str(L), {}).get("score") for d in present) for L in lengths}
        categories[cat] = {"datasets": present, "by_length": by_length, "mean": _mean(by_length.values())}
    by_depth: dict[str, dict] = defaultdict(lambda: defaultdict(dict))
    for (ds, length, d), values in sorted(depth.items()):
        by_depth[ds][str(length)][f"{d:g}"] = _mean(values)
    return {"categories": categories, "datasets": dict(datasets),
            "by_depth": {k: dict(v) for k, v in by_depth.items()},
            "failed_items": sum(failed.values())}


def longlora_passkey(items: list[dict]) -> dict:
    """passkey_retrivial.py's report per test point: the prompts' mean token count (its ``avg_tokens``,
    floor division) and the fraction of keys retrieved (its ``accuracy``, 0-1; failed items left out)."""
    from prolong.eval.synthetic.passkey import LONGLORA_DATASET

    by_length: dict[str, dict] = {}
    for length in sorted({i["length"] for i in items if i["dataset"] == LONGLORA_DATASET}):
        mine = [i for i in items if i["dataset"] == LONGLORA_DATASET and i["length"] == length]
        done = [i for i in mine if not i.get("failed")]
        by_length[str(length)] = {
            "tokens": sum(i["input_tokens"] for i in done) // len(done) if done else None,
            "accuracy": sum(i["score"] == 100 for i in done) / len(done) if done else None,
            "tests": len(mine), "failed": len(mine) - len(done)}
    scored = [v["accuracy"] for v in by_length.values() if v["accuracy"] is not None]
    return {"by_length": by_length, "mean_accuracy": _mean(scored)}


def _length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.1f}"


def _ppl_table(model: str, p: dict) -> list[str]:
    """LongLoRA's Table 1 layout: a column per evaluation length, perplexity in the cells."""
    lengths = sorted(p["by_length"], key=int)
    return ["## Perplexity by evaluation length (LongLoRA's eval.py)", "",
            "| model | " + " | ".join(_length(int(L)) for L in lengths) + " |",
            "|---|" + "---|" * len(lengths),
            f"| {model} | " + " | ".join(f"{p['by_length'][L]['perplexity']:.2f}" for L in lengths) + " |",
            "| windows | " + " | ".join(str(p["by_length"][L]["windows"]) for L in lengths) + " |", "",
            f"{p['documents']} documents, {p['tokens']} tokens as one stream (EOS after each); a window every "
            f"{p['sliding_window']} tokens, the loss on all its tokens, full attention.", ""]


def markdown(run: str, model_from: str, results: dict) -> str:
    lines = [f"# Evaluation of `{run}` ({model_from})", ""]
    cats = results.get("categories", {})
    if cats:
        lengths = sorted({int(L) for c in cats.values() for L in c["by_length"]})
        lines += ["## Long-context categories (0-100)", "",
                  "| category | " + " | ".join(f"{L // 1024}K" if L % 1024 == 0 else str(L) for L in lengths) + " | mean |",
                  "|---|" + "---|" * (len(lengths) + 1)]
        for name, c in cats.items():
            lines.append(f"| {name} | " + " | ".join(_fmt(c["by_length"].get(str(L))) for L in lengths)
                         + f" | {_fmt(c['mean'])} |")
        lines += ["", "Datasets: " + "; ".join(
            f"{ds} " + ", ".join(f"{L}: {_fmt(v['score'])}" + (f" ({v['failed']} failed)" if v["failed"] else "")
                                 for L, v in per.items())
            for ds, per in results["datasets"].items()), ""]
    if results.get("failed_items"):
        lines += [f"**{results['failed_items']} items failed** (judge unavailable or unparsable); "
                  "they are listed in items.jsonl and left out of the means.", ""]
    if results.get("unscored"):
        lines += [f"Not scored: {results['unscored']}", ""]
    if "perplexity" in results and "by_length" in results["perplexity"]:
        lines += _ppl_table(model_from, results["perplexity"])
    elif "perplexity" in results:
        p = results["perplexity"]
        lines += ["## Long-document perplexity", "",
                  f"Loss on the last {p['last']} tokens of {p['documents']} documents of {p['length']} tokens: "
                  f"**{p['loss']:.3f}** (perplexity {p['perplexity']:.1f}).", ""]
    if "passkey_longlora" in results:
        rows = results["passkey_longlora"]["by_length"]
        lines += ["## Passkey retrieval (LongLoRA's passkey_retrivial.py)", "",
                  "| length | prompt tokens (mean) | accuracy | tests |", "|---|---|---|---|"]
        lines += [f"| {L} | {v['tokens'] if v['tokens'] is not None else '—'} | "
                  f"{'—' if v['accuracy'] is None else format(v['accuracy'], '.2f')} | {v['tests']}"
                  + (f" ({v['failed']} failed)" if v["failed"] else "") + " |"
                  for L, v in sorted(rows.items(), key=lambda kv: int(kv[0]))]
        lines.append("")
    if "position_loss" in results:
        p = results["position_loss"]
        lines += ["## Loss by token position", "",
                  f"Mean token loss over {p['documents']} documents of {p['length']} tokens, by position "
                  "(a model that uses its context gets lower loss further in):", "",
                  "| positions | " + " | ".join(f"{b['start']}-{b['end']}" for b in p["buckets"]) + " |",
                  "|---|" + "---|" * len(p["buckets"]),
                  "| loss | " + " | ".join(f"{b['loss']:.3f}" for b in p["buckets"]) + " |", ""]
    if results.get("lm_eval"):
        lines += ["## Short-context tasks (lm-eval)", "", "| task | shots | metric | value |", "|---|---|---|---|"]
        for task, m in sorted(results["lm_eval"].items()):
            for key, value in sorted(m.items()):
                if key != "num_fewshot" and "stderr" not in key:
                    lines.append(f"| {task} | {m['num_fewshot']} | {key} | {value:.4f} |")
        lines.append("")
    return "\n".join(lines)


def side_by_side(run: str, evaluations: dict[str, tuple[str, dict]]) -> str:
    """Several evaluations of one run in one table (``{eval stage: (model stage, its metrics)}``,
    in run order): categories, perplexity, loss by position and lm-eval, a column per model."""
    if not evaluations:
        return ""
    names = list(evaluations)
    head = "| | " + " | ".join(f"{evaluations[n][0]} ({n})" for n in names) + " |"
    lines = [f"## Evaluations of `{run}` side by side", "", head, "|---|" + "---|" * len(names)]
    cats = [c for c in CATEGORIES if any(c in evaluations[n][1].get("categories", {}) for n in names)]
    for cat in cats:
        lines.append(f"| {cat} | " + " | ".join(_fmt(evaluations[n][1].get("categories", {}).get(cat, {}).get("mean"))
                                              for n in names) + " |")
    if any("perplexity" in evaluations[n][1] and "by_length" not in evaluations[n][1]["perplexity"] for n in names):
        lines.append("| long-document perplexity | " + " | ".join(
            _fmt(evaluations[n][1].get("perplexity", {}).get("perplexity")) for n in names) + " |")
    sliding = sorted({int(L) for n in names for L in evaluations[n][1].get("perplexity", {}).get("by_length", {})})
    for L in sliding:  # LongLoRA's Table 1, transposed: a row per evaluation length
        def ppl(m: dict) -> str:
            v = m.get("perplexity", {}).get("by_length", {}).get(str(L))
            return "—" if v is None else f"{v['perplexity']:.2f}"

        lines.append(f"| perplexity at {_length(L)} (sliding window) | " + " | ".join(ppl(evaluations[n][1]) for n in names)
                     + " |")
    if any("passkey_longlora" in evaluations[n][1] for n in names):
        def passkey(m: dict) -> str:
            v = m.get("passkey_longlora", {}).get("mean_accuracy")
            return "—" if v is None else f"{v:.2f}"

        lines.append("| passkey accuracy (LongLoRA, mean over lengths) | " + " | ".join(
            passkey(evaluations[n][1]) for n in names) + " |")
    if any("position_loss" in evaluations[n][1] for n in names):
        def curve(m: dict) -> str:
            pl = m.get("position_loss")
            return "—" if pl is None else f"{pl['first']:.2f} → {pl['last']:.2f}"

        lines.append("| loss, first → last positions | " + " | ".join(curve(evaluations[n][1]) for n in names) + " |")
    tasks = list(dict.fromkeys(t for n in names for t in evaluations[n][1].get("lm_eval", {})))
    for task in tasks:
        def acc(m: dict) -> str:
            values = m.get("lm_eval", {}).get(task, {})
            v = next((v for k, v in values.items() if k.startswith("acc") and "stderr" not in k), None)
            return "—" if v is None else f"{v:.3f}"

        lines.append(f"| {task} acc | " + " | ".join(acc(evaluations[n][1]) for n in names) + " |")
    return "\n".join(lines) + "\n"


def charts(results: dict, out: Path) -> list[str]:
    """categories.png (score by length, one line per category), depth.png (recall heat maps) and
    position_loss.png (loss by token position)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    cats = results.get("categories", {})
    if cats:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, c in cats.items():
            pts = [(int(L), v) for L, v in c["by_length"].items() if v is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("input length (tokens)")
        ax.set_ylabel("score (0-100)")
        ax.set_ylim(-2, 102)
        ax.legend(fontsize=8)
        ax.set_title("Long-context categories by length")
        fig.tight_layout()
        fig.savefig(out / "categories.png", dpi=120)
        plt.close(fig)
        written.append("categories.png")
    depth = results.get("by_depth", {})
    if depth:
        fig, axes = plt.subplots(1, len(depth), figsize=(4 * len(depth), 3), squeeze=False)
        for ax, (ds, per_len) in zip(axes[0], sorted(depth.items())):
            lengths = sorted(per_len, key=int)
            depths = sorted({d for v in per_len.values() for d in v}, key=float)
            grid = [[per_len[L].get(d, float("nan")) for d in depths] for L in lengths]
            im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(depths)), depths)
            ax.set_yticks(range(len(lengths)), lengths)
            ax.set_xlabel("depth")
            ax.set_ylabel("length")
            ax.set_title(f"{ds}: recall by depth")
        fig.colorbar(im, ax=axes[0].tolist())
        fig.savefig(out / "depth.png", dpi=120)
        plt.close(fig)
        written.append("depth.png")
    if "position_loss" in results:
        buckets = results["position_loss"]["buckets"]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([(b["start"] + b["end"]) / 2 for b in buckets], [b["loss"] for b in buckets], marker="o")
        ax.set_xlabel("token position")
        ax.set_ylabel("mean token loss")
        ax.set_title("Loss by token position")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "position_loss.png", dpi=120)
        plt.close(fig)
        written.append("position_loss.png")
    return written
