"""Benchmarks are not tests, but they must not rot: each GPU-only benchmark has a CPU smoke mode."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_the_throughput_benchmark_runs_through_the_engine_in_smoke_mode(prolong_home):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--smoke"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["smoke"] and row["tokens_per_s_median"] > 0 and row["loss"] > 0
