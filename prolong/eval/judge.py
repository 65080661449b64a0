"""A model judge over any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, SGLang, ...).

The endpoint's base URL and model come from the recipe (``eval.judge``) or the environment; the
key is read from the environment variable the recipe names and is never logged or written. A
request that fails (network, 5xx, 429) or a reply without a parsable score is retried with
backoff; after the last try the item is recorded as *failed* — never silently scored 0.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


class JudgeError(RuntimeError):
    pass


@dataclass
class Judge:
    base_url: str
    model: str
    api_key: str | None = None
    retries: int = 3
    timeout_s: float = 120.0
    backoff_s: float = 2.0
    max_tokens: int = 1024

    @classmethod
    def from_config(cls, cfg) -> "Judge":
        base_url = cfg.base_url or os.environ.get("PROLONG_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise JudgeError("eval.judge.base_url: not set (nor PROLONG_JUDGE_BASE_URL / OPENAI_BASE_URL)")
        return cls(base_url=base_url.rstrip("/"), model=cfg.model, api_key=os.environ.get(cfg.api_key_env),
                   retries=cfg.retries, timeout_s=cfg.timeout_s, backoff_s=cfg.backoff_s)

    def complete(self, prompt: str) -> str:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}], "temperature": 0.0,
                "max_tokens": self.max_tokens}
        response = httpx.post(f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout_s)
        if response.status_code != 200:
            raise JudgeError(f"judge endpoint answered HTTP {response.status_code}")
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError("judge endpoint returned no chat completion") from None

    def score(self, prompt: str, keys: tuple[str, ...]) -> tuple[dict, str]:
        """Ask until the reply holds a JSON object with numeric ``keys``; returns (scores, raw reply)."""
        import httpx

        last = "no attempt"
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            try:
                reply = self.complete(prompt)
            except (httpx.HTTPError, JudgeError) as e:
                last = str(e) if isinstance(e, JudgeError) else f"{type(e).__name__} talking to the judge endpoint"
                log.warning("judge: attempt %d/%d failed: %s", attempt + 1, self.retries + 1, last)
                continue
            scores = parse_scores(reply, keys)
            if scores is not None:
                return scores, reply
            last = f"unparsable judgment (wanted {', '.join(keys)})"
            log.warning("judge: attempt %d/%d: %s", attempt + 1, self.retries + 1, last)
        raise JudgeError(last)


def parse_scores(reply: str, keys: tuple[str, ...]) -> dict | None:
    """The last JSON object in ``reply`` that has every key with a number (judges reason first)."""
    for match in reversed(re.findall(r"\{[^{}]*\}", reply)):
        try:
            obj = json.loads(match)
        except json.JSONDecodeError:
            continue
        if all(isinstance(obj.get(k), (int, float)) and not isinstance(obj.get(k), bool) for k in keys):
            return {k: float(obj[k]) for k in keys}
    return None


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s.strip()]


def judge_qa(judge: Judge, question: str, answers: list[str], output: str) -> dict:
    """The card's QA rubric: fluency (0/1) × correctness (0-3), as 0-100."""
    from prolong.eval.rubrics import QA_RUBRIC

    scores, _ = judge.score(QA_RUBRIC.format(question=question, correct_answers=json.dumps(answers), output=output),
                            ("fluency", "correctness"))
    return {**scores, "score": 100 * scores["fluency"] * min(scores["correctness"], 3) / 3}


def judge_summary(judge: Judge, output: str, short: str, long: str, key_points: list[str] | None = None) -> dict:
    """fluency (the card's rubric) × F1 of key-point recall and sentence precision, as 0-100."""
    from prolong.eval.rubrics import KEY_POINT_RECALL, MULTI_LEXSUM_RUBRIC, SENTENCE_PRECISION

    card, _ = judge.score(MULTI_LEXSUM_RUBRIC.format(long_expert_summary=long, short_expert_summary=short,
                                                     output=output), ("fluency", "correctness"))
    points = key_points or _sentences(short)
    sentences = _sentences(output)
    if not sentences:
        return {"fluency": card["fluency"], "recall": 0.0, "precision": 0.0, "score": 0.0,
                "card_correctness": card["correctness"]}
    found, _ = judge.score(KEY_POINT_RECALL.format(key_points="\n".join(f"- {p}" for p in points), output=output),
                           ("supported",))
    kept, _ = judge.score(SENTENCE_PRECISION.format(expert_summary=long, sentences="\n".join(f"- {s}" for s in sentences)),
                          ("supported",))
    recall = min(found["supported"], len(points)) / len(points)
    precision = min(kept["supported"], len(sentences)) / len(sentences)
    f1 = 2 * recall * precision / (recall + precision) if recall + precision else 0.0
    return {"fluency": card["fluency"], "recall": recall, "precision": precision, "f1": f1,
            "card_correctness": card["correctness"], "score": 100 * card["fluency"] * f1}
