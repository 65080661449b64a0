"""Resume is exact: a training job killed with SIGKILL at a random step and resumed ends with weights
bit-identical to an uninterrupted run (model, optimizer, schedule, data position and RNG restored)."""

import os
import random
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from prolong.recipe import load_recipe
from prolong.errors import StageError
from prolong.jobs import JobState
from prolong.jobs.supervise import descendants
from prolong.pipeline import RunContext, job_spec, publish_recipe, run_stage
from prolong.store import Store
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
STEPS = 8
OVERRIDES = [f"stage1.steps={STEPS}", "stage1.checkpoint_every=1", "stage1.batch_tokens=2K", "stage2.steps=1",
             "sft.steps=1"]


def context(tmp_path, data_stages, run: str, overrides=OVERRIDES) -> RunContext:
    """A run whose data stage is done (a copy of the session's, for these inputs): stage 1 is the subject."""
    ctx = RunContext(recipe=load_recipe(ROOT / "recipes" / "tiny.yaml", overrides), store=Store(str(tmp_path / "runs")),
                     run=run)
    publish_recipe(ctx)
    data_stages.seed(ctx.store, run, overrides)
    return ctx


# stage1 as a LoRA stage (LongLoRA's LoRA+: adapters, embeddings and norms train); stage2 starts afresh
LORA = [*OVERRIDES, "stage1.lora.r=8", "eval_stage1.model_from=stage2", "stage2.init_from=model",
        "stage2.keep_optimizer_state=false"]


def weights(ctx: RunContext) -> dict:
    """What stage1 leaves: its HF weights, or a LoRA stage's adapter and fully trained parameters."""
    folder = ctx.store.local_path(f"{ctx.run}/stage1")
    if (folder / "adapter").exists():
        return {f"{f}:{k}": v for f in ("adapter_model", "trainable_params")
                for k, v in load_file(str(folder / "adapter" / f"{f}.safetensors")).items()}
    return load_file(str(folder / "hf" / "model.safetensors"))


@pytest.mark.parametrize("overrides", [OVERRIDES, LORA], ids=["full", "lora"])
def test_kill_9_at_a_random_step_then_resume_gives_bit_identical_weights(tmp_path, data_stages, overrides):
    straight = context(tmp_path, data_stages, "straight", overrides)
    run_stage(straight, "stage1")

    killed = context(tmp_path, data_stages, "killed", overrides)
    seed = int.from_bytes(os.urandom(4), "little")
    kill_after = random.Random(seed).randint(1, STEPS - 2)
    job = killed.backend.submit(job_spec(killed, "stage1", "first"))
    marker = killed.store.local_path(f"killed/stage1/checkpoints/step_{kill_after:08d}/COMPLETE")
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline and job.poll() == JobState.RUNNING:
        time.sleep(0.05)
    assert marker.exists(), f"no checkpoint at step {kill_after} (seed {seed})"
    os.killpg(job.proc.pid, signal.SIGKILL)  # the whole job, mid-step: no handler runs
    assert job.wait() == JobState.FAILED

    result = run_stage(killed, "stage1")
    assert result.manifest.metrics["resumed_from_step"] >= kill_after, seed
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs after resuming from step {kill_after} (seed {seed})"


def test_checkpoints_of_other_inputs_are_refused_not_overwritten(tmp_path, data_stages):
    ctx = context(tmp_path, data_stages, "r")
    job = ctx.backend.submit(job_spec(ctx, "stage1", "first"))
    marker = ctx.store.local_path("r/stage1/checkpoints/step_00000002/COMPLETE")
    deadline = time.monotonic() + 300
    while not marker.exists() and time.monotonic() < deadline and job.poll() == JobState.RUNNING:
        time.sleep(0.05)
    job.cancel(grace_s=1)
    changed = RunContext(recipe=load_recipe(ROOT / "recipes" / "tiny.yaml", [*OVERRIDES, "stage1.lr=0.001"]),
                         store=ctx.store, run="r")
    publish_recipe(changed)
    with pytest.raises(StageError) as err:
        run_stage(changed, "stage1")
    assert "were made for other inputs" in str(err.value) and "--from-stage stage1" in str(err.value)
    assert marker.exists()  # nothing was deleted
    assert run_stage(changed, "stage1", force=True).manifest.metrics["resumed_from_step"] is None


def _wait_for_step(ctx: RunContext, job, step: int) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() == JobState.RUNNING:
        progress = ctx.store.local_path(f"{ctx.run}/stage1/progress.json")
        if progress.exists() and '"done": ' in (text := progress.read_text()):
            import json

            if json.loads(text).get("done", 0) >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"the job did not reach step {step}: {job.tail()}")


def _ranks(job) -> list[int]:
    """The training processes of a local job (not torchrun, not the supervisor)."""
    pids = []
    for pid in descendants(job.proc.pid):
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        if b"prolong.jobs.entry" in cmd and b"prolong.jobs.launch" not in cmd:
            pids.append(pid)
    return pids


@pytest.mark.parametrize("how", ["SIGUSR1 to the ranks", "cancel (SIGTERM to the job)"])
def test_a_scheduler_signal_saves_a_checkpoint_and_the_rerun_resumes_from_it(tmp_path, data_stages, how):
    # no periodic checkpoints: whatever is resumed from was written because of the signal
    ctx = context(tmp_path, data_stages, "sig", [*OVERRIDES, "stage1.checkpoint_every=0", "stage1.steps=40"])
    job = ctx.backend.submit(job_spec(ctx, "stage1", "first"))
    _wait_for_step(ctx, job, 2)
    if how.startswith("SIGUSR1"):
        for pid in _ranks(job):
            os.kill(pid, signal.SIGUSR1)
        assert job.wait() == JobState.FAILED and job.exit_code == 75, job.tail()
        assert any("stopped by SIGUSR1 at step" in line for line in job.tail(40)), job.tail(40)
    else:
        job.cancel(grace_s=60)
        assert job.poll() == JobState.CANCELLED
        assert any("SIGTERM received" in line for line in job.tail(40)), job.tail(40)
    saved = sorted(p.name for p in ctx.store.local_path("sig/stage1/checkpoints").glob("step_*")
                   if (p / "COMPLETE").exists())
    assert saved, job.tail(40)
    step = int(saved[-1].removeprefix("step_"))
    assert 2 <= step < 40
    result = run_stage(ctx, "stage1")
    assert result.manifest.metrics["resumed_from_step"] == step
