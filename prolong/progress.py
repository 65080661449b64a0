"""Live progress of a stage's job: ``progress.json`` in the stage's folder of the store.

Every job (data, training, evaluation) writes the same small record, so the orchestrator draws one
kind of progress bar for all of them (a Prefect progress artifact, a log line every 10%) and
``prolong status`` can say where a running or failed stage got to — the job itself knows nothing
about Prefect. The record:

``{"stage", "state": "running"|"finished", "done", "total", "unit", "phase", "percent", "eta_s",
"updated_at", ...}`` plus whatever the job adds (training: loss, lr, tokens_per_s).

``unit`` says what is counted (training: optimizer steps; data: domains; evaluation: parts, one per
task and length). Writes are throttled and atomic, and advisory: a store error is logged once and
never fails the job.
"""

from __future__ import annotations

import logging
import time

from prolong.errors import StoreError
from prolong.manifest import now

log = logging.getLogger(__name__)


class StageProgress:
    """``start``: units already done when this attempt began (a resumed training run), so the ETA
    is from this attempt's own rate."""

    def __init__(self, store, rel: str, stage: str, *, total: float, unit: str, start: float = 0,
                 interval_s: float = 2.0):
        self.store, self.rel, self.stage, self.unit = store, rel, stage, unit
        self.total, self.start, self.done, self.interval_s = max(total, 1e-9), start, start, interval_s
        self.phase: str | None = None
        self._t0 = time.monotonic()
        self._last_write = float("-inf")
        self._warned = False

    def update(self, done: float | None = None, *, phase: str | None = None, force: bool = False, **extra) -> None:
        """Record ``done`` units (and the ``phase`` now running); written when ``interval_s`` has
        passed since the last write, when the phase changes, at the end, or with ``force``."""
        if done is not None:
            self.done = min(done, self.total)
        changed = phase is not None and phase != self.phase
        if phase is not None:
            self.phase = phase
        if force or changed or self.done >= self.total or time.monotonic() - self._last_write >= self.interval_s:
            self._write("running", extra)

    def finish(self, **extra) -> None:
        self.done, self.phase = self.total, None
        self._write("finished", extra)

    def eta_s(self) -> float | None:
        progressed = self.done - self.start
        if progressed <= 0:
            return None
        return (time.monotonic() - self._t0) / progressed * (self.total - self.done)

    def _write(self, state: str, extra: dict) -> None:
        self._last_write = time.monotonic()
        record = {"stage": self.stage, "state": state, "done": _number(self.done), "total": _number(self.total),
                  "unit": self.unit, "phase": self.phase, "percent": round(100.0 * self.done / self.total, 1),
                  "eta_s": self.eta_s(), "updated_at": now(), **extra}
        try:
            self.store.write_json_atomic(self.rel, record)
        except (OSError, StoreError) as e:
            if not self._warned:
                log.warning("progress: cannot write %s (%s); the job goes on without it", self.rel, e)
                self._warned = True


def _number(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(x, 2)


def progress_line(p: dict) -> str:
    """``stage1 [██████░░░░]  60.0% 24/40 steps loss 6.214 eta 0:00:17 (phase)`` for logs and terminals."""
    percent = float(p.get("percent", 0.0))
    filled = min(10, max(0, int(percent // 10)))
    eta = p.get("eta_s")
    parts = [f"{p.get('stage')} [{'█' * filled}{'░' * (10 - filled)}] {percent:5.1f}%",
             f"{p.get('done')}/{p.get('total')} {p.get('unit', '')}".rstrip()]
    if "loss" in p:
        parts.append(f"loss {p['loss']:.3f}")
    if eta is not None and p.get("state") != "finished":
        parts.append(f"eta {int(eta) // 3600}:{int(eta) % 3600 // 60:02d}:{int(eta) % 60:02d}")
    if p.get("phase"):
        parts.append(f"({p['phase']})")
    return " ".join(parts)
