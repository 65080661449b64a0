"""HELMET's RAG, re-rank, ICL, long-document QA and summarisation tasks, read from its data files.

Users download HELMET's released data once (``bash scripts/download_data.sh`` in HELMET gives a
``data/`` folder) and point ``eval.helmet.data_dir`` at it — a local folder or any fsspec URL
(``s3://``). The layout this module reads (one JSONL file per dataset and length):

    kilt/{nq,hotpotqa,popqa}-{length}.jsonl        question, answers[], ctxs[{title, text}]
    kilt/{nq,hotpotqa,popqa}-demos.jsonl           the same fields (demonstrations)
    msmarco/rerank-{length}.jsonl                  query, qid, ctxs[{id, title?, text, label}]
    msmarco/rerank-demos.jsonl
    icl/{trec_coarse,...}-train.jsonl, -test.jsonl  text, label (a class name)
    narrativeqa/test.jsonl                         context, question, answers[]
    multi_lexsum/test.jsonl                        context, summary_short, summary_long

The number of retrieved passages that fills a length differs by tokenizer, so files are named by
the length they were built for (HELMET's own files are named by their passage count ``k``: rename
or link them per length); ``length`` is always enforced again here by cutting the context from its
end (``prolong.eval.prompts.fit``).
"""

from __future__ import annotations

import json
import random
from collections import defaultdict
from dataclasses import dataclass, field

from prolong.errors import DataError, StoreError
from prolong.eval.prompts import Prompt

RAG_TEMPLATE = ("Use the given documents to write a concise and short answer to the question. Write your answer "
                "in the following format:\nAnswer: [answer]\n\n{demos}{context}\n\nQuestion: {question}")
RAG_PASSAGE = "Document (Title: {title}): {text}"
RAG_DEMO = "{documents}\n\nQuestion: {question}\nAnswer: {answer}"

RERANK_TEMPLATE = ("You are provided with a list of documents, each indicated by their ID. Rank each document "
                   "based on their relevance to the question in descending order from most relelvant to least "
                   "relevant texts. Include all documents in the rankings. Write your answer using the unique IDs, "
                   "with the following format:\nRanking: ID3 > ID1 > ID2\n\n{demos}{context}\n\nQuery: {question}")
RERANK_PASSAGE = "[ID: {id}] Document (Title: {title}): {text}"
RERANK_PASSAGE_NO_TITLE = "[ID: {id}] Document: {text}"
RERANK_DEMO = "{documents}\n\nQuery: {question}\nRanking: {answer}"

ICL_TEMPLATE = ("Use the provided mapping from the text to label to assign a label to the text. Only output "
                "\"label: {{label}}\" and nothing else. \n\n{context}\n\n{question}")
ICL_DEMO = "{text}\nlabel: {label}"

NARRATIVEQA_TEMPLATE = ("You are given a story, which can be either a novel or a movie script, and a question. "
                        "Answer the question as concisely as you can, using a single phrase if possible.\n\n"
                        "{context}\n\nQuestion: {question}")
MULTI_LEXSUM_TEMPLATE = ("You are given the legal documents in a civil rights lawsuit, and you are tasked to "
                         "summarize the case. Write a concise summary of one paragraph (200 to 250 words). The "
                         "summary should contain a short description of the background, the parties involved, and "
                         "the outcomes of the case.\n\n{context}\n\nNow please summarize the case.")
OMISSION = "\n[... the rest of the document is omitted ...]"

RAG_DATASETS = ("nq", "hotpotqa", "popqa")
ICL_DATASETS = ("trec_coarse", "trec_fine", "banking77", "clinc150", "nlu")
# generation budgets (HELMET's generation_max_length per task)
MAX_NEW_TOKENS = {"rag": 20, "rerank": 200, "icl": 20, "narrativeqa": 100, "multi_lexsum": 400}


@dataclass
class HelmetItem:
    dataset: str
    kind: str  # rag | rerank | icl | narrativeqa | multi_lexsum
    length: int
    prompt: Prompt
    answers: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    @property
    def max_new_tokens(self) -> int:
        return MAX_NEW_TOKENS[self.kind]


class HelmetData:
    """Reads JSONL files under ``data_dir`` (a folder or URL, through ``prolong.store.Store``)."""

    def __init__(self, data_dir: str):
        from prolong import assets
        from prolong.store import Store

        self.store = Store(assets.resolve(data_dir))

    def rows(self, rel: str) -> list[dict]:
        try:
            text = self.store.read_text(rel)
        except StoreError as e:
            raise DataError(f"eval.helmet.data_dir: {e} (download HELMET's data once; see the README)") from None
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise DataError(f"{self.store.uri(rel)}: line {n} is not JSON") from None
        if not rows:
            raise DataError(f"{self.store.uri(rel)}: no rows")
        return rows


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: a row has no {', '.join(missing)} field")


def rag_items(data: HelmetData, dataset: str, length: int, max_items: int, shots: int = 2) -> list[HelmetItem]:
    where = f"kilt/{dataset}-{length}.jsonl"
    rows = data.rows(where)[:max_items]
    demo_rows = data.rows(f"kilt/{dataset}-demos.jsonl")
    demos = "".join(RAG_DEMO.format(documents="\n\n".join(RAG_PASSAGE.format(**c) for c in d["ctxs"][:3]),
                                    question=d["question"], answer=d["answers"][0]) + "\n\n"
                    for d in demo_rows[:shots])
    items = []
    for row in rows:
        _need(row, ("question", "answers", "ctxs"), where)
        context = "\n\n".join(RAG_PASSAGE.format(title=c.get("title", ""), text=c["text"]) for c in row["ctxs"])
        items.append(HelmetItem(dataset, "rag", length, Prompt(RAG_TEMPLATE, context,
                                                               {"demos": demos, "question": row["question"]}, "Answer:"),
                                answers=list(row["answers"])))
    return items


def _rerank_passage(c: dict) -> str:
    return (RERANK_PASSAGE if c.get("title") else RERANK_PASSAGE_NO_TITLE).format(**c)


def rerank_items(data: HelmetData, length: int, max_items: int, shots: int = 2) -> list[HelmetItem]:
    where = f"msmarco/rerank-{length}.jsonl"
    rows = data.rows(where)[:max_items]
    demos = ""
    for d in data.rows("msmarco/rerank-demos.jsonl")[:shots]:
        ranked = sorted(d["ctxs"], key=lambda c: -c.get("label", 0))
        demos += RERANK_DEMO.format(documents="\n\n".join(_rerank_passage(c) for c in d["ctxs"]), question=d["query"],
                                    answer=" > ".join(str(c["id"]) for c in ranked)) + "\n\n"
    items = []
    for row in rows:
        _need(row, ("query", "ctxs"), where)
        context = "\n\n".join(_rerank_passage(c) for c in row["ctxs"])
        qrels = {str(c["id"]): int(c.get("label", 0)) for c in row["ctxs"]}
        items.append(HelmetItem("msmarco", "rerank", length,
                                Prompt(RERANK_TEMPLATE, context, {"demos": demos, "question": row["query"]}, "Ranking:"),
                                meta={"qrels": qrels, "qid": row.get("qid")}))
    return items


def icl_items(data: HelmetData, dataset: str, length: int, max_items: int, seed: int) -> list[HelmetItem]:
    """Many-shot ICL (Bertsch et al. 2024, as HELMET runs it): class-balanced demos, as many rounds
    as the length holds (cut by ``fit``), and class names replaced by numbers, shuffled per item with
    a seeded RNG so the model must learn the mapping from the demos."""
    train, test = data.rows(f"icl/{dataset}-train.jsonl"), data.rows(f"icl/{dataset}-test.jsonl")
    for r in train[:1] + test[:1]:
        _need(r, ("text", "label"), f"icl/{dataset}")
    by_label = defaultdict(list)
    for r in train:
        by_label[str(r["label"])].append(r["text"])
    labels = sorted(by_label)
    items = []
    for i, row in enumerate(test[:max_items]):
        rng = random.Random(f"{seed}:{dataset}:{length}:{i}")
        numbers = list(range(len(labels)))
        rng.shuffle(numbers)
        mapping = dict(zip(labels, numbers))
        pools = {lab: rng.sample(texts, len(texts)) for lab, texts in by_label.items()}
        demos, rounds = [], max(len(p) for p in pools.values())
        for k in range(rounds):  # one demo per class per round: balanced however far the cut goes
            batch = [(pools[lab][k], mapping[lab]) for lab in labels if k < len(pools[lab])]
            rng.shuffle(batch)
            demos += [ICL_DEMO.format(text=t, label=m) for t, m in batch]
        gold = str(row["label"])
        if gold not in mapping:
            raise DataError(f"icl/{dataset}-test.jsonl: label {gold!r} never appears in the training file")
        items.append(HelmetItem(dataset, "icl", length, Prompt(ICL_TEMPLATE, "\n\n".join(demos),
                                                               {"question": row["text"]}, "label:"),
                                answers=[str(mapping[gold])]))
    return items


def narrativeqa_items(data: HelmetData, length: int, max_items: int) -> list[HelmetItem]:
    where = "narrativeqa/test.jsonl"
    items = []
    for row in data.rows(where)[:max_items]:
        _need(row, ("context", "question", "answers"), where)
        items.append(HelmetItem("narrativeqa", "narrativeqa", length,
                                Prompt(NARRATIVEQA_TEMPLATE, row["context"], {"question": row["question"]}, "Answer:",
                                       omission=OMISSION), answers=list(row["answers"]),
                                meta={"question": row["question"]}))
    return items


def multi_lexsum_items(data: HelmetData, length: int, max_items: int) -> list[HelmetItem]:
    where = "multi_lexsum/test.jsonl"
    items = []
    for row in data.rows(where)[:max_items]:
        _need(row, ("context", "summary_short"), where)
        items.append(HelmetItem("multi_lexsum", "multi_lexsum", length,
                                Prompt(MULTI_LEXSUM_TEMPLATE, row["context"], {}, "Summary:", omission=OMISSION),
                                answers=[row["summary_short"]],
                                meta={"summary_long": row.get("summary_long", row["summary_short"])}))
    return items


def build_items(data: HelmetData, datasets: list[str], lengths: list[int], max_items: int, seed: int) -> list[HelmetItem]:
    items = []
    for length in lengths:
        for ds in datasets:
            if ds in RAG_DATASETS:
                items += rag_items(data, ds, length, max_items)
            elif ds == "msmarco":
                items += rerank_items(data, length, max_items)
            elif ds in ICL_DATASETS:
                items += icl_items(data, ds, length, max_items, seed)
            elif ds == "narrativeqa":
                items += narrativeqa_items(data, length, max_items)
            elif ds == "multi_lexsum":
                items += multi_lexsum_items(data, length, max_items)
    return items
