"""The data catalogue of a recipe (``data:``): named domains, each a source and a packing kind."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import Field, model_validator

from prolong.config.base import Tokens, _Config

class RepoSource(_Config):
    """A folder whose sub-folders are code repositories: one document per repository."""

    type: Literal["repos"]
    path: str
    files: list[str] = ["*"]  # globs of files to keep inside each repository
    exclude: list[str] = []  # globs of repository names to skip


class _RowSource(_Config):
    text_field: str = "text"
    messages_field: str = "messages"  # chats; in long/short domains they are rendered as plain text
    # keep rows whose (dotted) fields equal these values, e.g. {meta.redpajama_set_name: RedPajamaBook}
    where: dict[str, Any] = {}
    # one document per distinct value of this field (a repository, a book, a subject) ...
    group_by: str | None = None
    # ... with its parts sorted by this field (chapters of a book); unset: a seeded random order
    # (the files of a repository, as the paper does: not dependency order)
    order_by: str | None = None


class FileSource(_RowSource):
    """Local or remote files (jsonl, json, txt, parquet); a path may be a file, folder or glob."""

    type: Literal["files"]
    path: str
    format: Literal["auto", "jsonl", "txt", "parquet"] = "auto"


class HFSource(_RowSource):
    """A Hugging Face dataset by name (``datasets.load_dataset``), streamed by default."""

    type: Literal["hf"]
    name: str
    subset: str | None = None
    split: str = "train"
    data_dir: str | None = None
    data_files: str | list[str] | None = None
    revision: str | None = None
    streaming: bool = True


class MDSSource(_Config):
    """Tokenized, unpacked documents in MDS (ProLong's ``data_before_packing``): one document per
    sample, its ids in ``field``; packed by our rules without tokenizing again. The ids must be of
    the recipe's tokenizer; BOS/EOS are added as for text documents."""

    type: Literal["mds"]
    path: str  # a folder with index.json: local, s3://, hf://datasets/ORG/REPO/PATH
    revision: str | None = None  # hf:// folders: the commit (or tag) to read
    storage_options: dict[str, Any] = {}  # fsspec options, e.g. {requester_pays: true}; never credentials
    field: str = "input_ids"

    @model_validator(mode="after")
    def _no_credentials(self):
        check_storage_options(self.storage_options, "storage_options")
        return self


def check_storage_options(options: dict[str, Any], field: str) -> None:
    """Recipes are stored with every run: keys, secrets and tokens come from the environment or a
    Prefect Secret block, never from here."""
    def walk(obj, where):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if re.search(r"secret|token|password|key(?!s)|credential|session", str(k), re.I) and \
                        str(k) not in ("requester_pays",):
                    raise ValueError(f"{where}.{k}: looks like a credential; set it in the environment or a "
                                     "Prefect Secret block, never in a recipe")
                walk(v, f"{where}.{k}")

    walk(options, field)


Source = Annotated[Union[RepoSource, FileSource, HFSource, MDSSource], Field(discriminator="type")]


class DomainConfig(_Config):
    """A named data domain. ``long``: cut into single-document samples of the stream length;
    ``short``: packed with the truncated remainder carried over; ``sft``: chat data, packed with
    the remainder discarded and a loss mask on assistant tokens (paper §A.2)."""

    kind: Literal["long", "short", "sft"]
    source: Source
    max_documents: int | None = Field(default=None, gt=0)
    # sft: how a row becomes tokens. chat_template: the tokenizer's chat template, loss on assistant
    # turns. longlora_llama2: LongLoRA's supervised-fine-tune.py — instruction/output rows in its Llama-2
    # prompt, loss on the output and EOS; longlora_llama2_system: the same with the Llama-2 system
    # prompt, as the script had it from 2023-11-02 to 2023-11-19 (prolong.data.sources.LONGLORA_PROMPTS).
    prompt: Literal["chat_template", "longlora_llama2", "longlora_llama2_system"] = "chat_template"
    # sft: long-QA filtering (LongLoRA issue #119: fine-tune on long QA only, LongAlpaca-12k's short QA
    # removed): a row is dropped when its prompt text — instruction and input, or a chat's
    # non-assistant turns — has fewer characters (before max_documents counts)
    min_prompt_chars: int | None = Field(default=None, gt=0)
    ADDED_LATER = frozenset({"prompt", "min_prompt_chars"})

    @model_validator(mode="after")
    def _sft_options(self):
        for name in ("prompt", "min_prompt_chars"):
            if self.kind != "sft" and getattr(self, name) != type(self).model_fields[name].default:
                raise ValueError(f"{name}: applies to sft domains only (this domain is {self.kind})")
        return self


class DataConfig(_Config):
    seed: int = 42
    num_workers: int = Field(default=0, ge=0)  # 0: all cores
    domains: dict[str, DomainConfig]
    compression: str | None = "zstd"
    # Extra samples written beyond what the stage mixtures consume, so a stream is not repeated.
    oversample: float = Field(default=1.0, ge=1.0)
    # The report's "share of documents longer than" columns (the paper's Table 14 uses 4K-32K).
    report_thresholds: list[Tokens] = [4096, 8192, 16384, 32768]

    @model_validator(mode="after")
    def _names(self):
        for name in self.domains:
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"domains.{name}: domain names use letters, digits, '_' and '-' only")
        return self
