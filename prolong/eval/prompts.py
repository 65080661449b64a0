"""Prompts for generation tasks: one place for chat templates, context truncation and greedy decoding.

A task fills a user template around a *context* (documents, demos, a book) and names the
assistant's first words (``Answer:``). When the prompt is longer than ``length − max_new_tokens``
the context alone is cut from its end — instruction, demos and question stay whole — counted and
cut as HELMET's ``tokenize`` (model_utils.py) does it. Without the chat template (base models, and HELMET's RAG,
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


def prompt_ids(tokenizer, text: str, chat: bool) -> list[int]:
    """The prompt's tokens as HELMET's ``tokenize`` (model_utils.py) makes them: a chat-templated
    prompt as the template wrote it, a plain one with the tokenizer's own special tokens."""
    return tokenizer(text, add_special_tokens=not chat)["input_ids"]


def _cut_before(tokenizer, text: str, t: int) -> str:
    """HELMET's context cut: ``text`` up to the start of its ``t``-th token from the end, counted
    with the tokenizer's special tokens (a slow tokenizer: those tokens but the last ``t``, decoded
    with their special tokens, as HELMET decodes them)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, return_offsets_mapping=True)["offset_mapping"]
        if t > len(offsets):
            raise IndexError(t)
        return text[:offsets[-t][0]]
    ids = tokenizer(text)["input_ids"]
    if t > len(ids):
        raise IndexError(t)
    return tokenizer.decode(ids[:-t])


def fit(prompt: Prompt, tokenizer, max_tokens: int, chat: bool) -> tuple[str, int]:
    """The rendered prompt cut to ``max_tokens`` (HELMET's ``max_length − generation_max_length``)
    as HELMET's ``tokenize`` cuts it: counted by :func:`prompt_ids`, a prompt ``t`` tokens over has
    its context cut once, before the context's ``t``-th token from the end, and is not re-counted
    (a token may merge across the cut). HELMET's quirk, kept: those context tokens include the
    tokenizer's special tokens, so with a trailing EOS the cut is one token short (the prompt ends
    one over), and one token over empties the context (EOS's offset is 0). ``omission`` (ours;
    HELMET has none) follows a cut context, its tokens cut too. Returns (text, context tokens
    removed)."""
    text = prompt.render(tokenizer, chat)
    excess = len(prompt_ids(tokenizer, text, chat)) - max_tokens
    if excess <= 0:
        return text, 0
    try:
        context = _cut_before(tokenizer, prompt.context, excess + n_tokens(tokenizer, prompt.omission))
    except IndexError:  # HELMET fails with an IndexError
        raise ValueError(f"{max_tokens} tokens cannot hold the instruction, demos and question without any context"
                         ) from None
    text = prompt.render(tokenizer, chat, context + prompt.omission)
    return text, n_tokens(tokenizer, prompt.context) - n_tokens(tokenizer, context)


def truncate_text(tokenizer, text: str, max_tokens: int, postfix: str) -> str:
    """HELMET's ``truncate_llama2`` (data.py): a text over ``max_tokens`` tokens keeps everything up
    to the end of its token at index ``max_tokens − len(tokens(postfix))`` and ends with
    ``postfix``. Both counts include the tokenizer's special tokens and the index is into the list
    that starts with them, so a leading BOS takes one token of the text, an EOS one of the postfix.
    HELMET's quirks, kept: an index on a special token keeps no text, a negative one counts from
    the end."""
    fast = getattr(tokenizer, "is_fast", False)
    enc = tokenizer(text, return_offsets_mapping=True) if fast else tokenizer(text)
    ids = enc["input_ids"]
    if len(ids) <= max_tokens:
        return text
    i = max_tokens - len(tokenizer(postfix)["input_ids"])
    if i < -len(ids):  # HELMET fails with an IndexError
        return postfix
    if fast:
        return text[:enc["offset_mapping"][i][1]] + postfix
    i %= len(ids)
    if ids[i] in set(tokenizer.all_special_ids):
        return postfix
    return tokenizer.decode(ids[:i + 1], skip_special_tokens=True) + postfix


def newline_token_ids(tokenizer) -> list[int]:
    """Tokens that are only line breaks (HELMET's stop list for ``stop_new_line`` tasks)."""
    ids = {tokenizer.convert_tokens_to_ids(t) for t in ("\n", "Ċ", "ĊĊ", "<0x0A>")}
    return sorted(i for i in ids if i is not None and i != tokenizer.unk_token_id)


def prompt_token_ids(tokenizer, text: str, add_bos: bool = True, special_tokens: bool = False) -> list[int]:
    """The tokens a prompt is generated from. ``add_bos``: prepend BOS unless the text starts with it
    (plain prompts); chat-templated text is taken as the template wrote it. ``special_tokens``:
    instead, whichever special tokens the tokenizer adds itself (HELMET's plain prompts,
    :func:`prompt_ids`)."""
    ids = list(tokenizer(text, add_special_tokens=special_tokens)["input_ids"])
    bos = tokenizer.bos_token_id
    if add_bos and not special_tokens and bos is not None and (not ids or ids[0] != bos):
        ids = [bos, *ids]
    return ids


class GenerationFailed(RuntimeError):
    """One prompt got no generation (a served model's request failed): the item is failed, not 0."""


@torch.no_grad()
def generate(model, tokenizer, text: str, max_new_tokens: int, device, stop_at_newline: bool = False,
             add_bos: bool = True, special_tokens: bool = False) -> tuple[str, int]:
    """Greedy decoding; returns (continuation, prompt tokens). ``stop_at_newline`` ends generation at
    a line-break token, as HELMET does for short answers, and returns the first line (a token such
    as ".\n" does not stop generation; the answer parsers read the first line). Tokens:
    :func:`prompt_token_ids`."""
    ids = torch.tensor([prompt_token_ids(tokenizer, text, add_bos, special_tokens)], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = model.generation_config.eos_token_id
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if stop_at_newline:
        eos = sorted(set(eos) | set(newline_token_ids(tokenizer)))
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad, **({"eos_token_id": eos} if eos else {}))
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if stop_at_newline:  # the first line: what the parsers read, and what a server's stop=["\n"] returns
        text = text.split("\n", 1)[0]
    return text, ids.shape[1]


class HFGenerator:
    """Greedy generation by the model in this process: ``gen(text, max_new_tokens, ...)``."""

    backend = "hf"

    def __init__(self, model, tokenizer, device):
        self.model, self.tokenizer, self.device = model, tokenizer, device

    def __call__(self, text: str, max_new_tokens: int, stop_at_newline: bool = False, add_bos: bool = True,
                 special_tokens: bool = False) -> tuple[str, int]:
        return generate(self.model, self.tokenizer, text, max_new_tokens, self.device, stop_at_newline, add_bos,
                        special_tokens)
