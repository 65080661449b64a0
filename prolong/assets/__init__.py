"""Built-in assets for the tiny recipe, made locally and offline (``builtin:NAME`` in recipes).

Real recipes name HF hub ids or paths; the tiny recipe must run with no network, so it builds what
it needs from the Python standard library installed on this machine:

* ``builtin:python-stdlib`` — the stdlib folder itself: its packages are the "code repositories";
* ``builtin:tiny-corpus/books.jsonl`` — one long document per module: its docstrings as a manual;
* ``builtin:tiny-corpus/short.jsonl`` — short prose: the Python reference topics and class docs;
* ``builtin:tiny-corpus/chat.jsonl`` — UltraChat-style ``messages`` asking what an API does;
* ``builtin:tiny-corpus/longalpaca.jsonl`` — LongAlpaca-style rows: long QA over a manual, and short QA;
* ``builtin:tiny-bpe`` — a byte-level BPE tokenizer trained on that corpus with ``tokenizers``;
* ``builtin:tiny-llama`` — a randomly initialised Llama (a few M parameters) with that tokenizer;
* ``builtin:tiny-lm-eval`` — an lm-eval multiple-choice task on local files;
* ``builtin:tiny-helmet`` — HELMET's file layout, made from the stdlib's docs;
* ``builtin:tiny-prolong-mds`` — that corpus in the folders and MDS formats of ProLong's released data.

Assets are built once per version under ``$PROLONG_HOME`` (default ``~/.cache/prolong``), under a
file lock and renamed into place, so concurrent jobs never see half-built assets. A builder gets
the folders of the assets it is made from (``deps``), built first; builders live in their own
modules and never reach back here.
"""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from prolong.assets.models import TINY_LLAMA, TINY_VOCAB
from prolong.assets.stdlib_docs import stdlib_dir
from prolong.errors import ConfigError
from prolong.locks import file_lock

ASSET_VERSION = "v3"  # v2: tiny-helmet has 10 passages at 1K (HELMET scores nDCG@10 from 10 on); v3: LongAlpaca rows
PREFIX = "builtin:"


@dataclass(frozen=True)
class Asset:
    builder: str  # "module:function", called as function(out, final, deps)
    deps: tuple[str, ...] = ()
    expected: tuple[str, ...] = ()  # files a successful build has


ASSETS = {
    "tiny-corpus": Asset("prolong.assets.corpus:build_tiny_corpus",
                         expected=("books.jsonl", "short.jsonl", "chat.jsonl", "longalpaca.jsonl")),
    "tiny-bpe": Asset("prolong.assets.models:build_tiny_bpe", ("tiny-corpus",), ("tokenizer.json",)),
    "tiny-llama": Asset("prolong.assets.models:build_tiny_llama", ("tiny-bpe",),
                        ("config.json", "model.safetensors", "tokenizer.json")),
    "tiny-lm-eval": Asset("prolong.assets.lm_eval_task:build_tiny_lm_eval",
                          expected=("pymodule_mc.yaml", "pymodule_mc.jsonl")),
    "tiny-helmet": Asset("prolong.assets.tiny_helmet:build", ("tiny-corpus",),
                         ("kilt/nq-512.jsonl", "msmarco/rerank-1024.jsonl", "icl/nlu-test.jsonl",
                          "narrativeqa/test.jsonl", "multi_lexsum/test.jsonl")),
    "tiny-prolong-mds": Asset("prolong.assets.released:build", ("tiny-corpus", "tiny-bpe"),
                              ("data-512/books-512/index.json", "data-512/code-512/index.json",
                               "data-512/shortmix/index.json", "data-512/textbooks/index.json",
                               "ultrachat-512/index.json", "raw/books/index.json")),
}


def home() -> Path:
    return Path(os.environ.get("PROLONG_HOME", Path.home() / ".cache" / "prolong")).expanduser()


def is_builtin(ref: str | None) -> bool:
    return bool(ref) and ref.startswith(PREFIX)


def resolve(ref: str) -> str:
    """A recipe reference → a usable path/id; ``builtin:`` references are built on first use."""
    if not is_builtin(ref):
        return ref
    name, _, sub = ref[len(PREFIX):].partition("/")
    if name == "python-stdlib":
        return str(stdlib_dir() / sub) if sub else str(stdlib_dir())
    check_ref(ref, ref)
    path = _ensure(name)
    target = path / sub if sub else path
    if not target.exists():
        raise ConfigError(f"{ref}: no such file in the built-in asset {name}")
    return str(target)


def check_ref(ref: str, field: str) -> None:
    """A ``builtin:`` reference names a known asset (checked without building it)."""
    name = ref[len(PREFIX):].partition("/")[0]
    if name != "python-stdlib" and name not in ASSETS:
        raise ConfigError(f"{field}: {ref}: unknown built-in asset (known: python-stdlib, {', '.join(ASSETS)})")


def builtin_model_config(ref: str) -> dict | None:
    """The config.json a built-in model will have (without building it), for checks before a run."""
    if ref == f"{PREFIX}tiny-llama":
        return {"model_type": "llama", "vocab_size": TINY_VOCAB, **TINY_LLAMA}
    return None


def asset_dir(name: str) -> Path:
    """Where a built-in asset lives once built."""
    return home() / "builtin" / f"{name}-{ASSET_VERSION}"


def _ensure(name: str) -> Path:
    final = asset_dir(name)
    if final.exists():
        return final
    asset = ASSETS[name]
    deps = {dep: _ensure(dep) for dep in asset.deps}
    with file_lock(home() / "builtin" / f".{name}.lock"):
        if final.exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            module, _, function = asset.builder.partition(":")
            getattr(importlib.import_module(module), function)(tmp, final, deps)
            missing = [f for f in asset.expected if not (tmp / f).exists()]
            if missing:
                raise RuntimeError(f"builtin:{name}: building it left out {', '.join(missing)}")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
