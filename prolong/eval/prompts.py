"""Prompts for generation tasks: one place for chat templates, context truncation and greedy decoding.

A task fills a user template around a *context* (documents, demos, a book) and names the
assistant's first words (``Answer:``). When the prompt is longer than ``length − max_new_tokens``
the context alone is cut from its end — instruction, demos and question stay whole — and an
omission marker may mark the cut (HELMET's rule). With the chat template (instruction-tuned
models) the user turn is wrapped by the tokenizer's template and the assistant prefix follows the
generation prompt; without it (base models) the prefix follows the user text on a new line.
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

    def render(self, tokenizer, chat: bool, context: str | None = None) -> str:
        user = self.template.format(context=self.context if context is None else context, **self.fields)
        if chat and getattr(tokenizer, "chat_template", None):
            head = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
            return head + self.assistant_prefix
        return user + ("\n" + self.assistant_prefix if self.assistant_prefix else "")


def n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def fit(prompt: Prompt, tokenizer, max_tokens: int, chat: bool) -> tuple[str, int]:
    """The rendered prompt within ``max_tokens`` (leave one for the BOS that :func:`generate` adds),
    cutting the context from its end. Returns (text, context tokens removed)."""
    text = prompt.render(tokenizer, chat)
    total = n_tokens(tokenizer, text)
    if total <= max_tokens:
        return text, 0
    ctx_ids = tokenizer(prompt.context, add_special_tokens=False)["input_ids"]
    overhead = total - len(ctx_ids) + n_tokens(tokenizer, prompt.omission)
    keep = max_tokens - overhead
    while keep > 0:
        cut = tokenizer.decode(ctx_ids[:keep]) + prompt.omission
        text = prompt.render(tokenizer, chat, cut)
        if n_tokens(tokenizer, text) <= max_tokens:  # re-tokenising at the seam can add a token
            return text, len(ctx_ids) - keep
        keep -= max(1, (n_tokens(tokenizer, text) - max_tokens))
    raise ValueError(f"{max_tokens} tokens cannot hold the instruction, demos and question without any context")


@torch.no_grad()
def generate(model, tokenizer, text: str, max_new_tokens: int, device, stop_at_newline: bool = False) -> tuple[str, int]:
    """Greedy decoding; returns (answer, prompt tokens). ``stop_at_newline`` keeps the first line."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    bos = tokenizer.bos_token_id
    if bos is not None and (ids.shape[1] == 0 or ids[0, 0].item() != bos):  # chat templates write their own
        ids = torch.cat([torch.tensor([[bos]], device=device), ids], dim=1)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=pad)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    if stop_at_newline:
        answer = answer.strip().split("\n")[0]
    return answer.strip(), ids.shape[1]
