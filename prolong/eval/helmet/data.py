"""HELMET's RAG, re-rank, ICL, long-document QA and summarisation tasks, built as HELMET's data.py
builds them (princeton-nlp/HELMET: load_qa, load_msmarco_rerank, load_icl, load_narrativeqa,
load_multi_lexsum), read from its data files or, for ICL, QA and Summ, through Hugging Face
``datasets`` as HELMET reads them (``eval.helmet.hf``; ``prolong.eval.helmet_hf``).

``eval.helmet.data_dir`` is a local folder or any fsspec URL (``s3://``). Each file may carry our
per-length name or the name in HELMET's release (``data/`` of its data.tar.gz, where the number of
passages ``k`` stands for the length, per HELMET's scripts/generate_configs.py); ours wins:

    ours                                    HELMET's release
    kilt/{ds}-{length}.jsonl                kilt/nq-dev-multikilt_1000_k{k}_dep6.jsonl, triviaqa-dev-…_dep6,
                                            hotpotqa-dev-…_dep3, popqa_test_1000_k{k}_dep6.jsonl
    kilt/{ds}-demos.jsonl                   kilt/nq-train-multikilt_1000_k3_dep6.jsonl, …, popqa_test_…_k3_dep6
    msmarco/rerank-{length}.jsonl           msmarco/test_reranking_data_k{k}_dep3.jsonl
    msmarco/rerank-demos.jsonl              msmarco/test_reranking_data_k10_dep3.jsonl
    icl/{ds}-train.jsonl, -test.jsonl       (HELMET reads ICL from the hub)      text, label
    narrativeqa/test.jsonl (+ train.jsonl)  (hub)       context, question, answers[] (train: demos)
    multi_lexsum/test.jsonl (+ train.jsonl) multi_lexsum/multi_lexsum_val.jsonl (id, sources,
                                            summary/short, summary/long, summary/short_keypoints)

kilt rows: question, answers[], ctxs[{title, text}] (popqa: s_pop); msmarco rows: qid, query,
ctxs[{id, title?, text, label}]. Our own NarrativeQA/Multi-LexSum exports (context, question,
answers / context, summary_short, summary_long, id?, key_points?) are taken as the selected test
set; HELMET's raw sets are filtered, shuffled and sampled as HELMET does. ``length`` is always
enforced again when prompting by cutting the context from its end (``prolong.eval.prompts.fit``).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Iterator

from prolong.errors import DataError, StoreError
from prolong.eval.metrics import rerank_cutoffs
from prolong.eval.prompts import Prompt

# ---------------------------------------------------------------- HELMET's prompts (data.py), verbatim

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
                        "{demo}{context}\n\nQuestion: {question}")
NARRATIVEQA_DEMOS = "For example:\n\n{demos}\n\nNow, use the following story to answer the question:\n\n"
NARRATIVEQA_DEMO = "Question: {question}\nAnswer: {answer}"
MULTI_LEXSUM_TEMPLATE = ("You are given the legal documents in a civil rights lawsuit, and you are tasked to "
                         "summarize the case. Write a concise summary of one paragraph (200 to 250 words). The "
                         "summary should contain a short description of the background, the parties involved, and "
                         "the outcomes of the case.\n\n{demo}Legal documents:\n{context}\n\nNow please summarize "
                         "the case.")
MULTI_LEXSUM_DEMOS = "Example summaries:\n\n{demos}\n\nNow, write a summary of the following legal documents.\n"
MULTI_LEXSUM_DEMO = "Summary: {summary}"
MULTI_LEXSUM_SEPARATOR = "\n\n"  # HELMET joins this prompt and "Summary:" with a blank line, the others with "\n"
OMISSION = " ... [the rest of the text is omitted]"  # truncate_llama2's postfix

# generation budgets (HELMET's generation_max_length per task, configs/*.yaml)
MAX_NEW_TOKENS = {"rag": 20, "rerank": 200, "icl": 20, "narrativeqa": 100, "multi_lexsum": 400}
# HELMET's stop_new_line per task (configs/*.yaml): short answers end at the first line break
STOP_AT_NEWLINE = {"rag": True, "rerank": True, "icl": True, "narrativeqa": False, "multi_lexsum": False}
# HELMET's use_chat_template for instruction-tuned models (configs/*.yaml); base models never use it
CHAT_FOR_INSTRUCT = {"rag": False, "rerank": False, "icl": False, "narrativeqa": True, "multi_lexsum": True}

# ---------------------------------------------------------------- HELMET's file names by length

# scripts/generate_configs.py: the number of passages k that fills each input length
HELMET_LENGTHS = (4096, 8192, 16384, 32768, 65536, 131072)
KILT_K = dict(zip(HELMET_LENGTHS, (20, 50, 105, 220, 440, 1000)))
MSMARCO_K = dict(zip(HELMET_LENGTHS, (14, 50, 130, 285, 600, 1000)))
HELMET_FILES = {  # dataset: (test file by k, demo file), configs/rag*.yaml and rerank*.yaml
    "nq": ("kilt/nq-dev-multikilt_1000_k{k}_dep6.jsonl", "kilt/nq-train-multikilt_1000_k3_dep6.jsonl"),
    "triviaqa": ("kilt/triviaqa-dev-multikilt_1000_k{k}_dep6.jsonl",
                 "kilt/triviaqa-train-multikilt_1000_k3_dep6.jsonl"),
    "hotpotqa": ("kilt/hotpotqa-dev-multikilt_1000_k{k}_dep3.jsonl",
                 "kilt/hotpotqa-train-multikilt_1000_k3_dep3.jsonl"),
    "popqa": ("kilt/popqa_test_1000_k{k}_dep6.jsonl", "kilt/popqa_test_1000_k3_dep6.jsonl"),
    "msmarco": ("msmarco/test_reranking_data_k{k}_dep3.jsonl", "msmarco/test_reranking_data_k10_dep3.jsonl"),
}
POPQA_MAX_POPULARITY = 1000  # HELMET's kilt_popqa_3: log10(s_pop) < 3


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

    def __init__(self, data_dir: str | None):
        from prolong import assets
        from prolong.store import Store

        self.store = Store(assets.resolve(data_dir)) if data_dir else None

    def exists(self, rel: str) -> bool:
        return self.store is not None and self.store.exists(rel)

    def first(self, candidates: list[str], note: str = "") -> str:
        """The first of ``candidates`` present under data_dir (our name, then HELMET's)."""
        for rel in candidates:
            if self.exists(rel):
                return rel
        where = self.store.uri() if self.store is not None else "(no data_dir)"
        raise DataError(f"eval.helmet.data_dir: none of {', '.join(candidates)} in {where}{note} "
                        "(download HELMET's data once; see the README)")

    def test_file(self, dataset: str, length: int) -> str:
        ours = f"msmarco/rerank-{length}.jsonl" if dataset == "msmarco" else f"kilt/{dataset}-{length}.jsonl"
        k = (MSMARCO_K if dataset == "msmarco" else KILT_K).get(length)
        if k is None:
            return self.first([ours], f"; HELMET's own files cover lengths {', '.join(map(str, HELMET_LENGTHS))}")
        return self.first([ours, HELMET_FILES[dataset][0].format(k=k)])

    def demo_file(self, dataset: str) -> str:
        ours = "msmarco/rerank-demos.jsonl" if dataset == "msmarco" else f"kilt/{dataset}-demos.jsonl"
        return self.first([ours, HELMET_FILES[dataset][1]])

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


def need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{where}: a row has no {', '.join(missing)} field")


# ---------------------------------------------------------------- HELMET's sampling, reproduced


def hf_permutation(n: int, seed: int) -> list[int]:
    """The row order ``datasets.Dataset.shuffle(seed=seed)`` gives (a PCG64 permutation)."""
    import numpy as np

    return np.random.default_rng(seed).permutation(n).tolist()


def text_seed(text: str) -> int:
    """HELMET's per-example seed: sha256 of the text, as a positive 31-bit integer."""
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest(), 16) % 2**31


def pick_demos(pool: list[dict], seed: int, key: str, shots: int) -> list[dict]:
    """HELMET's demo choice: shuffle with the example's seed, drop repeated keys, keep ``shots``."""
    seen, out = set(), []
    for i in hf_permutation(len(pool), seed):
        k = pool[i].get(key)
        if k not in seen:
            seen.add(k)
            out.append(pool[i])
            if len(out) == shots:
                break
    return out


def sample_keys(rows: list[dict], key: str, n: int, seed: int) -> set:
    """HELMET's test sample: ``n`` distinct keys drawn by ``random.sample`` from the sorted keys
    (HELMET seeds the global RNG with its seed; for RAG that holds for the first dataset of a run)."""
    keys = sorted({r[key] for r in rows})
    return set(random.Random(seed).sample(keys, min(n, len(keys))))


# ---------------------------------------------------------------- RAG and re-rank


def rag_items(data: HelmetData, dataset: str, length: int, max_items: int, seed: int = 42,
              shots: int = 2) -> Iterator[HelmetItem]:
    where = data.test_file(dataset, length)
    rows = data.rows(where)
    need(rows[0], ("question", "answers", "ctxs"), where)
    demo_rows = data.rows(data.demo_file(dataset)) if shots else []
    if dataset == "popqa":  # HELMET filters test and demo rows by popularity when s_pop is known
        rows = [r for r in rows if r.get("s_pop", 0) < POPQA_MAX_POPULARITY]
        demo_rows = [d for d in demo_rows if d.get("s_pop", 0) < POPQA_MAX_POPULARITY]
    key = "id" if "id" in rows[0] else "question"  # nq has no ids; questions are taken as unique
    keys = sample_keys(rows, key, max_items, seed)
    for row in rows:
        if row[key] not in keys:
            continue
        need(row, ("question", "answers", "ctxs"), where)
        demos = ""
        if shots:
            pool = [d for d in demo_rows if d.get(key) != row[key]] if dataset == "popqa" else demo_rows
            demos = "\n\n".join(RAG_DEMO.format(documents=_passages(RAG_PASSAGE, d["ctxs"]), question=d["question"],
                                                answer=d["answers"][0])
                                for d in pick_demos(pool, text_seed(str(row[key])), key, shots)) + "\n\n"
        yield HelmetItem(dataset, "rag", length,
                         Prompt(RAG_TEMPLATE, _passages(RAG_PASSAGE, row["ctxs"]),
                                {"demos": demos, "question": row["question"]}, "Answer:"),
                         answers=list(row["answers"]), meta={"id": row[key]})


def _passages(template: str, ctxs: list[dict]) -> str:
    return "\n\n".join(template.format(id=c.get("id"), title=c.get("title"), text=c["text"]) for c in ctxs)


def rerank_items(data: HelmetData, length: int, max_items: int, seed: int = 42, shots: int = 2) -> Iterator[HelmetItem]:
    where = data.test_file("msmarco", length)
    rows = data.rows(where)
    need(rows[0], ("query", "ctxs"), where)
    key = "qid" if "qid" in rows[0] else "query"
    keys = sample_keys(rows, key, max_items, seed)  # HELMET seeds random with its seed right here
    rows = [r for r in rows if r[key] in keys]
    # HELMET's cutoffs come from the first test example's passage count and hold for all of them
    cutoffs = rerank_cutoffs(len(rows[0].get("ctxs", []))) if rows else []
    demo_rows = data.rows(data.demo_file("msmarco")) if shots else []
    # HELMET drops demos that share a query with the test set: all at once when there are plenty
    shared = len(demo_rows) > 2 * len(rows)
    if shared:
        qids = {r.get("qid") for r in rows}
        demo_rows = [d for d in demo_rows if d.get("qid") not in qids]
    for row in rows:
        need(row, ("query", "ctxs"), where)
        template = RERANK_PASSAGE if "title" in row["ctxs"][0] else RERANK_PASSAGE_NO_TITLE
        demos = ""
        if shots:
            pool = demo_rows if shared else [d for d in demo_rows if d.get("qid") != row.get("qid")]
            for d in pick_demos(pool, text_seed(str(row.get("qid"))), "qid", shots):
                ranked = sorted(d["ctxs"], key=lambda c: int(c.get("label", 0)), reverse=True)
                demos += RERANK_DEMO.format(documents=_passages(template, d["ctxs"]), question=d["query"],
                                            answer=" > ".join(str(c["id"]) for c in ranked)) + "\n\n"
        qrels = {str(c["id"]): int(c.get("label", 0)) for c in row["ctxs"]}
        yield HelmetItem("msmarco", "rerank", length,
                         Prompt(RERANK_TEMPLATE, _passages(template, row["ctxs"]),
                                {"demos": demos, "question": row["query"]}, "Ranking:"),
                         meta={"qrels": qrels, "qid": row.get("qid"), "cutoffs": cutoffs})
