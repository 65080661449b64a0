"""The LongLoRA recipe family end to end: recipes/tiny-longlora.yaml through the `prolong` CLI on a
real Prefect server — base pretraining, the LoRA+ extension with position interpolation and S²-Attn
(its job killed mid-stage, the rerun resuming it), merge, LongAlpaca SFT with LoRA, merge, export to
GGUF, and LongLoRA's perplexity-by-length evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from prolong.manifest import read_manifest
from prolong.recipe import load_recipe
from prolong.store import Store
from tests.conftest import BIN, ROOT, prolong_cli, sets
from tests.test_e2e import _job_pid, flow_runs

pytestmark = pytest.mark.slow
STAGES = ("data", "base", "longlora", "merge", "sft", "merge_sft", "export", "eval")
# the recipe cut down for CI: the same stages and hand-offs, fewer steps
FAST = ["base.steps=16", "base.checkpoint_every=8", "longlora.steps=8", "longlora.checkpoint_every=2",
        "sft.steps=4", "sft.checkpoint_every=2", "eval.perplexity.seq_lens=[256,1K]"]


def test_both_longlora_recipes_validate_and_encode_the_readme_commands():
    big = load_recipe(ROOT / "recipes" / "longlora-7b-32k.yaml")
    for stage in ("longlora", "sft"):
        cfg = big.train_stage(stage)
        assert (cfg.seq_len, cfg.rope_theta, cfg.lr, cfg.lr_schedule, cfg.warmup) == \
            (32768, 1e4, 2e-5, "constant_with_warmup", 20)
        assert cfg.rope_scaling.parameters() == {"rope_type": "linear", "factor": 8.0}
        assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.trainable) == (8, 16, 0.0, ["embed", "norm"])
        assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
        assert cfg.optim.weight_decay == 0.0 and cfg.optim.betas == (0.9, 0.999)
    longlora = big.train_stage("longlora")
    assert longlora.steps == 1000 and longlora.global_batch_size == 64  # 8 GPUs × 1 × accumulation 8
    assert big.train_stage("sft").global_batch_size == 8  # 8 GPUs × 1 × 1
    assert big.model.path == "meta-llama/Llama-2-7b-hf" and big.model.s2_group_size(32768) == 8192
    assert (big.parallel.engine, big.parallel.zero_stage) == ("deepspeed", 2)
    assert big.data.domains["longalpaca"].prompt == "longlora_llama2"
    assert big.stages["eval"].perplexity.sliding_window == 256
    tiny = load_recipe(ROOT / "recipes" / "tiny-longlora.yaml")
    assert tiny.graph.order == list(STAGES) and tiny.graph.model_chain("merge_sft") == \
        ["merge_sft", "sft", "merge", "longlora", "base"]


def _metrics(store: Store, run: str, stage: str) -> dict:
    return read_manifest(store, run, stage).metrics


def test_tiny_longlora_runs_end_to_end_through_prefect_and_resumes_a_killed_lora_stage(prefect_env, tmp_path):
    store = Store(str(tmp_path / "runs"))
    args = ["run", "recipes/tiny-longlora.yaml", "--store", store.url, "--run-name", "ll", *sets(FAST)]
    proc = subprocess.Popen([str(BIN / "prolong"), *args], cwd=ROOT, env={**os.environ, **prefect_env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    marker = store.local_path("ll/longlora/checkpoints/step_00000004/COMPLETE")
    deadline = time.monotonic() + 900
    while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert marker.exists(), "the LoRA stage never checkpointed: " + (proc.stderr.read()[-3000:] if proc.poll() else "")
    pid = _job_pid("longlora", store.url)
    assert pid is not None
    os.killpg(os.getpgid(pid), signal.SIGKILL)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 5, (out[-2000:], err[-2000:])
    assert {"data", "base"} <= {s for s in STAGES if read_manifest(store, "ll", s)}
    assert read_manifest(store, "ll", "longlora") is None

    prolong_cli(*args, env=prefect_env, check=True, timeout=1500)
    assert all(read_manifest(store, "ll", s) is not None for s in STAGES)
    assert flow_runs(prefect_env, "ll")[-1]["state_type"] == "COMPLETED"

    # the LoRA stage resumed from its checkpoint, learned, and left an adapter — not full weights
    lora = _metrics(store, "ll", "longlora")
    assert lora["resumed_from_step"] >= 4 and lora["steps"] == 8
    assert _metrics(store, "ll", "base")["loss_last10"] < _metrics(store, "ll", "base")["loss_first"]
    assert 0 < lora["trainable_params"] < lora["total_params"] / 2
    assert store.exists("ll/longlora/adapter/adapter_model.safetensors")
    assert store.exists("ll/longlora/adapter/trainable_params.safetensors") and not store.exists("ll/longlora/hf")
    from safetensors.torch import load_file

    adapted = load_file(str(store.local_path("ll/longlora/adapter/adapter_model.safetensors")))
    lora_b = [v for k, v in adapted.items() if "lora_B" in k]
    assert len(lora_b) == 16 and all(torch.count_nonzero(b) for b in lora_b)  # B starts at zero: it trained
    base_embed = load_file(str(store.local_path("ll/base/hf/model.safetensors")))["model.embed_tokens.weight"]
    trained = load_file(str(store.local_path("ll/longlora/adapter/trainable_params.safetensors")))
    assert not torch.equal(trained["model.embed_tokens.weight"].to(base_embed.dtype), base_embed)
    adapter = json.loads(store.local_path("ll/longlora/adapter/adapter_config.json").read_text())
    assert adapter["r"] == 8 and adapter["base_model_name_or_path"].endswith("ll/base/hf")
    # its checkpoints hold what trains (adapters, embeddings, norms) and the optimizer, not the base
    from torch.distributed.checkpoint import FileSystemReader

    final = read_manifest(store, "ll", "longlora").artifacts["checkpoint"]
    keys = FileSystemReader(str(store.local_path(f"ll/longlora/{final}/dcp"))).read_metadata().state_dict_metadata
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k or "embed_tokens" in k or "norm" in k for k in model_keys)

    # merged: a plain Llama with the stage's θ and position interpolation, read by SFT and export
    from safetensors import safe_open

    with safe_open(str(store.local_path("ll/merge/hf/model.safetensors")), "pt") as f:
        names = list(f.keys())
    assert "lm_head.weight" in names and not any("lora" in n or "base_layer" in n for n in names)
    config = json.loads(store.local_path("ll/merge/hf/config.json").read_text())
    assert config["rope_scaling"]["factor"] == 8 and config["rope_scaling"]["rope_type"] == "linear"
    assert config["rope_theta"] == 1e4
    sft = read_manifest(store, "ll", "sft")
    assert sft.upstream["merge"] == read_manifest(store, "ll", "merge").digest
    assert sft.metrics["loss_last10"] < sft.metrics["loss_first"]
    export = read_manifest(store, "ll", "export")
    assert set(export.artifacts["gguf"]) == {"f16"} and export.metrics["context_length"] == 1024

    # a snapshot of the LoRA stage (the nightly evaluation's export job) is merged as the merge stage merges
    step = int(final.rsplit("_", 1)[-1])
    job = subprocess.run([str(BIN / "python"), "-m", "prolong.jobs.entry", "export-checkpoint", store.url, "ll",
                          "longlora", str(step), "ll/evals/snap/model"], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env={**os.environ, **prefect_env})
    assert job.returncode == 0, job.stderr[-3000:]
    snap = load_file(str(store.local_path("ll/evals/snap/model/hf/model.safetensors")))
    merged = load_file(str(store.local_path("ll/merge/hf/model.safetensors")))
    assert snap.keys() == merged.keys() and all(torch.equal(snap[k], merged[k]) for k in merged)

    # LongLoRA's Table 1: perplexity by evaluation length, with full attention
    ppl = _metrics(store, "ll", "eval")["perplexity"]["by_length"]
    assert set(ppl) == {"256", "1024"} and all(v["perplexity"] > 1 and v["windows"] > 0 for v in ppl.values())
    table = store.read_text("ll/eval/results.md")
    assert "| model | 256 | 1K |" in table and "| merge_sft |" in table
