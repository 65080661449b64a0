"""Trainer features as callbacks (OLMo-core's pattern): throughput/MFU, logging, metrics, progress,
checkpoints.

Only the main rank writes. ``progress.json`` in the stage folder is what the orchestrator polls
to show live progress (the job itself knows nothing about Prefect).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from prolong.progress import StageProgress
from prolong.train.flops import FlopCounter

log = logging.getLogger(__name__)


class Callback:
    def on_train_start(self, trainer) -> None:
        pass

    def on_step_end(self, trainer, metrics: dict) -> None:
        pass

    def on_checkpoint(self, trainer) -> None:
        """After a checkpoint is complete: state that must agree with it is saved here."""

    def on_train_end(self, trainer) -> None:
        pass


class Throughput(Callback):
    """Each step's FLOP/s per device and MFU under both conventions (prolong.train.flops), from the
    counts the step reports (tokens, Σ len², time). First in the list: the callbacks that log or
    write metrics then see these fields too."""

    def __init__(self, flops: FlopCounter, peak: float | None, seq_len: int, world_size: int):
        self.flops, self.peak, self.seq_len, self.world_size = flops, peak, seq_len, world_size

    def on_step_end(self, trainer, metrics):
        per_device = metrics["step_time_s"] * self.world_size
        nominal = self.flops.nominal(metrics["tokens"], self.seq_len) / per_device
        document = self.flops.document_aware(metrics["tokens"], metrics["attention_cost"]) / per_device
        metrics.update(tflops_nominal=nominal / 1e12, tflops_document=document / 1e12,
                       mfu_nominal=nominal / self.peak if self.peak else None,
                       mfu_document=document / self.peak if self.peak else None)


class ConsoleLogger(Callback):
    def __init__(self, every: int = 1):
        self.every = every

    def on_step_end(self, trainer, metrics):
        if trainer.world.is_main and (metrics["step"] % self.every == 0 or metrics["step"] == trainer.total_steps):
            mfu = ""
            if metrics.get("mfu_nominal") is not None:
                mfu = f" MFU {100 * metrics['mfu_nominal']:.1f}% nominal, {100 * metrics['mfu_document']:.1f}% document-aware"
            elif "tflops_nominal" in metrics:
                mfu = f" TFLOP/s/device {metrics['tflops_nominal']:.3f} nominal, {metrics['tflops_document']:.3f} document-aware"
            log.info("step %d/%d loss %.4f lr %.3g grad_norm %.3f tokens/s %.0f%s", metrics["step"], trainer.total_steps,
                     metrics["loss"], metrics["lr"], metrics["grad_norm"], metrics["tokens_per_s"], mfu)


class MetricsFile(Callback):
    """Every step's metrics as JSON lines in ``{stage}/metrics.jsonl``, uploaded periodically, with every
    checkpoint (so a resumed run keeps the lines of the steps it does not redo) and at the end."""

    def __init__(self, store, rel: str, local: Path, upload_every: int = 10):
        self.store, self.rel, self.local, self.upload_every = store, rel, local, upload_every

    def on_train_start(self, trainer):
        if trainer.world.is_main and trainer.state.step > 0 and self.store.exists(self.rel):
            self.local.write_bytes(self.store.read_bytes(self.rel))  # keep earlier attempts' lines on resume
            lines = [json.loads(x) for x in self.local.read_text().splitlines() if x.strip()]
            self.local.write_text("".join(json.dumps(x) + "\n" for x in lines if x["step"] <= trainer.state.step))

    def on_step_end(self, trainer, metrics):
        if not trainer.world.is_main:
            return
        with open(self.local, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if metrics["step"] % self.upload_every == 0:
            self.upload()

    def on_checkpoint(self, trainer):
        if trainer.world.is_main:
            self.upload()

    def upload(self):
        if self.local.exists():
            self.store.write_bytes_atomic(self.rel, self.local.read_bytes())

    def on_train_end(self, trainer):
        if trainer.world.is_main:
            self.upload()


class ProgressFile(Callback):
    """Training's ``progress.json`` (prolong.progress): optimizer steps done of the stage's total."""

    def __init__(self, store, rel: str, stage: str, interval_s: float = 2.0):
        self.store, self.rel, self.stage, self.interval_s = store, rel, stage, interval_s
        self.progress: StageProgress | None = None

    def on_train_start(self, trainer):
        if trainer.world.is_main:
            self.progress = StageProgress(self.store, self.rel, self.stage, total=trainer.total_steps, unit="steps",
                                          start=trainer.start_step, interval_s=self.interval_s)
            self.progress.update(trainer.state.step, force=True)

    def on_step_end(self, trainer, metrics):
        if self.progress is not None:
            self.progress.update(trainer.state.step, **{k: metrics[k] for k in ("loss", "lr", "tokens_per_s")
                                                         if k in metrics})

    def on_train_end(self, trainer):
        if self.progress is not None:
            self.progress.finish()


class StageReport(Callback):
    """At the end: a loss/LR curve over every step (earlier attempts included) and a markdown summary."""

    def __init__(self, store, prefix: str, stage: str, metrics_file: Path, workdir: Path):
        self.store, self.prefix, self.stage, self.metrics_file, self.workdir = store, prefix, stage, metrics_file, workdir

    def on_train_end(self, trainer):
        if not trainer.world.is_main or not self.metrics_file.exists():
            return
        rows = [json.loads(x) for x in self.metrics_file.read_text().splitlines() if x.strip()]
        if not rows:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
        ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], color="tab:blue", label="loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (token-averaged)")
        ax.grid(alpha=0.3)
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], color="tab:orange", alpha=0.6, label="LR")
        lr_ax.set_ylabel("learning rate")
        ax.set_title(f"{self.stage}: loss and learning rate")
        fig.legend(loc="upper right")
        fig.tight_layout()
        png = self.workdir / "loss_curve.png"
        fig.savefig(png)
        plt.close(fig)
        self.store.put_file(png, f"{self.prefix}/report/loss_curve.png")
        last = rows[-10:]
        mean = lambda k: sum(r[k] for r in last if r.get(k) is not None) / max(1, sum(r.get(k) is not None for r in last))  # noqa: E731
        lines = [f"## {self.stage}", "", "| | value |", "|---|---|",
                 f"| steps | {rows[-1]['step']} |", f"| loss first → last-10 mean | {rows[0]['loss']:.4f} → {mean('loss'):.4f} |",
                 f"| tokens seen | {rows[-1]['tokens_seen']:,} |", f"| tokens/s (last 10) | {mean('tokens_per_s'):,.0f} |"]
        if rows[-1].get("tflops_nominal") is not None:
            lines.append(f"| TFLOP/s per device, nominal / document-aware | {mean('tflops_nominal'):.3f} / "
                         f"{mean('tflops_document'):.3f} |")
        if rows[-1].get("mfu_nominal") is not None:
            lines.append(f"| MFU nominal / document-aware | {100 * mean('mfu_nominal'):.1f}% / {100 * mean('mfu_document'):.1f}% |")
        lines += ["", "Loss curve: `report/loss_curve.png`"]
        self.store.write_bytes_atomic(f"{self.prefix}/report/report.md", ("\n".join(lines) + "\n").encode())


class Checkpointing(Callback):
    def __init__(self, every: int):
        self.every = every

    def on_step_end(self, trainer, metrics):
        step = trainer.state.step
        if self.every and step % self.every == 0 and step < trainer.total_steps:
            trainer.save_checkpoint()

    def on_train_end(self, trainer):
        if trainer.last_checkpoint_step != trainer.state.step:
            trainer.save_checkpoint()
