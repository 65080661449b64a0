"""Tokenization of documents and chats with any HF tokenizer.

Text documents get BOS/EOS as the tokenizer defines them (a tokenizer without BOS, like Qwen2's,
gets none; one without EOS is rejected: document ends must be visible to the model). Chats are
rendered with the tokenizer's chat template; the loss mask covers assistant turns only.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property

import numpy as np

from prolong import assets
from prolong.data.pack import TokenizedDoc
from prolong.data.sources import Document
from prolong.errors import DataError

log = logging.getLogger(__name__)

# Used when a tokenizer has no chat template (base models): plain role headers, documented in README.
FALLBACK_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}{{ eos_token if message['role'] == 'assistant' else '' }}\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant: {% endif %}"
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


class DocumentTokenizer:
    def __init__(self, ref: str, revision: str | None = None):
        self.ref = ref
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
        """Batch-encode (tokenizers' Rust threads use all cores) and add BOS/EOS."""
        if not texts:
            return []
        encoded = self.tok(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
        head = [self.bos] if self.bos is not None else []
        return [TokenizedDoc(ids=np.asarray(head + ids + [self.eos], dtype=np.uint32)) for ids in encoded]

    def _render(self, messages, add_generation_prompt: bool = False) -> list[int]:
        out = self.tok.apply_chat_template(list(messages), chat_template=self.chat_template, tokenize=True,
                                           add_generation_prompt=add_generation_prompt, return_dict=True)
        return list(out["input_ids"])

    def encode_chat(self, doc: Document) -> TokenizedDoc:
        """Render a conversation; mask = the tokens each assistant turn adds to the rendering.

        Works for any template that renders conversation prefixes as token prefixes (all common
        ones do), without needing `{% generation %}` markers in the template.
        """
        messages = list(doc.messages)
        full = self._render(messages)
        mask = np.zeros(len(full), dtype=np.uint8)
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._render(messages[:i], add_generation_prompt=True)) if i else 0
            upto = self._render(messages[:i + 1])
            if full[:len(upto)] != upto:
                raise DataError(f"{doc.id}: the chat template does not render conversation prefixes as token "
                                f"prefixes, so assistant tokens cannot be located (tokenizer {self.ref})")
            mask[start:len(upto)] = 1
        if not full or full[-1] != self.eos:
            full.append(self.eos)
            mask = np.append(mask, np.uint8(0))
        return TokenizedDoc(ids=np.asarray(full, dtype=np.uint32), mask=mask)
