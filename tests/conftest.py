"""Shared fixtures: real services on 127.0.0.1 (S3 API server, Prefect server), built-in assets,
and a private temp dir per test (mosaicml-streaming keeps locks there)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# One torch (OpenMP) thread per process, in the tests and in every job and server they start: on 2
# shared cores a 2-thread process spins waiting for a thread that is not scheduled. Measured on such
# a machine: a FAST stage-1 job 97-116 s with torch's default, 36-44 s with one thread (and a third
# of the CPU time); test_export's 109 training steps 243 s, then 24 s. Set it to override.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The tiny recipe cut down to seconds per stage for tests (same stages, rules and hand-offs).
FAST = [
    "stage1.steps=6", "stage1.checkpoint_every=3", "stage1.batch_tokens=2K",
    "stage2.steps=4", "stage2.checkpoint_every=2",
    "sft.steps=4", "sft.checkpoint_every=2", "sft.batch_tokens=2K",
    "eval.json_kv.depths=[0.0,1.0]", "eval.json_kv.max_new_tokens=16", "eval.lm_eval.limit=8",
    "eval.helmet.max_items=1", "eval.perplexity.max_docs=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before answering {url}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer within {timeout}s")


def stop(proc: subprocess.Popen, grace_s: float = 15) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session", autouse=True)
def prolong_home(tmp_path_factory):
    """Built-in assets (tiny corpus, tokenizer, model) are built once per test session."""
    home = os.environ.get("PROLONG_TEST_HOME") or str(tmp_path_factory.mktemp("prolong-home"))
    os.environ["PROLONG_HOME"] = home
    os.environ["PROLONG_LOG_DIR"] = str(tmp_path_factory.mktemp("job-logs"))
    return Path(home)


@pytest.fixture(autouse=True)
def private_tmpdir(tmp_path, monkeypatch):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    return tmp


@pytest.fixture(scope="session")
def tiny_model_dir(prolong_home) -> str:
    from prolong import assets

    return assets.resolve("builtin:tiny-llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(prolong_home, tmp_path_factory) -> str:
    """A small Qwen2 (q/k/v biases, tied embeddings) with the tiny tokenizer: users asked for Qwen2."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from prolong import assets

    tok = AutoTokenizer.from_pretrained(assets.resolve("builtin:tiny-bpe"))
    config = Qwen2Config(vocab_size=len(tok), hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, rope_theta=1e6,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("qwen2")
    Qwen2ForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


# ---------------------------------------------------------------- S3 API server (moto)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "w")
    proc = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_http(endpoint, 30, proc)
        yield endpoint
    finally:
        stop(proc)


@pytest.fixture
def s3_store(s3_server, monkeypatch) -> str:
    """A fresh bucket on the S3 API server; the environment points s3fs/boto3/streaming at it."""
    import boto3

    monkeypatch.setenv("S3_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    import fsspec

    fsspec.config.conf.clear()
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()
    return f"s3://{bucket}/runs"


@pytest.fixture(scope="module")
def judge_url():
    """An OpenAI-compatible judge on 127.0.0.1 (tests/eval_judge_server.py): URL modes /ok, /flaky<N>,
    /garbage, /down; GET /requests tells how many requests came and with which Authorization."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "eval_judge_server.py"), str(port)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


# ---------------------------------------------------------------- Prefect server


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` (SQLite) on a free port, with its own PREFECT_HOME."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_API_URL": "",
           # the UI's browser code calls this URL (its default is port 4200, not this server's port)
           "PREFECT_SERVER_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        wait_http(f"{url}/health", 120, proc)
        yield {"url": url, "home": str(home)}
    finally:
        stop(proc)


def prolong_cli(*args: str, env: dict | None = None, timeout: float = 900, check: bool = False,
                cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Run the installed `prolong` console script as a user would."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run([str(BIN / "prolong"), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"prolong {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.fixture
def prefect_env(prefect_server, tmp_path) -> dict:
    return {"PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(tmp_path / "prefect-client"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def copy_recipe(tmp_path: Path, name: str = "tiny.yaml") -> Path:
    dst = tmp_path / name
    shutil.copy(ROOT / "recipes" / name, dst)
    return dst


def sets(overrides) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


# ---------------------------------------------------------------- finished stages, shared


def copy_stage(folder: Path, store, run: str, stage: str) -> None:
    """A finished stage's folder into run ``run`` of ``store`` (local or S3). Input keys name no run
    or store, so the copy is done there for a recipe with the same inputs."""
    store.put_dir(folder, f"{run}/{stage}")


class DataStages:
    """Finished data stages of the tiny recipe, one job per set of inputs per session: a test whose
    subject is a later stage starts from a copy instead of preparing the same data again."""

    def __init__(self, root: Path):
        self.root, self.made = root, {}

    @staticmethod
    def key(overrides, recipe: Path) -> str:
        from prolong.recipe import load_recipe

        return load_recipe(recipe, list(overrides)).graph["data"].config_digest()

    def add(self, overrides, folder: Path, recipe: Path = ROOT / "recipes" / "tiny.yaml") -> None:
        self.made.setdefault(self.key(overrides, recipe), folder)

    def seed(self, store, run: str, overrides=(), recipe: Path = ROOT / "recipes" / "tiny.yaml") -> None:
        """Put a finished data stage for ``recipe`` with ``overrides`` into ``run`` of ``store``."""
        from prolong.jobs import get_backend
        from prolong.pipeline import RunContext, publish_recipe, run_stage
        from prolong.recipe import load_recipe
        from prolong.store import Store

        key = self.key(overrides, recipe)
        if key not in self.made:
            source = Store(str(self.root / key[:16]))
            # a job on this machine whatever the recipe's backend: jobs.* is not among the data stage's inputs
            ctx = RunContext(recipe=load_recipe(recipe, list(overrides)), store=source, run="data",
                             backend=get_backend("local"))
            publish_recipe(ctx)
            run_stage(ctx, "data")
            self.made[key] = source.local_path("data/data")
        copy_stage(self.made[key], store, run, "data")


@pytest.fixture(scope="session")
def data_stages(tmp_path_factory) -> DataStages:
    return DataStages(tmp_path_factory.mktemp("data-stages"))


TINY_RUN = "e2e"


@pytest.fixture(scope="session")
def tiny_run(prefect_server, data_stages, tmp_path_factory) -> dict:
    """The tiny recipe cut down (FAST) run once end to end through the CLI on the session's Prefect
    server: test_e2e checks this run, and tests that need finished upstream stages copy them (seed)."""
    from prolong.store import Store

    root = tmp_path_factory.mktemp("tiny-run")
    env = {"PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(root / "prefect-client"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    store = Store(str(root / "runs"))
    out = prolong_cli("run", "recipes/tiny.yaml", "--store", store.url, "--run-name", TINY_RUN, *sets(FAST), env=env,
                      check=True)
    data_stages.add(FAST, store.local_path(f"{TINY_RUN}/data"))
    return {"store": store, "run": TINY_RUN, "out": out}


def seed(tiny_run: dict, store, run: str, stages=("data", "stage1")) -> None:
    """Copy finished stages of the shared tiny run into ``run`` of ``store``: they are done there for
    a recipe whose inputs to them are FAST's (the data stage's include every training stage's steps
    and batch size; stage 1's, its own fields only)."""
    for stage in stages:
        copy_stage(tiny_run["store"].local_path(f"{tiny_run['run']}/{stage}"), store, run, stage)
