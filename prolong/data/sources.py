"""Sources → documents. Every domain of a recipe reads one source and yields documents in a
deterministic order; a document is either text or a chat (``messages``).

* ``repos``: a folder of code repositories, one document per repository with its files
  concatenated in a seeded random order (paper Table 9: "code repos"; not dependency order);
* ``files``: jsonl / txt / parquet files, local or remote (fsspec), a file, folder or glob;
* ``hf``: a Hugging Face dataset by name (``datasets.load_dataset``), streamed by default.

Row sources (files, hf) can keep rows by field values (``where``: SlimPajama's book subset) and
concatenate rows into one document per key (``group_by``: The Stack's files per repository).
In sft domains, instruction/output rows (Alpaca, LongAlpaca) become chats, or — with a LongLoRA
``prompt`` — a prompt and its answer in LongLoRA's Llama-2 format; ``min_prompt_chars`` keeps long
QA only (LongLoRA issue #119).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from prolong import assets
from prolong.config import DomainConfig, FileSource, HFSource, MDSSource, RepoSource
from prolong.errors import DataError


@dataclass(frozen=True)
class Document:
    id: str
    text: str | None = None
    messages: tuple[dict, ...] | None = None
    ids: Any = None  # already tokenized (an `mds` source): token ids without BOS/EOS
    # a prompt and its answer (a LongLoRA prompt): tokenized as LongLoRA does, the loss on the answer
    prompt: str | None = None
    answer: str | None = None


# LongLoRA's Llama-2 prompts (supervised-fine-tune.py's PROMPT_DICT) as (rows without input, rows with
# input). Without input the script uses prompt_llama2 since 2023-11-19 and prompt_no_input_llama2 (the
# Llama-2 system prompt) from 2023-11-02; rows with a non-empty input use prompt_input_llama2 in both.
_LLAMA2_SYSTEM = (
    "[INST] <<SYS>>\n"
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering something "
    "not correct. If you don't know the answer to a question, please don't share false information.\n"
    "<</SYS>> \n\n"
)
LONGLORA_PROMPTS = {
    "longlora_llama2": ("[INST]{instruction}[/INST]", _LLAMA2_SYSTEM + " {instruction} \n{input} [/INST]"),
    "longlora_llama2_system": (_LLAMA2_SYSTEM + " {instruction} [/INST]",
                               _LLAMA2_SYSTEM + " {instruction} \n{input} [/INST]"),
}


def _seeded(seed: int, key: str) -> random.Random:
    return random.Random(int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little"))


def _read_text(path: Path, where: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: invalid UTF-8 at byte {e.start} ({where})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}) ({where})") from None


# ---------------------------------------------------------------- repos


def _repo_documents(src: RepoSource, where: str, seed: int) -> Iterator[Document]:
    root = Path(assets.resolve(src.path)).expanduser()
    if not root.is_dir():
        raise DataError(f"{where}.path: {root} is not a folder of repositories")
    repos = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    repos = [p for p in repos if not any(fnmatch.fnmatch(p.name, pat) for pat in src.exclude)]
    for repo in repos:
        files = sorted(f for f in repo.rglob("*") if f.is_file() and any(fnmatch.fnmatch(f.name, pat) for pat in src.files))
        if not files:
            continue
        _seeded(seed, repo.name).shuffle(files)
        parts = []
        for f in files:
            try:
                parts.append(f.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                continue  # binary or legacy-encoded files inside a repository are skipped, not fatal
        text = "\n\n".join(p for p in parts if p.strip())
        if text:
            yield Document(id=f"{root.name}/{repo.name}", text=text)


# ---------------------------------------------------------------- files


def _expand_paths(path: str, where: str) -> list[str]:
    import fsspec

    from prolong.store import storage_options

    resolved = assets.resolve(path)
    fs, root = fsspec.core.url_to_fs(resolved, **storage_options(resolved))
    if any(c in root for c in "*?["):
        found = sorted(fs.glob(root))
    elif fs.isdir(root):
        found = sorted(p for p in fs.find(root) if not Path(p).name.startswith("."))
    elif fs.exists(root):
        found = [root]
    else:
        found = []
    if not found:
        raise DataError(f"{where}.path: {resolved} does not exist or matches no files")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if protocol == "file" else f"{protocol}://{p}" for p in found]


def _file_format(path: str, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    name = path.lower().removesuffix(".gz").removesuffix(".zst")
    for ext, kind in ((".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet"), (".txt", "txt"), (".md", "txt")):
        if name.endswith(ext):
            return kind
    raise DataError(f"{path}: cannot tell the format from the name; set source.format (jsonl, txt, parquet)")


def _field(row: dict, dotted: str):
    value = row
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _instruction_row(row: dict, doc_id: str, where: str) -> tuple[str, str, str]:
    """(instruction, input, output) of an Alpaca-style row; ``input`` may be absent or null."""
    for name in ("instruction", "output"):
        if name not in row:
            raise DataError(f"{doc_id}: no field {name!r}; instruction rows need instruction and output ({where})")
    fields = {name: row.get(name) for name in ("instruction", "input", "output")}
    fields["input"] = "" if fields["input"] is None else fields["input"]
    for name, value in fields.items():
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise DataError(f"{doc_id}: field {name!r} must be a string, not {kind} ({where})")
    return fields["instruction"], fields["input"], fields["output"]


def _row_document(row: dict, src: FileSource | HFSource, kind: str, doc_id: str, where: str,
                  prompt: str = "chat_template", min_prompt_chars: int | None = None) -> Document | None:
    """The document of one row; None when ``min_prompt_chars`` drops it."""
    text = row.get(src.text_field)
    if kind != "sft" and not isinstance(text, str) and src.messages_field in row:
        kind = "sft"  # chat rows in a text domain (Tulu-v2 in ShortMix): rendered, trained on in full
    if kind == "sft":
        messages = row.get(src.messages_field)
        if prompt != "chat_template" or (messages is None and "instruction" in row):  # Alpaca, LongAlpaca rows
            instruction, input_, output = _instruction_row(row, doc_id, where)
            if min_prompt_chars is not None and len(instruction) + len(input_) < min_prompt_chars:
                return None
            if prompt != "chat_template":
                no_input, with_input = LONGLORA_PROMPTS[prompt]
                source = (with_input if input_ else no_input).format_map({"instruction": instruction, "input": input_})
                return Document(id=doc_id, prompt=source, answer=output)
            user = f"{instruction}\n\n{input_}" if input_ else instruction
            return Document(id=doc_id, messages=({"role": "user", "content": user},
                                                 {"role": "assistant", "content": output}))
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise DataError(f"{doc_id}: field {src.messages_field!r} must be a list of {{role, content}} ({where})")
        if min_prompt_chars is not None and sum(len(m["content"]) for m in messages if m["role"] != "assistant"
                                                and isinstance(m["content"], str)) < min_prompt_chars:
            return None
        return Document(id=doc_id, messages=tuple(messages))
    if not isinstance(text, str):
        raise DataError(f"{doc_id}: no text field {src.text_field!r} ({where}.text_field)")
    return Document(id=doc_id, text=text)


def _file_rows(src: FileSource, where: str) -> Iterator[tuple[str, dict]]:
    import fsspec

    from prolong.store import storage_options

    for path in _expand_paths(src.path, where):
        fmt = _file_format(path, src.format)
        opts = storage_options(path)
        try:
            if fmt == "txt":
                with fsspec.open(path, "rb", compression="infer", **opts) as f:
                    raw = f.read()
                try:
                    yield path, {src.text_field: raw.decode("utf-8"), "path": path}
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}: invalid UTF-8 at byte {e.start} ({where})") from None
            elif fmt == "jsonl":
                with fsspec.open(path, "rb", compression="infer", **opts) as f:
                    for n, line in enumerate(f, 1):
                        if not line.strip():
                            continue
                        try:
                            row = json.loads(line.decode("utf-8"))
                        except UnicodeDecodeError as e:
                            raise DataError(f"{path}:{n}: invalid UTF-8 at byte {e.start} of the line ({where})") from None
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}) ({where})") from None
                        if not isinstance(row, dict):
                            raise DataError(f"{path}:{n}: a row must be a JSON object ({where})")
                        yield f"{path}:{n}", row
            else:
                import pyarrow.parquet as pq

                with fsspec.open(path, "rb", **opts) as f:
                    table = pq.read_table(f)
                for n, row in enumerate(table.to_pylist()):
                    yield f"{path}#{n}", row
        except FileNotFoundError:
            raise DataError(f"{path}: file not found ({where}.path)") from None
        except PermissionError:
            raise DataError(f"{path}: permission denied ({where}.path)") from None


# ---------------------------------------------------------------- Hugging Face datasets


def _hf_rows(src: HFSource, where: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(src.name, src.subset, split=src.split, data_dir=src.data_dir,
                                   data_files=src.data_files, revision=src.revision, streaming=src.streaming)
    except FileNotFoundError as e:
        raise DataError(f"{where}.name: dataset {src.name!r} not found ({e})") from None
    except Exception as e:  # datasets raises many types for unreachable hubs and bad configs
        raise DataError(f"{where}: cannot load dataset {src.name!r} ({type(e).__name__}: {e})") from None
    for n, row in enumerate(ds):
        yield f"{src.name}#{n}", row


def _rows(rows: Iterator[tuple[str, dict]], src: FileSource | HFSource, domain: DomainConfig, where: str,
          seed: int) -> Iterator[Document]:
    """Apply `where` filters and `group_by` concatenation to (id, row) pairs."""
    rows = ((i, r) for i, r in rows if all(_field(r, k) == v for k, v in src.where.items()))
    if src.group_by is None:
        for doc_id, row in rows:
            doc = _row_document(row, src, domain.kind, doc_id, where, domain.prompt, domain.min_prompt_chars)
            if doc is not None:
                yield doc
        return
    # Grouping needs every row of a group: held in memory, keyed by the group value.
    groups: dict[str, list[tuple]] = {}
    for doc_id, row in rows:
        key = _field(row, src.group_by)
        if key is None:
            raise DataError(f"{doc_id}: no field {src.group_by!r} to group by ({where}.group_by)")
        order = None
        if src.order_by is not None:
            order = _field(row, src.order_by)
            if order is None:
                raise DataError(f"{doc_id}: no field {src.order_by!r} to order by ({where}.order_by)")
        groups.setdefault(str(key), []).append((order, _row_document(row, src, "long", doc_id, where).text))
    for key in sorted(groups):
        parts = groups[key]
        if src.order_by is not None:
            parts.sort(key=lambda p: p[0])
        else:
            _seeded(seed, key).shuffle(parts)  # seeded random order, not dependency order
        yield Document(id=key, text="\n\n".join(text for _, text in parts))


# ---------------------------------------------------------------- tokenized MDS


def _mds_documents(src: MDSSource, where: str) -> Iterator[Document]:
    """One document per sample of an MDS folder of tokenized documents (ProLong's data_before_packing)."""
    import tempfile

    import numpy as np

    from prolong.data import remote
    from prolong.data.mds import StreamSource, folder_samples

    uri = remote.local_path(src.path) if assets.is_builtin(src.path) else remote.with_revision(src.path, src.revision)
    _, index = remote.read_index(uri, src.storage_options, what=f"{where}.path")
    for shard in index["shards"]:
        columns = dict(zip(shard.get("column_names", []), shard.get("column_encodings", [])))
        if src.field not in columns:
            raise DataError(f"{where}.field: {uri} has no column {src.field!r} (columns: {', '.join(columns)})")
        if not columns[src.field].startswith("ndarray:") or "float" in columns[src.field]:
            raise DataError(f"{where}.field: {uri}'s {src.field} is {columns[src.field]}, not token ids")
    with tempfile.TemporaryDirectory(prefix="prolong-mds-source-") as cache:
        _, samples = folder_samples(StreamSource("source", uri, 1.0, dict(src.storage_options), None), Path(cache))
        for i, sample in samples:
            ids = np.asarray(sample[src.field])
            if "length" in sample and sample["length"] is not None and int(sample["length"]) != len(ids):
                raise DataError(f"{uri} sample {i}: length says {int(sample['length'])}, {src.field} has {len(ids)}")
            yield Document(id=f"{uri}#{i}", ids=ids)


def iter_documents(name: str, domain: DomainConfig, seed: int, where: str | None = None) -> Iterator[Document]:
    """Documents of one domain, in a deterministic order, up to ``max_documents``; ``where`` names
    the source's config field in errors."""
    where = where or f"data.domains.{name}.source"
    src = domain.source
    if isinstance(src, RepoSource):
        if domain.kind == "sft":
            raise DataError(f"{where}.type: a repos source cannot feed an sft domain")
        docs = _repo_documents(src, where, seed)
    elif isinstance(src, FileSource):
        docs = _rows(_file_rows(src, where), src, domain, where, seed)
    elif isinstance(src, MDSSource):
        if domain.kind == "sft":
            raise DataError(f"{where}.type: tokenized documents carry no chat turns to mask; an sft domain "
                            "reads chats (files, hf) or packed SFT folders (kind: packed)")
        docs = _mds_documents(src, where)
    else:
        docs = _rows(_hf_rows(src, where), src, domain, where, seed)
    for i, doc in enumerate(docs):
        if domain.max_documents is not None and i >= domain.max_documents:
            return
        yield doc
