"""``builtin:tiny-corpus``: books (one manual per module), short prose, chats and LongAlpaca-style QA
from the stdlib's docs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prolong.assets.stdlib_docs import first_paragraph, module_docs, stdlib_modules


# LongAlpaca-style rows: the "file" read before the question is the start of a module's manual, of
# these many characters at least / at most (300-1.1K tiny-bpe tokens, median 700): long at the tiny
# LongLoRA recipe's 1K, as LongAlpaca's papers and books are at 32K.
QA_FILE_CHARS = (1000, 2400)


def _longalpaca_rows(manuals: list[tuple[str, list[str], list[tuple[int, str, str]]]]) -> list[dict]:
    """A row per module with questions: long QA (the start of its manual, then a question the manual
    answers) and, for every fourth module, short QA (the question alone, no file), near LongAlpaca-12k's
    9k long to 3k short."""
    rows = []
    for i, (module, sections, qa) in enumerate(manuals):
        if i % 4 == 3:
            _, question, answer = qa[0]
            rows.append({"instruction": question, "output": answer, "file": None})
            continue
        ends = [sum(len(s) + 2 for s in sections[:k + 1]) - 2 for k in range(len(sections))]
        inside = [k for k in range(len(sections)) if ends[k] <= QA_FILE_CHARS[1]]
        asked = [(k, q, a) for k, q, a in qa if k in inside]
        if not inside or ends[inside[-1]] < QA_FILE_CHARS[0] or not asked:
            continue
        _, question, answer = asked[-1]
        manual = "\n\n".join(sections[:inside[-1] + 1])
        rows.append({"instruction": f"Below is the manual of the Python module `{module}`. Read it and answer the "
                                    f"question after it.\n\n{manual}\n\nNow the manual ends. {question}",
                     "output": answer, "file": f"{module}.md"})
    return rows


def build_tiny_corpus(out: Path, final: Path, deps: dict[str, Path]) -> None:
    rng = random.Random(0)
    books, short, chat, manuals = [], [], [], []
    for module, path in stdlib_modules():
        mdoc, items = module_docs(path)
        sections = [f"# {module}\n\n{mdoc or ''}".rstrip()]
        qa = []
        for qualname, sig, doc in items:
            sections.append(f"## {module}.{qualname}{sig}\n\n{doc}")
            if "." in qualname and not sig:  # nested classes read as short articles
                short.append({"text": f"{module}.{qualname}\n\n{doc}"})
            elif not sig:
                short.append({"text": f"class {module}.{qualname}\n\n{doc}"})
            if sig and len(doc) > 40:
                question, answer = f"What does `{module}.{qualname}` do?", first_paragraph(doc)
                qa.append((len(sections) - 1, question, answer))
                chat.append({"messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]})
                if rng.random() < 0.3:
                    chat[-1]["messages"] += [
                        {"role": "user", "content": "What is its signature?"},
                        {"role": "assistant", "content": f"`{qualname.rsplit('.', 1)[-1]}{sig}`"},
                    ]
        if len(sections) > 1 or mdoc:
            books.append({"text": "\n\n".join(sections), "title": module})
        if qa:
            manuals.append((module, sections, qa))
    from pydoc_data.topics import topics  # the Python language reference, as prose

    short.extend({"text": text.strip(), "title": name} for name, text in sorted(topics.items()))
    for name, rows in (("books", books), ("short", short), ("chat", chat), ("longalpaca", _longalpaca_rows(manuals))):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
