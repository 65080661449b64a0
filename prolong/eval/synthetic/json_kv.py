"""Recall — JSON KV (HELMET; Liu et al. 2024), generated offline for *our* tokenizer.

Each example is one flat JSON object of uuid4 keys and values. The number of pairs is calibrated
so that the whole prompt fills ``length − max_new_tokens`` tokens with this tokenizer; the gold key
sits at a chosen relative depth; two fresh demonstration pairs (absent from the object) precede
the question. Wording follows HELMET's prompt. Metric: SubEM, scored as HELMET scores it (:func:`score`).
"""

from __future__ import annotations

import json
import random
import uuid
from dataclasses import dataclass

from prolong.eval.metrics import parse_output, substring_exact_match
from prolong.eval.prompts import Prompt, n_tokens

USER_TEMPLATE = ("{context}\n\nExtract the value corresponding to the specified key in the JSON object below."
                 "\n\n{demos}Key: {question}")
ASSISTANT_PREFIX = "Corresponding value:"
DEMO_TEMPLATE = "Key: {key}\nCorresponding value: {value}"


@dataclass
class JsonKVExample:
    length: int
    depth: float
    num_pairs: int
    prompt: str
    answer: str
    key: str


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def render_prompt(tokenizer, pairs: list[tuple[str, str]], gold: int, demos: list[tuple[str, str]],
                  use_chat_template: bool) -> str:
    context = "JSON data:\n" + json.dumps(dict(pairs), indent=1)
    demo_text = "".join(DEMO_TEMPLATE.format(key=json.dumps(k), value=v) + "\n\n" for k, v in demos)
    return Prompt(USER_TEMPLATE, context, {"demos": demo_text, "question": json.dumps(pairs[gold][0])},
                  ASSISTANT_PREFIX).render(tokenizer, use_chat_template)


def make_example(tokenizer, length: int, depth: float, budget: int, seed: int, use_chat_template: bool) -> JsonKVExample:
    """The largest JSON object whose prompt fits `length - budget` tokens (binary search on pairs)."""
    rng = random.Random(seed)
    demos = [(_uuid(rng), _uuid(rng)) for _ in range(2)]
    pool = [(_uuid(rng), _uuid(rng)) for _ in range(max(8, length // 8))]
    target = length - budget

    def build(n: int) -> tuple[str, int]:
        gold = min(n - 1, int(round(depth * (n - 1))))
        return render_prompt(tokenizer, pool[:n], gold, demos, use_chat_template), gold

    lo, hi = 1, len(pool)
    if n_tokens(tokenizer, build(1)[0]) > target:
        raise ValueError(f"eval.json_kv.lengths: {length} tokens cannot hold even one key-value pair "
                         f"with a {budget}-token answer budget")
    while lo < hi:  # largest n with prompt tokens <= target
        mid = (lo + hi + 1) // 2
        if n_tokens(tokenizer, build(mid)[0]) <= target:
            lo = mid
        else:
            hi = mid - 1
    prompt, gold = build(lo)
    return JsonKVExample(length=length, depth=depth, num_pairs=lo, prompt=prompt, answer=pool[gold][1], key=pool[gold][0])


def make_examples(tokenizer, lengths: list[int], depths: list[float], samples_per_depth: int, budget: int,
                  seed: int, use_chat_template: bool) -> list[JsonKVExample]:
    out = []
    for length in lengths:
        for d_i, depth in enumerate(depths):
            for s in range(samples_per_depth):
                out.append(make_example(tokenizer, length, depth, budget, seed * 1_000_003 + length * 101 + d_i * 7 + s,
                                        use_chat_template))
    return out


def score(generated: str, answer: str) -> float:
    """HELMET's JSON KV metric (data.py, load_json_kv's post_process): SubEM of the raw generation
    with the prompt's prefix put back in front (eval.py does so for prompts without the chat
    template, as recall's are), or of its parse after "corresponding value:", whichever is higher."""
    output = ASSISTANT_PREFIX + generated
    return max(substring_exact_match(output, answer),
               substring_exact_match(parse_output(output, "corresponding value:"), answer))
