"""Built-in assets for the tiny recipe, made locally and offline (``builtin:NAME`` in recipes).

Real recipes name HF hub ids or paths; the tiny recipe must run with no network, so it builds what
it needs from the Python standard library installed on this machine:

* ``builtin:python-stdlib`` — the stdlib folder itself: its packages are the "code repositories";
* ``builtin:tiny-corpus/books.jsonl`` — one long document per module: its docstrings as a manual;
* ``builtin:tiny-corpus/short.jsonl`` — short prose: the Python reference topics and class docs;
* ``builtin:tiny-corpus/chat.jsonl`` — UltraChat-style ``messages`` asking what an API does;
* ``builtin:tiny-bpe`` — a byte-level BPE tokenizer trained on that corpus with ``tokenizers``;
* ``builtin:tiny-llama`` — a randomly initialised Llama (a few M parameters) with that tokenizer;
* ``builtin:tiny-lm-eval`` — an lm-eval multiple-choice task on local files.

Assets are built once per version under ``$PROLONG_HOME`` (default ``~/.cache/prolong``), under a
file lock and renamed into place, so concurrent jobs never see half-built assets.
"""

from __future__ import annotations

import ast
import contextlib
import fcntl
import json
import os
import random
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from prolong.errors import ConfigError

ASSET_VERSION = "v2"  # v2: tiny-helmet has 10 passages at 1K (HELMET scores nDCG@10 from 10 on)
PREFIX = "builtin:"
# Packages of the stdlib that are test suites, data tables or vendored copies, not "repositories".
STDLIB_EXCLUDE = ("test", "idlelib", "encodings", "pydoc_data", "__phello__", "turtledemo", "lib2to3",
                  "site-packages", "ensurepip", "config-3.11-x86_64-linux-gnu")

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eot_id|>", "<|pad|>"]
# Llama-3's chat format; `{% generation %}` marks assistant tokens for HF's assistant-mask support.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|eot_id|>{% endgeneration %}"
    "{% else %}{{ message['content'] }}<|eot_id|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TINY_LLAMA = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                  num_key_value_heads=2, max_position_embeddings=8192, rope_theta=500000.0)
TINY_VOCAB = 4096


def home() -> Path:
    return Path(os.environ.get("PROLONG_HOME", Path.home() / ".cache" / "prolong")).expanduser()


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def is_builtin(ref: str | None) -> bool:
    return bool(ref) and ref.startswith(PREFIX)


def resolve(ref: str) -> str:
    """A recipe reference → a usable path/id; ``builtin:`` references are built on first use."""
    if not is_builtin(ref):
        return ref
    name, _, sub = ref[len(PREFIX):].partition("/")
    if name == "python-stdlib":
        return str(stdlib_dir() / sub) if sub else str(stdlib_dir())
    if name not in _BUILDERS:
        raise ConfigError(f"{ref}: unknown built-in asset (known: python-stdlib, {', '.join(_BUILDERS)})")
    path = _ensure(name, _BUILDERS[name])
    target = path / sub if sub else path
    if not target.exists():
        raise ConfigError(f"{ref}: no such file in the built-in asset {name}")
    return str(target)


def check_ref(ref: str, field: str) -> None:
    """A ``builtin:`` reference names a known asset (checked without building it)."""
    name = ref[len(PREFIX):].partition("/")[0]
    if name != "python-stdlib" and name not in _BUILDERS:
        raise ConfigError(f"{field}: {ref}: unknown built-in asset (known: python-stdlib, {', '.join(_BUILDERS)})")


def builtin_model_config(ref: str) -> dict | None:
    """The config.json a built-in model will have (without building it), for checks before a run."""
    if ref == f"{PREFIX}tiny-llama":
        return {"model_type": "llama", "vocab_size": TINY_VOCAB, **TINY_LLAMA}
    return None


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def asset_dir(name: str) -> Path:
    """Where a built-in asset lives once built."""
    return home() / "builtin" / f"{name}-{ASSET_VERSION}"


def _ensure(name: str, build: Callable[[Path], None]) -> Path:
    final = asset_dir(name)
    if final.exists():
        return final
    with _locked(home() / "builtin" / f".{name}.lock"):
        if final.exists():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
        try:
            build(tmp)
            missing = [f for f in _EXPECTED.get(name, ()) if not (tmp / f).exists()]
            if missing:
                raise RuntimeError(f"builtin:{name}: building it left out {', '.join(missing)}")
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


# ---------------------------------------------------------------- corpus


def _stdlib_modules() -> Iterator[tuple[str, Path]]:
    root = stdlib_dir()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in STDLIB_EXCLUDE or rel.parts[0].startswith("_") and len(rel.parts) > 1:
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        if parts and all(p.isidentifier() for p in parts):
            yield ".".join(parts), path


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # unparse of exotic defaults
        return "(...)"


def _module_docs(path: Path) -> tuple[str | None, list[tuple[str, str, str]]]:
    """(module docstring, [(qualname, signature, docstring)]) without importing the module."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None, []
    items: list[tuple[str, str, str]] = []

    def visit(body, prefix):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_"):
                    continue
                doc = ast.get_docstring(node)
                sig = _signature(node) if not isinstance(node, ast.ClassDef) else ""
                if doc:
                    items.append((prefix + node.name, sig, doc))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, prefix + node.name + ".")

    visit(tree.body, "")
    return ast.get_docstring(tree), items


def _first_paragraph(doc: str, limit: int = 400) -> str:
    para = doc.strip().split("\n\n")[0]
    para = " ".join(para.split())
    return para if len(para) <= limit else para[:limit].rsplit(" ", 1)[0] + " ..."


def build_tiny_corpus(out: Path) -> None:
    rng = random.Random(0)
    books, short, chat = [], [], []
    for module, path in _stdlib_modules():
        mdoc, items = _module_docs(path)
        sections = [f"# {module}\n\n{mdoc or ''}".rstrip()]
        for qualname, sig, doc in items:
            sections.append(f"## {module}.{qualname}{sig}\n\n{doc}")
            if "." in qualname and not sig:  # nested classes read as short articles
                short.append({"text": f"{module}.{qualname}\n\n{doc}"})
            elif not sig:
                short.append({"text": f"class {module}.{qualname}\n\n{doc}"})
            if sig and len(doc) > 40:
                chat.append({"messages": [
                    {"role": "user", "content": f"What does `{module}.{qualname}` do?"},
                    {"role": "assistant", "content": _first_paragraph(doc)},
                ]})
                if rng.random() < 0.3:
                    chat[-1]["messages"] += [
                        {"role": "user", "content": "What is its signature?"},
                        {"role": "assistant", "content": f"`{qualname.rsplit('.', 1)[-1]}{sig}`"},
                    ]
        if len(sections) > 1 or mdoc:
            books.append({"text": "\n\n".join(sections), "title": module})
    from pydoc_data.topics import topics  # the Python language reference, as prose

    short.extend({"text": text.strip(), "title": name} for name, text in sorted(topics.items()))
    for name, rows in (("books", books), ("short", short), ("chat", chat)):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


# ---------------------------------------------------------------- tokenizer and model


def _tokenizer_training_text(corpus: Path) -> Iterator[str]:
    for name in ("books", "short", "chat"):
        with open(corpus / f"{name}.jsonl") as f:
            for line in f:
                row = json.loads(line)
                yield row["text"] if "text" in row else "\n".join(m["content"] for m in row["messages"])
    root = stdlib_dir()
    for path in sorted(root.glob("*.py"))[:200]:  # some code, so code tokenizes sensibly
        yield path.read_text(encoding="utf-8", errors="replace")


def build_tiny_bpe(out: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = Path(resolve(f"{PREFIX}tiny-corpus"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=TINY_VOCAB, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_training_text(corpus), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                   eos_token="<|end_of_text|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = TINY_LLAMA["max_position_embeddings"]
    fast.save_pretrained(out)


def build_tiny_llama(out: Path) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve(f"{PREFIX}tiny-bpe"))
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **TINY_LLAMA)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Written directly, not with save_pretrained: under an initialised process group that writes
    # weights on rank 0 only, and the rank building the asset may be any rank.
    from safetensors.torch import save_file

    config.save_pretrained(out)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    tok.save_pretrained(out)


def build_tiny_lm_eval(out: Path) -> None:
    """A 4-way multiple-choice task: which module defines this function? (local JSONL + task YAML)."""
    rng = random.Random(1)
    defs: dict[str, list[str]] = {}
    for module, path in _stdlib_modules():
        if "." in module:
            continue
        _, items = _module_docs(path)
        names = [q for q, sig, _ in items if sig and "." not in q]
        if len(names) >= 3:
            defs[module] = names
    modules = sorted(defs)
    rows = []
    for module in modules:
        for name in rng.sample(defs[module], 2):
            others = rng.sample([m for m in modules if m != module and name not in defs[m]], 3)
            choices = others + [module]
            rng.shuffle(choices)
            rows.append({"question": f"Which standard-library module defines the function `{name}`?",
                         "choices": choices, "answer": choices.index(module)})
    rng.shuffle(rows)
    with open(out / "pymodule_mc.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    (out / "pymodule_mc.yaml").write_text(
        "task: pymodule_mc\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        # built in a temporary folder that is then renamed: the task file names the final location
        f"  data_files: {{test: {json.dumps(str(asset_dir('tiny-lm-eval') / 'pymodule_mc.jsonl'))}}}\n"
        "test_split: test\n"
        "fewshot_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: \"Question: {{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


_EXPECTED = {"tiny-corpus": ("books.jsonl", "short.jsonl", "chat.jsonl"), "tiny-bpe": ("tokenizer.json",),
             "tiny-llama": ("config.json", "model.safetensors", "tokenizer.json"),
             "tiny-lm-eval": ("pymodule_mc.yaml", "pymodule_mc.jsonl"),
             "tiny-helmet": ("kilt/nq-512.jsonl", "msmarco/rerank-1024.jsonl", "icl/nlu-test.jsonl",
                             "narrativeqa/test.jsonl", "multi_lexsum/test.jsonl")}

_BUILDERS: dict[str, Callable[[Path], None]] = {
    "tiny-corpus": build_tiny_corpus,
    "tiny-bpe": build_tiny_bpe,
    "tiny-llama": build_tiny_llama,
    "tiny-lm-eval": build_tiny_lm_eval,
    "tiny-helmet": lambda out: __import__("prolong.eval.tiny_helmet", fromlist=["build"]).build(out),
}
