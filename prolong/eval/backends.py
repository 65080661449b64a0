"""Which generator an eval stage scores: the model in this process (``backend: hf``), or a served
model (``backend: openai``: ``base_url``, or the server ``serve`` starts for the evaluated model).

Both give the same interface (``gen(text, max_new_tokens, ...)``) and are fed the same prompts, so
items, prompts and scoring are one code path; results record which backend and which artifact
(path and sha256) were scored.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from prolong.errors import StageError
from prolong.eval.prompts import HFGenerator
from prolong.layout import stage_prefix
from prolong.manifest import read_manifest
from prolong.model.load import DTYPES


def load_hf(path: str, dtype: str, device):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation="sdpa").to(device)
    model.eval()
    return model


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.model_max_length = 1 << 62
    return tok


def longlora_context(tok, pk) -> int:
    """Tokens LongLoRA's longest passkey prompts take with this tokenizer, and their answers."""
    from prolong.eval.synthetic.passkey import longlora_passkey_examples

    longest = longlora_passkey_examples(pk.test_lengths()[-1:], pk.num_tests, pk.seed)
    return max(len(tok(ex.prompt)["input_ids"]) + len(tok(ex.answer)["input_ids"]) for ex in longest)


def _tokenizer_adds_bos(tok) -> bool:
    ids = tok("a")["input_ids"]
    return bool(ids) and ids[0] == tok.bos_token_id


def served_gguf(cfg, store, run: str, model_stage: str, tmp: Path) -> tuple[Path, dict]:
    """The export stage's GGUF ``serve`` names, here locally, and its record (store path, sha256)."""
    m = read_manifest(store, run, model_stage)
    from prolong.stages.export import normalize_gguf_type

    wanted = normalize_gguf_type(cfg.serve.gguf) if cfg.serve.gguf else next(iter(m.artifacts["gguf"]))
    sub = m.artifacts["gguf"][wanted]
    rel = f"{stage_prefix(run, model_stage)}/{sub}"
    entry = next(o for o in m.outputs if o["path"] == sub)
    if store.is_local:
        local = store.local_path(rel)
    else:
        local = tmp / Path(sub).name
        with store.open(rel, "rb") as src, open(local, "wb") as dst:
            while block := src.read(8 << 20):
                dst.write(block)
    return Path(local), {"path": store.uri(rel), "sha256": entry["sha256"], "type": wanted}


@contextlib.contextmanager
def generator(cfg, recipe, store, run: str, model_stage: str, model_rel: str, model_dir: str, tmp: Path, device,
              log_dir: Path):
    """``with generator(...) as (gen, tok, model, scored):`` — ``model`` is None for a served one;
    ``scored`` says what was scored (for results.json)."""
    tok = load_tokenizer(model_dir)
    if cfg.backend == "hf":
        model = load_hf(model_dir, recipe.model.dtype, device)
        yield HFGenerator(model, tok, device), tok, model, {"backend": "hf", "model": store.uri(model_rel)}
        return
    from prolong.eval.serving import LOG_IN_STAGE, ServedGenerator, llama_cpp_server, vllm_server

    n_ctx = max(recipe.graph.trained_length(model_stage), max((max(cfg.lengths_of(t)) for t in
                (cfg.json_kv, cfg.helmet, cfg.passkey, cfg.needle) if t is not None), default=0))
    if cfg.passkey is not None and cfg.passkey.style == "longlora":
        # LongLoRA sizes its filler in characters: another tokenizer than LLaMA's can go past the test point
        n_ctx = max(n_ctx, longlora_context(tok, cfg.passkey))
    api_key = os.environ.get("OPENAI_API_KEY") if cfg.base_url else None
    if cfg.serve is None:
        yield ServedGenerator(cfg.base_url, tok, model=cfg.served_model, server_adds_bos=_tokenizer_adds_bos(tok),
                              timeout_s=cfg.request_timeout_s, api_key=api_key), tok, None, \
            {"backend": "openai", "base_url": cfg.base_url}
        return
    serve = cfg.serve
    if serve.engine == "llama_cpp":
        from prolong.export.llama_cpp import read_metadata

        if serve.file:
            gguf, artifact = Path(serve.file), {"path": serve.file}
        else:
            gguf, artifact = served_gguf(cfg, store, run, model_stage, tmp)
        adds_bos = bool(read_metadata(gguf)["add_bos"])
        args = [*serve.args, *(["--logits_all", "true"] if cfg.lm_eval is not None else [])]
        server = llama_cpp_server(gguf, n_ctx, args, log_dir / "serve.log", serve.startup_timeout_s)
    else:
        artifact = {"path": serve.file or store.uri(model_rel)}
        adds_bos = _tokenizer_adds_bos(tok)
        server = vllm_server(Path(serve.file or model_dir), n_ctx, serve.args, log_dir / "serve.log",
                             serve.startup_timeout_s)
    with server as base_url:
        gen = ServedGenerator(base_url, tok, model=cfg.served_model, server_adds_bos=adds_bos, server=server,
                              timeout_s=cfg.request_timeout_s)
        yield gen, tok, None, {"backend": "openai", "engine": serve.engine, "artifact": artifact,
                               "server_log": LOG_IN_STAGE}
        if gen.died:
            raise StageError(f"{gen.died}; the evaluation stopped there (its items are failed, not scored 0)")
