"""``builtin:tiny-corpus``: books (one manual per module), short prose and chats from the stdlib's docs."""

from __future__ import annotations

import json
import random
from pathlib import Path

from prolong.assets.stdlib_docs import first_paragraph, module_docs, stdlib_modules


def build_tiny_corpus(out: Path, final: Path, deps: dict[str, Path]) -> None:
    rng = random.Random(0)
    books, short, chat = [], [], []
    for module, path in stdlib_modules():
        mdoc, items = module_docs(path)
        sections = [f"# {module}\n\n{mdoc or ''}".rstrip()]
        for qualname, sig, doc in items:
            sections.append(f"## {module}.{qualname}{sig}\n\n{doc}")
            if "." in qualname and not sig:  # nested classes read as short articles
                short.append({"text": f"{module}.{qualname}\n\n{doc}"})
            elif not sig:
                short.append({"text": f"class {module}.{qualname}\n\n{doc}"})
            if sig and len(doc) > 40:
                chat.append({"messages": [
                    {"role": "user", "content": f"What does `{module}.{qualname}` do?"},
                    {"role": "assistant", "content": first_paragraph(doc)},
                ]})
                if rng.random() < 0.3:
                    chat[-1]["messages"] += [
                        {"role": "user", "content": "What is its signature?"},
                        {"role": "assistant", "content": f"`{qualname.rsplit('.', 1)[-1]}{sig}`"},
                    ]
        if len(sections) > 1 or mdoc:
            books.append({"text": "\n\n".join(sections), "title": module})
    from pydoc_data.topics import topics  # the Python language reference, as prose

    short.extend({"text": text.strip(), "title": name} for name, text in sorted(topics.items()))
    for name, rows in (("books", books), ("short", short), ("chat", chat)):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
