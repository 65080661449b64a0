"""tests/judge_server.py taught HELMET's judge prompts: the same real HTTP server and URL modes
(/ok, /flaky<N>, /garbage, /down), grading like a strict, literal grader:

    HELMET recall      {"recall": key points (numbered after the last "Key points:") found in the summary}
    HELMET precision   {"precision": summary sentences found in the expert summary, "sentence_count": n}
    HELMET fluency     {"fluency": 1 for a non-empty text}
    key points         {"key_points": the sentences of the summary}
    QA (card, HELMET)  correctness 3 when a correct answer (quoted either way) is in the answer

Anything else (the card's summary rubric) is graded by judge_server's own rule.
"""

from __future__ import annotations

import json
import re
import sys
from http.server import ThreadingHTTPServer

import judge_server  # tests/ is this script's folder

card_judge = judge_server.judge  # the original grader, before __main__ puts this module's in its place
norm = lambda s: " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())  # noqa: E731


def _last_quoted(prompt: str, label: str) -> str:
    i = prompt.rfind(label)
    if i < 0:
        return ""
    rest = prompt[i + len(label):]
    return rest[:rest.rfind('"')] if '"' in rest else rest


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def judge(prompt: str) -> str:
    if '{{"key_points"' in prompt or '{"key_points"' in prompt:
        out = {"key_points": sentences(_last_quoted(prompt, 'Summary: "'))}
    elif '"recall": 2}' in prompt:
        section = prompt[prompt.rfind("Key points:"):]
        points = re.findall(r"^\d+\. (.+)$", section, flags=re.M)
        summary = norm(_last_quoted(prompt, 'Summary: "'))
        out = {"recall": sum(norm(p) in summary for p in points)}
    elif '"sentence_count"' in prompt:
        expert = norm(_last_quoted(prompt[:prompt.rfind("Provided summary:")], 'Expert summary: "'))
        said = sentences(_last_quoted(prompt, 'Provided summary: "'))
        out = {"precision": sum(norm(s) in expert for s in said), "sentence_count": len(said)}
    elif "evaluate the fluency of the provided text" in prompt:
        out = {"fluency": int(bool(_last_quoted(prompt, 'Text: "').strip()))}
    elif "Correct answers:" in prompt:
        answers = prompt[prompt.rfind("Correct answers:"):prompt.rfind("Answer:")]
        refs = [norm(a or b) for a, b in re.findall(r"'([^']{3,})'|\"([^\"]{3,})\"", answers)]
        given = norm(prompt[prompt.rfind("Answer:") + len("Answer:"):])
        hit = bool(given) and any(r and r in given for r in refs)
        out = {"fluency": int(bool(given)), "correctness": 3 if hit else 0}
    else:
        return card_judge(prompt)
    return f"Compared word by word.\n{json.dumps(out)}"


if __name__ == "__main__":
    judge_server.judge = judge  # the handler looks the grader up at request time
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), judge_server.Handler)
    print("ready", flush=True)
    server.serve_forever()
