"""The data report: what the model will see, per domain.

Document lengths are taken *after* filtering, packing and truncation — the lengths attention
sees — which is how the paper's Table 14 is computed ("% of documents longer than 4K/8K/16K/32K").
The report goes into the data manifest's metrics, ``report.md`` and a histogram PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from prolong.config import format_tokens


def length_stats(lengths: np.ndarray, thresholds: list[int]) -> dict:
    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return {"documents": 0, "tokens": 0}
    return {
        "documents": int(len(lengths)), "tokens": int(lengths.sum()),
        "mean_length": float(lengths.mean()), "median_length": float(np.median(lengths)),
        "p90_length": float(np.percentile(lengths, 90)), "max_length": int(lengths.max()),
        "share_longer_than": {format_tokens(t): round(100.0 * float((lengths > t).mean()), 2) for t in thresholds},
    }


def histogram_png(lengths_by_domain: dict[str, np.ndarray], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    top = max((int(v.max()) for v in lengths_by_domain.values() if len(v)), default=2)
    bins = np.logspace(0, np.log2(max(top, 2)), 40, base=2)
    styles = ["-", "--", ":", "-."]  # domains cut to the same length would hide each other
    for i, (name, lengths) in enumerate(sorted(lengths_by_domain.items())):
        if len(lengths):
            ax.hist(lengths, bins=bins, histtype="step", linewidth=1.8, linestyle=styles[i % len(styles)],
                    label=f"{name} ({len(lengths):,})", weights=np.full(len(lengths), 100.0 / len(lengths)))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("document length as seen by the model (tokens)")
    ax.set_ylabel("% of the domain's documents")
    ax.set_title("Document lengths after filtering and packing")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def report_markdown(run: str, domains: dict, streams: dict, thresholds: list[int], histogram: str | None) -> str:
    cols = [format_tokens(t) for t in thresholds]
    lines = [f"## Data of `{run}`", "",
             "| domain | kind | source docs | docs seen | tokens | mean len | " + " | ".join(f"> {c}" for c in cols) + " |",
             "|---|---|---:|---:|---:|---:|" + "---:|" * len(cols)]
    for name, d in sorted(domains.items()):
        s = d.get("lengths", {})
        shares = s.get("share_longer_than", {})
        lines.append(f"| {name} | {d['kind']} | {d['source_documents']:,} | {s.get('documents', 0):,} | "
                     f"{s.get('tokens', 0):,} | {s.get('mean_length', 0):,.0f} | "
                     + " | ".join(f"{shares.get(c, 0):.1f}%" for c in cols) + " |")
    lines += ["", "Shares are of documents as the model sees them, after filtering, cutting and packing "
              "(the view of the paper's Table 14).", "",
              "| stream | samples | tokens | documents | wanted by |", "|---|---:|---:|---:|---|"]
    for name, s in sorted(streams.items()):
        lines.append(f"| `{name}` | {s['samples']:,} | {s['tokens']:,} | {s['documents']:,} | {', '.join(s['stages'])} |")
    if histogram:
        lines += ["", f"Histogram: `{histogram}`"]
    return "\n".join(lines) + "\n"
