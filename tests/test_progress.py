"""progress.json: the one progress record every job writes (prolong.progress)."""

from __future__ import annotations

import time

import pytest

from prolong.progress import StageProgress, progress_line
from prolong.store import Store


def test_progress_is_throttled_but_never_misses_a_phase_change_or_the_end(tmp_path):
    store = Store(str(tmp_path))
    p = StageProgress(store, "run/data/progress.json", "data", total=3, unit="domains", interval_s=3600)
    p.update(0, phase="books: reading")
    first = store.read_json("run/data/progress.json")
    assert (first["state"], first["done"], first["total"], first["unit"], first["percent"]) == ("running", 0, 3, "domains", 0.0)
    assert first["phase"] == "books: reading" and first["eta_s"] is None

    p.update(0.5)  # same phase, inside the interval: not written
    assert store.read_json("run/data/progress.json")["done"] == 0
    p.update(1, phase="code: reading")  # a new phase is always written
    second = store.read_json("run/data/progress.json")
    assert (second["done"], second["percent"], second["phase"]) == (1, 33.3, "code: reading")
    assert second["eta_s"] is not None and second["eta_s"] >= 0
    p.update(2.25, force=True)
    assert store.read_json("run/data/progress.json")["done"] == 2.25
    p.finish()
    last = store.read_json("run/data/progress.json")
    assert (last["state"], last["done"], last["percent"], last["phase"]) == ("finished", 3, 100.0, None)


def test_eta_counts_only_this_attempts_own_rate(tmp_path):
    store = Store(str(tmp_path))
    p = StageProgress(store, "p.json", "stage1", total=100, unit="steps", start=60, interval_s=0)
    assert p.eta_s() is None  # a resumed run has done nothing yet in this attempt
    time.sleep(0.05)
    p.update(70)
    eta = p.eta_s()
    elapsed = time.monotonic() - p._t0
    assert eta == pytest.approx(elapsed / 10 * 30, rel=0.2)  # 30 steps left at 10 steps per `elapsed`


def test_a_store_path_that_is_a_file_never_fails_the_job(tmp_path, caplog):
    store = Store(str(tmp_path))
    (tmp_path / "run").write_text("a file where the run's folder should be")
    p = StageProgress(store, "run/eval/progress.json", "eval", total=2, unit="parts", interval_s=0)
    p.update(1, phase="x")
    p.finish()
    assert caplog.text.count("progress: cannot write") == 1


def test_progress_line_reads_at_a_glance():
    line = progress_line({"stage": "stage1", "state": "running", "done": 24, "total": 40, "unit": "steps",
                          "percent": 60.0, "eta_s": 3723.4, "loss": 6.2141, "phase": None})
    assert line == "stage1 [██████░░░░]  60.0% 24/40 steps loss 6.214 eta 1:02:03"
    done = progress_line({"stage": "eval", "state": "finished", "done": 6, "total": 6, "unit": "parts",
                          "percent": 100.0, "eta_s": 0.0, "phase": "needle at 1024 tokens, item 3"})
    assert done == "eval [██████████] 100.0% 6/6 parts (needle at 1024 tokens, item 3)"
