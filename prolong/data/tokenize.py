"""Tokenization of documents and chats with any HF tokenizer.

Text documents get BOS/EOS as the tokenizer defines them (a tokenizer without BOS, like Qwen2's,
gets none; one without EOS is rejected: document ends must be visible to the model). Chats are
rendered with the tokenizer's chat template; the loss mask covers assistant turns only. A prompt and
its answer (LongLoRA's SFT format) are tokenized as LongLoRA's supervised-fine-tune.py does.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from functools import cached_property
from typing import Iterator

import numpy as np

from prolong import assets
from prolong.data.pack import TokenizedDoc
from prolong.data.sources import Document
from prolong.errors import DataError

log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template (base models): plain role headers, documented in README.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if not loop.first %}\n{% endif %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ eos_token if message['role'] == 'assistant' else '' }}"
    "{% endfor %}{% if add_generation_prompt %}\nAssistant: {% endif %}"
)


def load_tokenizer(ref: str, revision: str | None = None):
    from transformers import AutoTokenizer

    path = assets.resolve(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    except (OSError, ValueError) as e:
        raise DataError(f"model.tokenizer: cannot load tokenizer {ref!r} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    tok.model_max_length = 1 << 62  # we cut documents ourselves; silence length warnings
    return tok


_worker: "DocumentTokenizer | None" = None


def _init_worker(ref: str, revision: str | None) -> None:
    global _worker
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _worker = DocumentTokenizer(ref, revision)


def _encode_chat_in_worker(doc: Document) -> TokenizedDoc:
    return _worker.encode_chat(doc)


class DocumentTokenizer:
    # Rendering chat templates is Python (Jinja), one conversation at a time: worth a process pool
    # only for datasets larger than this.
    PARALLEL_CHATS = 20_000

    def __init__(self, ref: str, revision: str | None = None):
        self.ref, self.revision = ref, revision
        self.tok = load_tokenizer(ref, revision)
        if self.tok.eos_token_id is None:
            raise DataError(f"model.tokenizer: tokenizer {ref!r} has no EOS token; documents need an end marker")
        self.bos = self.tok.bos_token_id
        self.eos = self.tok.eos_token_id
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

    @cached_property
    def chat_template(self) -> str:
        if self.tok.chat_template:
            return self.tok.chat_template
        log.warning("tokenizer %s has no chat template; SFT data uses the plain 'Role: text' fallback", self.ref)
        return FALLBACK_CHAT_TEMPLATE

    def encode_texts(self, texts: list[str]) -> list[TokenizedDoc]:
        """Batch-encode with the Rust tokenizer (its threads use all cores) and add BOS/EOS."""
        if not texts:
            return []
        head = 1 if self.bos is not None else 0
        out = []
        for enc in self.tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = np.empty(len(enc.ids) + head + 1, dtype=np.uint32)
            if head:
                ids[0] = self.bos
            ids[head:-1] = enc.ids
            ids[-1] = self.eos
            out.append(TokenizedDoc(ids=ids))
        return out

    def encode_ids(self, doc: Document) -> TokenizedDoc:
        """A document tokenized elsewhere (no BOS/EOS, as ProLong's data_before_packing) gets the BOS/EOS
        a text document gets — after a check that its ids are this tokenizer's."""
        ids = np.asarray(doc.ids)
        vocab = len(self.tok)
        if ids.ndim != 1 or (ids.dtype.kind not in "iu"):
            raise DataError(f"{doc.id}: token ids are {ids.dtype} of shape {ids.shape}, not a list of integers")
        if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
            bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
            raise DataError(f"{doc.id}: token id {bad} is outside the vocabulary of {self.ref} ({vocab} tokens); "
                            "the documents were tokenized with another tokenizer")
        if len(ids) and ((self.bos is not None and int(ids[0]) == self.bos) or int(ids[-1]) == self.eos):
            raise DataError(f"{doc.id}: the document already has BOS/EOS ids ({self.bos}/{self.eos}) of {self.ref}; "
                            "tokenized sources hold documents without them (they are added here)")
        head = 1 if self.bos is not None else 0
        out = np.empty(len(ids) + head + 1, dtype=np.uint32)
        if head:
            out[0] = self.bos
        out[head:-1] = ids
        out[-1] = self.eos
        return TokenizedDoc(ids=out)

    def encode_chats(self, docs: list[Document], workers: int = 0) -> Iterator[TokenizedDoc]:
        """`encode_chat` over many conversations, in order, on `workers` processes (0: all cores)."""
        workers = workers or os.cpu_count() or 1
        if workers <= 1 or len(docs) < self.PARALLEL_CHATS:
            yield from map(self.encode_chat, docs)
            return
        # spawn: fresh interpreters, no forked tokenizer threads. An executor (unlike multiprocessing.Pool,
        # which respawns crashing workers forever) fails with BrokenProcessPool if a worker dies.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                                 initargs=(self.ref, self.revision)) as pool:
            try:
                yield from pool.map(_encode_chat_in_worker, docs, chunksize=256)
            except BrokenProcessPool as e:
                raise DataError(f"model.tokenizer: a chat-rendering worker died ({e})") from None

    def _render(self, messages, add_generation_prompt: bool = False) -> str:
        return self.tok.apply_chat_template(list(messages), chat_template=self.chat_template, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def encode_prompt(self, doc: Document) -> TokenizedDoc:
        """A prompt and its answer as LongLoRA's ``preprocess`` makes them: prompt + answer + the EOS
        string tokenized as one text, with the special tokens the tokenizer adds itself (Llama-2's BOS;
        none for a byte-level BPE), and no loss on its first n tokens, n being the prompt tokenized alone
        and counted as LongLoRA counts it (tokens other than pad). Nothing is truncated here: packing
        cuts a document at seq_len when it starts a sample, as LongLoRA truncates at model_max_length."""
        ids = self.tok(doc.prompt + doc.answer + self.tok.eos_token)["input_ids"]
        pad = self.tok.pad_token_id
        n = sum(1 for t in self.tok(doc.prompt)["input_ids"] if t != pad)
        mask = np.zeros(len(ids), dtype=np.uint8)
        mask[n:] = 1
        return TokenizedDoc(ids=np.asarray(ids, dtype=np.uint32), mask=mask)

    def encode_chat(self, doc: Document) -> TokenizedDoc:
        """Render a conversation; the mask covers the tokens of each assistant turn (a prompt and its
        answer go to :meth:`encode_prompt`).

        Assistant turns are located as character spans (the rendering of the conversation up to the
        turn, minus the rendering up to its generation prompt) and mapped to tokens by offsets, so
        any template works that renders conversation prefixes as text prefixes (all common ones
        do) — no `{% generation %}` markers needed. A token straddling a span edge is trained on.
        """
        if doc.prompt is not None:
            return self.encode_prompt(doc)
        messages = list(doc.messages)
        text = self._render(messages)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            try:
                start = len(self._render(messages[:i], add_generation_prompt=True))
            except Exception:  # some templates refuse an empty conversation
                start = 0
            end = len(self._render(messages[:i + 1]))
            if not text.startswith(self._render(messages[:i + 1])) or start > end:
                raise DataError(f"{doc.id}: the chat template does not render conversation prefixes as text "
                                f"prefixes, so assistant turns cannot be located (tokenizer {self.ref})")
            spans.append((start, end))
        enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        mask = [int(any(a < e and b > s for s, e in spans)) for a, b in enc["offset_mapping"]]
        if not ids or ids[-1] != self.eos:
            ids.append(self.eos)
            mask.append(0)
        return TokenizedDoc(ids=np.asarray(ids, dtype=np.uint32), mask=np.asarray(mask, dtype=np.uint8))
