"""Evaluating a served model: prompts sent to an OpenAI-compatible completions server (vLLM, SGLang,
llama.cpp's), the same prompts as the hf backend's, greedy, with HELMET's stops.

``eval.base_url`` names a running server; ``eval.serve`` has the job start one for the evaluated
model on 127.0.0.1 — llama.cpp's (``python -m llama_cpp.server``) on one of the export stage's GGUF
files, or vLLM's on its HF folder — health-checked before the first prompt, its log kept in the
stage's folder, stopped at the end. A request that fails is retried; then its item is *failed*
(never 0). A server that dies is not asked again: every later item fails, and the stage ends with
an error naming the server's exit and log.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from prolong.errors import StageError
from prolong.eval.prompts import GenerationFailed, prompt_token_ids

log = logging.getLogger(__name__)
STOP_AFTER_FAILED_ITEMS = 3
LOG_IN_STAGE = "logs/serve.log"
# HELMET's decoding: greedy, nothing else. OpenAI's fields, plus the repetition penalties servers
# apply by default (llama.cpp's repeat_penalty is 1.1 unless told; vLLM/SGLang name it repetition_penalty)
GREEDY = {"temperature": 0.0, "top_p": 1.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "seed": 0,
          "repeat_penalty": 1.0, "repetition_penalty": 1.0, "top_k": 1, "min_p": 0.0}  # where the eval stage keeps the server's log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server process of the job's own: ``with Server(cmd, log) as base_url:``."""

    def __init__(self, engine: str, command: list[str], port: int, log_path: Path, startup_timeout_s: float):
        self.engine, self.command, self.port, self.log_path = engine, command, port, log_path
        self.startup_timeout_s = startup_timeout_s
        self.shown_log = f"{LOG_IN_STAGE} in the stage's folder"
        self.proc: subprocess.Popen | None = None
        self.base_url = f"http://127.0.0.1:{port}/v1"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def describe_death(self) -> str:
        return f"the {self.engine} server exited (exit {self.proc.returncode}) [log: {self.shown_log}]"

    def __enter__(self) -> str:
        import httpx

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = open(self.log_path, "ab")
        log_file.write(f"$ {' '.join(self.command)}\n".encode())
        log_file.flush()
        self.proc = subprocess.Popen(self.command, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                raise StageError(f"eval.serve: {self.describe_death()} before it answered")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=5).status_code == 200:
                    log.info("%s server up at %s", self.engine, self.base_url)
                    return self.base_url
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise StageError(f"eval.serve: the {self.engine} server did not answer within {self.startup_timeout_s:.0f} s "
                         f"[log: {self.shown_log}]")

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def llama_cpp_server(gguf: Path, n_ctx: int, args: list[str], log_path: Path, startup_timeout_s: float) -> Server:
    port = _free_port()
    command = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(port), "--n_ctx", str(n_ctx), "--seed", "0", *args]
    return Server("llama_cpp", command, port, log_path, startup_timeout_s)


def vllm_server(model_dir: Path, n_ctx: int, args: list[str], log_path: Path, startup_timeout_s: float) -> Server:
    port = _free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host",
               "127.0.0.1", "--port", str(port), "--max-model-len", str(n_ctx), "--seed", "0", *args]
    return Server("vllm", command, port, log_path, startup_timeout_s)


class ServedGenerator:
    """``gen(text, max_new_tokens, ...)`` like :class:`prolong.eval.prompts.HFGenerator`, answered by a
    completions endpoint. The prompt is the text of exactly the tokens the hf backend would use
    (special tokens written out), less a leading BOS when the server adds one itself."""

    backend = "openai"

    def __init__(self, base_url: str, tokenizer, *, model: str | None = None, server_adds_bos: bool,
                 server: Server | None = None, timeout_s: float = 600, retries: int = 2, api_key: str | None = None):
        import httpx

        self.base_url, self.tokenizer, self.server = base_url.rstrip("/"), tokenizer, server
        self.server_adds_bos, self.timeout_s, self.retries = server_adds_bos, timeout_s, retries
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.model = model or httpx.get(f"{self.base_url}/models", headers=self.headers, timeout=30).json()["data"][0]["id"]
        self.died: str | None = None
        self.failed_in_a_row = 0

    def prompt_text(self, text: str, add_bos: bool, special_tokens: bool) -> str:
        ids = prompt_token_ids(self.tokenizer, text, add_bos, special_tokens)
        bos = self.tokenizer.bos_token_id
        if self.server_adds_bos and ids and ids[0] == bos:
            ids = ids[1:]
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __call__(self, text: str, max_new_tokens: int, stop_at_newline: bool = False, add_bos: bool = True,
                 special_tokens: bool = False) -> tuple[str, int]:
        import httpx

        if self.died:
            raise GenerationFailed(self.died)
        prompt = self.prompt_text(text, add_bos, special_tokens)
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_new_tokens, **GREEDY,
                **({"stop": ["\n"]} if stop_at_newline else {})}
        last = "no attempt"
        for attempt in range(self.retries + 1):
            if self.server is not None and not self.server.alive():
                self.died = self.server.describe_death()
                raise GenerationFailed(self.died)
            try:
                r = httpx.post(f"{self.base_url}/completions", json=body, headers=self.headers, timeout=self.timeout_s)
                if r.status_code == 200:
                    reply = r.json()
                    self.failed_in_a_row = 0
                    n = reply.get("usage", {}).get("prompt_tokens") or len(prompt_token_ids(self.tokenizer, text,
                                                                                           add_bos, special_tokens))
                    return reply["choices"][0]["text"], n
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except (httpx.HTTPError, ValueError, KeyError, IndexError) as e:
                last = f"{type(e).__name__}: {e}"
            log.warning("completion request %d/%d failed: %s", attempt + 1, self.retries + 1, last)
            time.sleep(min(2 ** attempt, 10))
        if self.server is not None and not self.server.alive():
            self.died = self.server.describe_death()
            raise GenerationFailed(self.died)
        self.failed_in_a_row += 1
        if self.failed_in_a_row >= STOP_AFTER_FAILED_ITEMS:  # a server that is gone, not one bad prompt
            self.died = f"the completions endpoint {self.base_url} failed {self.failed_in_a_row} items in a row ({last})"
        raise GenerationFailed(f"the completions endpoint failed: {last}")
