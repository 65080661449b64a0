"""A small OpenAI-compatible chat-completions server for tests (a real HTTP process on 127.0.0.1).

It judges like a strict, literal grader: it reads the rubric's JSON example to learn which scores
are wanted, then scores 1/max when the graded text contains the reference (QA answers; for
summaries, the key points or sentences quoted in the prompt), else 0. The URL path picks a
behaviour, so one server serves every test:

    /ok/v1           judgments as above
    /flaky<N>/v1     HTTP 500 for the first N requests of each distinct prompt, then /ok
    /garbage/v1      replies without any JSON
    /down/v1         HTTP 503 always

GET /requests returns how many requests arrived and which Authorization headers were sent.
"""

from __future__ import annotations

import json
import re
import sys
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SEEN: Counter = Counter()
AUTH: list[str] = []


def _between(prompt: str, start: str, end: str | None) -> str:
    i = prompt.rfind(start)
    if i < 0:
        return ""
    rest = prompt[i + len(start):]
    if end and end in rest:
        rest = rest[:rest.index(end)]
    return rest.strip()


def judge(prompt: str) -> str:
    example = re.findall(r"\{\{?(\"[a-z_]+\": ?\d+(?:, ?\"[a-z_]+\": ?\d+)*)\}?\}", prompt)
    keys = re.findall(r"\"([a-z_]+)\"", example[-1]) if example else ["score"]
    norm = lambda s: " ".join(re.sub(r"[^a-z0-9 ]", " ", s.lower()).split())  # noqa: E731
    if "Sentences:" in prompt:  # precision: are the listed sentences inside the expert summary?
        graded = norm(_between(prompt, "Expert summary:", "Sentences:"))
    else:
        graded = norm(_between(prompt, "Answer:", None) or _between(prompt, "Provided summary:", None))
    refs = [norm(r) for r in re.findall(r"\"([^\"]{3,})\"", _between(prompt, "Correct answers:", "Answer:"))]
    refs += [norm(x) for x in re.findall(r"^- (.+)$", prompt, flags=re.M)]  # key points / sentences
    hit = bool(graded) and any(r and r in graded for r in refs)
    scores = {}
    for k in keys:
        top = 3 if k == "correctness" else 1
        scores[k] = (top if hit else 0) if k != "fluency" else int(bool(graded))
    return f"The answer was compared with the references word by word.\n{json.dumps(scores)}"


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # quiet
        pass

    def _send(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._send(200, {"requests": sum(SEEN.values()), "authorization": AUTH})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        AUTH.append(self.headers.get("Authorization", ""))
        mode = self.path.strip("/").split("/")[0]
        prompt = body["messages"][-1]["content"]
        SEEN[(mode, prompt)] += 1
        if mode == "down":
            return self._send(503, {"error": "unavailable"})
        flaky = re.fullmatch(r"flaky(\d+)", mode)
        if flaky and SEEN[(mode, prompt)] <= int(flaky.group(1)):
            return self._send(500, {"error": "try again"})
        content = "I cannot grade this." if mode == "garbage" else judge(prompt)
        self._send(200, {"id": "test", "object": "chat.completion", "model": body.get("model"),
                         "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                                      "finish_reason": "stop"}]})


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
    print("ready", flush=True)
    server.serve_forever()
