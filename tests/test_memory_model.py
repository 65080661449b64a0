"""The per-rank memory model (prolong.parallel.memory) against peaks measured with MemTracker."""

import json
import os
import subprocess
import sys

import pytest

from bench.memory_model import LLAMA3_8B, measure
from prolong.parallel.memory import GiB, Shape, estimate
from tests.conftest import ROOT


@pytest.mark.parametrize("seq_len,chunk,ac", [(2048, 512, False), (4096, 1024, True)],
                         ids=["no-checkpointing", "checkpointing"])
def test_the_model_predicts_the_measured_activation_peak(prolong_home, seq_len, chunk, ac):
    row = measure(seq_len, chunk, ac)
    assert 0.85 < row["ratio"] < 1.15, row


@pytest.mark.slow
def test_the_model_predicts_each_ranks_peak_under_ulysses_sp2(prolong_home, tmp_path):
    out = tmp_path / "sp.json"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "bench" / "memory_model.py"), "--sp-worker", str(out)], cwd=ROOT, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and all(r["sequence_parallel"] == 2 and 0.85 < r["ratio"] < 1.15 for r in rows), rows


def test_llama3_8b_fits_an_80gb_gpu_at_512k_only_with_sp8():
    from transformers import LlamaConfig

    shape = Shape.of(LlamaConfig(**LLAMA3_8B))
    assert shape.params == pytest.approx(8.03e9, rel=1e-3)
    sp8 = estimate(shape, seq_len=512 * 1024, sequence_parallel=8, world_size=8, loss_chunk_size=8192)
    sp1 = estimate(shape, seq_len=512 * 1024, sequence_parallel=1, world_size=8, loss_chunk_size=8192)
    assert sp8.total < 80 * GiB < sp1.total
    # checkpointed layer inputs: 32 layers × 64K tokens × 4096 × bf16
    assert sp8.phases["backward (one layer)"]["layers"] == 32 * 65536 * 4096 * 2
