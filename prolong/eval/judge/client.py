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
    max_tokens: int = 4096
    temperature: float = 0.1
    top_p: float = 0.9
    seed: int | None = 42
    rubrics: str = "card"  # "card" | "helmet": which wording grades QA and a summary's fluency

    @classmethod
    def from_config(cls, cfg) -> "Judge":
        base_url = cfg.base_url or os.environ.get("PROLONG_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        if not base_url:
            raise JudgeError("eval.judge.base_url: not set (nor PROLONG_JUDGE_BASE_URL / OPENAI_BASE_URL)")
        return cls(base_url=base_url.rstrip("/"), model=cfg.model, api_key=os.environ.get(cfg.api_key_env),
                   retries=cfg.retries, timeout_s=cfg.timeout_s, backoff_s=cfg.backoff_s, max_tokens=cfg.max_tokens,
                   temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed, rubrics=cfg.rubrics)

    def complete(self, prompt: str) -> str:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "temperature": self.temperature, "top_p": self.top_p, "max_tokens": self.max_tokens}
        if self.seed is not None:
            body["seed"] = self.seed
        response = httpx.post(f"{self.base_url}/chat/completions", json=body, headers=headers, timeout=self.timeout_s)
        if response.status_code != 200:
            raise JudgeError(f"judge endpoint answered HTTP {response.status_code}")
        try:
            return response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise JudgeError("judge endpoint returned no chat completion") from None

    def ask(self, prompt: str, parse, wanted: str):
        """Ask until ``parse(reply)`` gives something; returns (parsed, raw reply)."""
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
            parsed = parse(reply)
            if parsed is not None:
                return parsed, reply
            last = f"unparsable judgment (wanted {wanted})"
            log.warning("judge: attempt %d/%d: %s", attempt + 1, self.retries + 1, last)
        raise JudgeError(last)

    def score(self, prompt: str, keys: tuple[str, ...]) -> tuple[dict, str]:
        """Ask until the reply holds a JSON object with numeric ``keys``; returns (scores, raw reply)."""
        return self.ask(prompt, lambda reply: parse_scores(reply, keys), ", ".join(keys))


def _json_objects(reply: str) -> list[dict]:
    """The flat JSON objects in ``reply``, last first (judges reason before they answer)."""
    out = []
    for match in reversed(re.findall(r"\{[^{}]*\}", reply)):
        try:
            obj = json.loads(match)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def parse_scores(reply: str, keys: tuple[str, ...]) -> dict | None:
    """The last JSON object in ``reply`` that has every key with a number."""
    for obj in _json_objects(reply):
        if all(isinstance(obj.get(k), (int, float)) and not isinstance(obj.get(k), bool) for k in keys):
            return {k: float(obj[k]) for k in keys}
    return None


def parse_key_points(reply: str) -> list[str] | None:
    for obj in _json_objects(reply):
        points = obj.get("key_points")
        if isinstance(points, list) and points and all(isinstance(p, str) and p.strip() for p in points):
            return [p.strip() for p in points]
    return None


def judge_qa(judge: Judge, question: str, answers: list[str], output: str) -> dict:
    """fluency (0/1) × correctness (0-3), as 0-100: HELMET's gpt-4-score × 100/3. ``output`` is the
    parsed answer; the correct answers are written as HELMET writes them (a Python list)."""
    from prolong.eval.judge.helmet_rubrics import HELMET_QA
    from prolong.eval.judge.rubrics import QA_RUBRIC

    fields = {"question": question, "correct_answers": str(list(answers))}
    prompt = (HELMET_QA.format(parsed_output=output, **fields) if judge.rubrics == "helmet"
              else QA_RUBRIC.format(output=output, **fields))
    scores, _ = judge.score(prompt, ("fluency", "correctness"))
    return {**scores, "score": 100 * scores["fluency"] * scores["correctness"] / 3}


def judge_summary(judge: Judge, output: str, short: str, long: str, key_points: list[str]) -> dict:
    """HELMET's gpt-4-f1 as 0-100: fluency × F1 of key-point recall (the judge's count of the short
    summary's key points in the output) and precision (its count of the output's sentences that
    the long expert summary supports, over its own sentence count). Fluency comes from the card's
    rubric (which also gives ``card_correctness``) or HELMET's fluency prompt."""
    from prolong.eval.judge.helmet_rubrics import HELMET_FLUENCY, HELMET_PRECISION, HELMET_RECALL
    from prolong.eval.judge.rubrics import MULTI_LEXSUM_RUBRIC

    output = output.strip()
    if judge.rubrics == "helmet":
        fluency, _ = judge.score(HELMET_FLUENCY.format(text=output), ("fluency",))
    else:
        fluency, _ = judge.score(MULTI_LEXSUM_RUBRIC.format(long_expert_summary=long, short_expert_summary=short,
                                                            output=output), ("fluency", "correctness"))
    found, _ = judge.score(HELMET_RECALL.format(keypoints="\n".join(f"{i + 1}. {p}" for i, p in enumerate(key_points)),
                                                summary=output), ("recall",))
    kept, _ = judge.score(HELMET_PRECISION.format(expert_summary=long, summary=output), ("precision", "sentence_count"))
    recall = found["recall"] / len(key_points) if key_points else 0.0
    precision = kept["precision"] / kept["sentence_count"] if kept["sentence_count"] > 0 else 0.0
    f1 = fluency["fluency"] * 2 * recall * precision / (recall + precision) if recall + precision > 0 else 0.0
    out = {"fluency": fluency["fluency"], "recall": recall, "precision": precision, "f1": f1, "score": 100 * f1}
    if "correctness" in fluency:
        out["card_correctness"] = fluency["correctness"]
    return out


def extract_key_points(judge: Judge, summary: str) -> list[str]:
    """Key points of an expert summary, from the judge (for cases HELMET's release has none for)."""
    from prolong.eval.judge.helmet_rubrics import KEY_POINTS

    points, _ = judge.ask(KEY_POINTS.format(summary=summary.strip()), parse_key_points, "key_points")
    return points
