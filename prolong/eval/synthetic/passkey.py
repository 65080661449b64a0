"""Passkey retrieval and needle-in-a-haystack, built for *our* tokenizer at exact lengths.

* Passkey (Mohtashami & Jaggi 2023), by depth: a 5-digit key at chosen depths of repeated filler
  sentences cut to an exact token length; the model completes "The pass key is". Metric: the first
  number of the answer is the key.
* Passkey as LongLoRA's passkey_retrivial.py runs it (``longlora_*``): the same sentences, the key
  at a random character position of filler sized in characters, not tokens (see below).
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
    depth: float | None  # None: a random position (LongLoRA's passkey)
    prompt: str
    answer: str


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _haystack_ids(tokenizer, haystack: str, tokens: int) -> list[int]:
    """At least ``tokens`` first tokens of the haystack, those tokenizing all of it gives (a short
    haystack repeated). A haystack corpus can be far longer than any prompt and was tokenized whole
    for every prompt: a prefix of characters holding the tokens with words to spare gives the same
    first tokens; the ones near its cut, which may differ, are dropped."""
    spare = 64
    chars = 8 * tokens + 1024
    while True:
        ids = _ids(tokenizer, haystack[:chars])
        if chars >= len(haystack):
            break
        if len(ids) >= tokens + spare:
            ids = ids[:-spare]
            break
        chars *= 2
    while len(ids) < tokens:  # repeat a short haystack
        ids = ids + ids
    return ids


def _fill(tokenizer, hay_ids: list[int], needle: str, head: str, tail: str, length: int, depth: float) -> str:
    """head + haystack (cut to fit, needle at `depth`, at a sentence end) + tail, within `length` tokens."""
    budget = length - len(_ids(tokenizer, head + tail + needle))
    if budget <= 0:
        raise ValueError(f"{length} tokens cannot hold the task's instruction, needle and question")
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
    filler = _haystack_ids(tokenizer, PASSKEY_FILLER * 4, max(lengths, default=0))
    for length in lengths:
        for depth in depths:
            for s in range(samples):
                key = str(random.Random(f"{seed}:{length}:{depth}:{s}").randint(10000, 99999))
                prompt = _fill(tokenizer, filler, PASSKEY_NEEDLE.format(key=key), PASSKEY_TASK + " ",
                               " " + PASSKEY_QUESTION, length - budget, depth)
                out.append(SyntheticExample("passkey", length, depth, prompt, key))
    return out


def needle_examples(tokenizer, haystack: str, lengths: list[int], depths: list[float], budget: int
                    ) -> list[SyntheticExample]:
    if not haystack.strip():
        raise ValueError("the haystack text is empty")
    hay_ids = _haystack_ids(tokenizer, haystack, max(lengths, default=0))
    return [SyntheticExample("needle", length, depth,
                             _fill(tokenizer, hay_ids, NEEDLE, "", NEEDLE_QUESTION, length - budget, depth),
                             NEEDLE_ANSWER)
            for length in lengths for depth in depths]


def passkey_score(prediction: str, key: str) -> float:
    """1.0 when the first number in the answer is the key."""
    numbers = re.findall(r"\d+", prediction)
    return float(bool(numbers) and numbers[0] == key)


# LongLoRA's passkey_retrivial.py (dvlab-research/LongLoRA, generate_prompt_landmark, lines 43-67):
# the task and question are PASSKEY_TASK and PASSKEY_QUESTION; its filler sentences are ours without
# the trailing space, repeated 5000 times joined by spaces; its key line is ours without the trailing space
LONGLORA_FILLER = " ".join([PASSKEY_FILLER.strip()] * 5000)
LONGLORA_KEYS = (1, 50000)  # numpy's randint(1, 50000): 1 to 49999
LONGLORA_DATASET = "passkey_longlora"


def longlora_lengths(interval: int, max_tokens: int) -> list[int]:
    """The script's test points: interval, 2·interval, ... up to max_tokens (``max_tokens // interval`` of them)."""
    return [(i + 1) * interval for i in range(max_tokens // interval)]


def longlora_filler_chars(length: int) -> int:
    """``n_garbage`` for a test point: 3.75 characters a token (LLaMA's rough ratio), rounded down to a
    multiple of 1024, as the script computes it (float floor division)."""
    return int(3.75 * length // 1024 * 1024)


def longlora_passkey_prompt(n_garbage: int, seed: int) -> tuple[str, str]:
    """The script's prompt and key for ``n_garbage`` filler characters and ``seed``: numpy's legacy
    generator (the script's ``random`` is ``numpy.random``) draws the key's character position in
    [0, n_garbage) and then the key. Both filler parts are prefixes of the same filler, as there."""
    if n_garbage > len(LONGLORA_FILLER):
        raise ValueError(f"{n_garbage} filler characters is beyond LongLoRA's {len(LONGLORA_FILLER)}")
    import numpy as np

    rng = np.random.RandomState(seed)
    prefix = int(rng.randint(0, n_garbage))
    key = int(rng.randint(*LONGLORA_KEYS))
    lines = [PASSKEY_TASK, LONGLORA_FILLER[:prefix], PASSKEY_NEEDLE.format(key=key).strip(),
             LONGLORA_FILLER[:n_garbage - prefix], PASSKEY_QUESTION]
    return "\n".join(lines), str(key)


def longlora_passkey_examples(lengths: list[int], num_tests: int, seed: int = 0) -> list[SyntheticExample]:
    """``num_tests`` prompts per test point, with seeds seed..seed+num_tests-1 at every length (the
    script: 0..num_tests-1). The length is the test point; the prompt's token count is the tokenizer's."""
    out = []
    for length in lengths:
        n_garbage = longlora_filler_chars(length)
        for t in range(num_tests):
            prompt, key = longlora_passkey_prompt(n_garbage, seed + t)
            out.append(SyntheticExample(LONGLORA_DATASET, length, None, prompt, key))
    return out


def longlora_answer_tokens(tokenizer, key: str) -> int:
    """How many tokens the script generates: the key's tokens, BOS dropped. The script drops the first
    token unconditionally (LLaMA's tokenizer always adds BOS); a tokenizer that adds none keeps them all."""
    ids = tokenizer(key)["input_ids"]
    return len(ids) - (bool(ids) and ids[0] == tokenizer.bos_token_id)


def longlora_passkey_score(prediction: str, key: str) -> float:
    """1.0 when the continuation of the key's token count is the key. The script compares those
    tokens with the key's; text is compared here so a served model (text only) is scored alike."""
    return float(prediction.strip() == key)
