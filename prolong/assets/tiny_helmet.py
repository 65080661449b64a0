"""``builtin:tiny-helmet``: small files in the layout ``prolong.eval.helmet`` reads, made offline from
the Python standard library's documentation (the tiny corpus), so the tiny recipe runs every
HELMET category end to end. The tasks are real (retrieve, rank, classify, answer, summarise from
the given text) but about Python modules, not Wikipedia or court cases; lengths 512 and 1K.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from prolong.assets.stdlib_docs import first_paragraph, module_docs, stdlib_modules

LENGTHS = (512, 1024)
# HELMET reports re-rank nDCG@10 only with at least 10 passages: the 1K files have 10
PASSAGES_PER_LENGTH = {512: 4, 1024: 10}
ICL_MODULES = ("os", "json", "random", "string", "re")


def _entries() -> list[tuple[str, str, str]]:
    """(module, qualified name, first paragraph of its doc) for documented stdlib functions."""
    out = []
    for module, path in stdlib_modules():
        _, items = module_docs(path)
        out += [(module, f"{module}.{q}", first_paragraph(doc, 300)) for q, sig, doc in items if sig and len(doc) > 60]
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build(out: Path, final: Path, deps: dict[str, Path]) -> None:
    rng = random.Random(0)
    entries = _entries()
    rng.shuffle(entries)
    for d_i, dataset in enumerate(("nq", "hotpotqa", "popqa")):
        pool = entries[d_i * 200:(d_i + 1) * 200]
        for length in LENGTHS:
            rows = []
            for i in range(6):
                gold = pool[i]
                others = rng.sample(pool[10:], PASSAGES_PER_LENGTH[length] - 1)
                ctxs = [{"title": e[1], "text": e[2]} for e in others]
                ctxs.insert(rng.randrange(len(ctxs) + 1), {"title": gold[1], "text": gold[2]})
                rows.append({"question": f"Which function is documented as: \"{gold[2].split('.')[0]}\"?",
                             "answers": [gold[1], gold[1].rsplit(".", 1)[-1]], "ctxs": ctxs})
            _write(out / "kilt" / f"{dataset}-{length}.jsonl", rows)
        _write(out / "kilt" / f"{dataset}-demos.jsonl", [
            {"question": f"Which function is documented as: \"{e[2].split('.')[0]}\"?", "answers": [e[1]],
             "ctxs": [{"title": e[1], "text": e[2]}]} for e in pool[190:194]])
    pool = entries[600:900]
    for length in LENGTHS:
        rows = []
        for i in range(4):
            gold = pool[i]
            same = [e for e in pool[10:] if e[0] == gold[0]][:2]
            rest = rng.sample([e for e in pool[10:] if e[0] != gold[0]], PASSAGES_PER_LENGTH[length] - 1 - len(same))
            ctxs = [{"id": str(1000 + j), "text": f"{e[1]}: {e[2]}", "label": 2 if e is gold else int(e[0] == gold[0])}
                    for j, e in enumerate([gold, *same, *rest])]
            rng.shuffle(ctxs)
            rows.append({"qid": str(i), "query": f"what does {gold[1]} do", "ctxs": ctxs})
        _write(out / "msmarco" / f"rerank-{length}.jsonl", rows)
    _write(out / "msmarco" / "rerank-demos.jsonl", [
        {"qid": "d0", "query": f"what does {pool[-1][1]} do",
         "ctxs": [{"id": "1", "text": f"{pool[-2][1]}: {pool[-2][2]}", "label": 0},
                  {"id": "2", "text": f"{pool[-1][1]}: {pool[-1][2]}", "label": 2}]}])
    by_module = {m: [e for e in entries if e[0] == m] for m in ICL_MODULES}
    for dataset in ("trec_coarse", "trec_fine", "banking77", "clinc150", "nlu"):
        train, test = [], []
        for module, rows in by_module.items():
            texts = [e[2].split(".")[0] for e in rows]
            train += [{"text": t, "label": module} for t in texts[:8]]
            test += [{"text": t, "label": module} for t in texts[8:10]]
        rng.shuffle(test)
        _write(out / "icl" / f"{dataset}-train.jsonl", train)
        _write(out / "icl" / f"{dataset}-test.jsonl", test[:6])
    books = [json.loads(line) for line in (deps["tiny-corpus"] / "books.jsonl").read_text().splitlines()[:60]]
    books = [b for b in books if len(b["text"]) > 3000][:8]
    qa, summ = [], []
    for b in books:
        first = b["text"].split("\n\n")
        qa.append({"context": b["text"], "question": f"What is the module {b['title']} about?",
                   "answers": [first[1] if len(first) > 1 else first[0]]})
        summ.append({"id": b["title"], "context": b["text"], "summary_short": first[1] if len(first) > 1 else first[0],
                     "summary_long": "\n\n".join(first[1:4])})
    # the first four are the test sets; the rest give HELMET's two demonstrations per prompt
    _write(out / "narrativeqa" / "test.jsonl", qa[:4])
    _write(out / "narrativeqa" / "train.jsonl", [{"question": r["question"], "answers": r["answers"]} for r in qa[4:]])
    _write(out / "multi_lexsum" / "test.jsonl", summ[:4])
    _write(out / "multi_lexsum" / "train.jsonl", [{"summary_short": r["summary_short"]} for r in summ[4:]])
