"""Prompts for generation tasks: one place for chat templates, context truncation and greedy decoding.

A task fills a user template around a *context* (documents, demos, a book) and names the
assistant's first words (``Answer:``). When the prompt is longer than ``length − max_new_tokens``
the context alone is cut from its end — instruction, demos and question stay whole (HELMET's
``tokenize`` in model_utils.py). Without the chat template (base models, and HELMET's RAG,
re-rank, ICL and recall configs) the prompt is the user text, a separator and the prefix; with it
(HELMET's QA and summary configs for instruction-tuned models) the user turn goes through the
tokenizer's template with the generation prompt and no prefix, as HELMET does by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Prompt:
    template: str  # str.format template with a {context} field
    context: str
    fields: dict = field(default_factory=dict)
    assistant_prefix: str = ""
    omission: str = ""  # appended to a cut context
    separator: str = "\n"  # between the user text and the prefix without a chat template

    def render(self, tokenizer, chat: bool, context: str | None = None) -> str:
        user = self.template.format(context=self.context if context is None else context, **self.fields)
        if chat and getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
        return user + (self.separator + self.assistant_prefix if self.assistant_prefix else "")


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _head(tokenizer, text: str, keep: int, at_end: bool = False) -> str:
    """The first ``keep`` tokens of ``text``, cut at a character offset where the tokenizer gives
    offsets so the text stays as written (HELMET's way), else decoded. The cut falls where the next
    token starts, or with ``at_end`` where the last kept one ends (the two places HELMET cuts)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if keep >= len(offsets):
            return text
        return (text[:offsets[keep - 1][1]] if keep else "") if at_end else text[:offsets[keep][0]]
    return tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:keep])


def fit(prompt: Prompt, tokenizer, max_tokens: int, chat: bool) -> tuple[str, int]:
    """The rendered prompt within ``max_tokens`` (leave one for the BOS that :func:`generate` adds),
    cutting the context from its end. Returns (text, context tokens removed)."""
    text = prompt.render(tokenizer, chat)
    total = n_tokens(tokenizer, text)
    if total <= max_tokens:
        return text, 0
    n_ctx = n_tokens(tokenizer, prompt.context)
    keep = max_tokens - (total - n_ctx + n_tokens(tokenizer, prompt.omission))
    while keep > 0:
        text = prompt.render(tokenizer, chat, _head(tokenizer, prompt.context, keep) + prompt.omission)
        over = n_tokens(tokenizer, text) - max_tokens
        if over <= 0:  # re-tokenising at the seam can add a token
            return text, n_ctx - keep
        keep -= over
    raise ValueError(f"{max_tokens} tokens cannot hold the instruction, demos and question without any context")


def truncate_text(tokenizer, text: str, max_tokens: int, postfix: str) -> str:
    """HELMET's ``truncate_llama2`` (data.py): a text over ``max_tokens`` tokens (special tokens
    counted, as HELMET counts them) keeps what fits beside ``postfix`` and ends with it."""
    ids = tokenizer(text)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    special = len(ids) - n_tokens(tokenizer, text)  # BOS and the like, counted by HELMET
    keep = max_tokens - len(tokenizer(postfix)["input_ids"]) + 1 - special
    return _head(tokenizer, text, max(keep, 0), at_end=True) + postfix


def newline_token_ids(tokenizer) -> list[int]:
    """Tokens that are only line breaks (HELMET's stop list for ``stop_new_line`` tasks)."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("\n", "Ċ", "ĊĊ", "<0x0A>")}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


@torch.no_grad()
def generate(model, tokenizer, text: str, max_new_tokens: int, device, stop_at_newline: bool = False,
             add_bos: bool = True) -> tuple[str, int]:
    """Greedy decoding; returns (continuation, prompt tokens). ``stop_at_newline`` ends generation at
    a line-break token, as HELMET does for short answers (a token such as ".\n" does not stop it,
    the answer parsers take the first line). ``add_bos``: prepend BOS unless the text starts with
    it (plain prompts); chat-templated text is taken as the template wrote it."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    bos = tokenizer.bos_token_id
    if add_bos and bos is not None and (ids.shape[1] == 0 or ids[0, 0].item() != bos):
        ids = torch.cat([torch.tensor([[bos]], device=device), ids], dim=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if stop_at_newline:
        eos = sorted(set(eos) | set(newline_token_ids(tokenizer)))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad, **({"eos_token_id": eos} if eos else {}))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), ids.shape[1]
