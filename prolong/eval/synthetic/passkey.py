"""Passkey retrieval and needle-in-a-haystack, built for *our* tokenizer at exact lengths.

* Passkey (Mohtashami & Jaggi 2023, as LongLoRA runs it): a 5-digit key in a sea of repeated
  filler sentences; the model completes "The pass key is". Metric: the key's digits appear in the
  answer.
* Needle in a haystack (Kamradt 2023): one sentence placed at a depth of real text (a haystack
  file; the tiny recipe uses its books) and a question about it. Metric: SubEM against the key
  phrase (an offline stand-in for the original's model judge).

The haystack is cut so the whole prompt fills ``length − max_new_tokens`` tokens; the needle sits
at the chosen relative depth of the haystack, at a sentence boundary.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

PASSKEY_TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
                "I will quiz you about the important information there.")
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
PASSKEY_NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
PASSKEY_QUESTION = "What is the pass key? The pass key is"

NEEDLE = "The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day. "
NEEDLE_ANSWER = "eat a sandwich and sit in Dolores Park on a sunny day"
NEEDLE_QUESTION = ("\n\nWhat is the best thing to do in San Francisco? Answer from the text above only.\n"
                   "Answer: The best thing to do in San Francisco is")


@dataclass
class SyntheticExample:
    task: str
    length: int
    depth: float
    prompt: str
    answer: str


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _fill(tokenizer, haystack: str, needle: str, head: str, tail: str, length: int, depth: float) -> str:
    """head + haystack (cut to fit, needle at `depth`, at a sentence end) + tail, within `length` tokens."""
    budget = length - len(_ids(tokenizer, head + tail + needle))
    if budget <= 0:
        raise ValueError(f"{length} tokens cannot hold the task's instruction, needle and question")
    hay_ids = _ids(tokenizer, haystack)
    while len(hay_ids) < budget:  # repeat a short haystack
        hay_ids = hay_ids + hay_ids
    text = tokenizer.decode(hay_ids[:budget])
    cut = int(len(text) * depth)
    ends = [m.end() for m in re.finditer(r"[.!?]\s", text)]
    if ends and 0 < depth < 1:
        cut = min(ends, key=lambda e: abs(e - cut))
    prompt = head + text[:cut] + (" " if cut and not text[:cut].endswith((" ", "\n")) else "") + needle + text[cut:] + tail
    while len(_ids(tokenizer, prompt)) > length:  # decode/encode round trips can add a token or two
        text = text[:-max(1, len(text) // 200)]
        cut = min(cut, len(text))
        prompt = head + text[:cut] + " " + needle + text[cut:] + tail
    return prompt


def passkey_examples(tokenizer, lengths: list[int], depths: list[float], samples: int, budget: int,
                     seed: int) -> list[SyntheticExample]:
    out = []
    for length in lengths:
        for depth in depths:
            for s in range(samples):
                key = str(random.Random(f"{seed}:{length}:{depth}:{s}").randint(10000, 99999))
                prompt = _fill(tokenizer, PASSKEY_FILLER * 4, PASSKEY_NEEDLE.format(key=key), PASSKEY_TASK + " ",
                               " " + PASSKEY_QUESTION, length - budget, depth)
                out.append(SyntheticExample("passkey", length, depth, prompt, key))
    return out


def needle_examples(tokenizer, haystack: str, lengths: list[int], depths: list[float], budget: int
                    ) -> list[SyntheticExample]:
    if not haystack.strip():
        raise ValueError("the haystack text is empty")
    return [SyntheticExample("needle", length, depth,
                             _fill(tokenizer, haystack, NEEDLE, "", NEEDLE_QUESTION, length - budget, depth),
                             NEEDLE_ANSWER)
            for length in lengths for depth in depths]


def passkey_score(prediction: str, key: str) -> float:
    """1.0 when the first number in the answer is the key."""
    numbers = re.findall(r"\d+", prediction)
    return float(bool(numbers) and numbers[0] == key)
