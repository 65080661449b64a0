"""HELMET's many-shot ICL, NarrativeQA and Multi-LexSum items (data.py: load_icl, load_narrativeqa,
load_multi_lexsum), from data_dir's JSONL files or from Hugging Face datasets (``eval.helmet.hf``).

ICL: as many class-balanced demonstrations as HELMET's config gives the length (its shot table,
scaled for other lengths), labels replaced by a per-example shuffle of 0..N-1, test examples
class-balanced too; every random choice is seeded from the example's text as in HELMET, so the
prompts are HELMET's when the data are. QA and Summ: two demonstrations (questions and answers /
short summaries from the train split), the document cut to ``length − 300`` (NarrativeQA) or
``length − 700`` (Multi-LexSum) tokens with HELMET's omission marker before the model's own cut.
HELMET draws those demonstrations without a seed; here they are seeded per example.
"""

from __future__ import annotations

import logging
import math
import posixpath
import random
from typing import Iterator

from prolong.errors import DataError
from prolong.eval.helmet import hf as helmet_hf
from prolong.eval.helmet.data import (HELMET_LENGTHS, ICL_DEMO, ICL_TEMPLATE, MULTI_LEXSUM_DEMO, MULTI_LEXSUM_DEMOS,
                                 MULTI_LEXSUM_SEPARATOR, MULTI_LEXSUM_TEMPLATE, NARRATIVEQA_DEMO, NARRATIVEQA_DEMOS,
                                 NARRATIVEQA_TEMPLATE, OMISSION, HelmetData, HelmetItem, hf_permutation, need,
                                 rag_items, rerank_items, text_seed)
from prolong.eval.helmet.datasets import ICL_DATASETS, RAG_DATASETS
from prolong.eval.prompts import Prompt, truncate_text

log = logging.getLogger(__name__)

# scripts/generate_configs.py: demonstrations per ICL dataset at 4K, 8K, 16K, 32K, 64K, 128K
ICL_SHOTS = {"trec_coarse": (200, 400, 800, 1600, 3300, 6600), "trec_fine": (200, 400, 800, 1600, 3200, 6400),
             "banking77": (180, 360, 720, 1450, 2900, 5900), "clinc150": (220, 440, 880, 1750, 3525, 7050),
             "nlu": (250, 510, 1020, 2040, 4080, 8296)}
# tokens the document leaves to instruction, demos and answer (generate_configs.py: 200 + 100, 300 + 400)
RESERVED = {"narrativeqa": 300, "multi_lexsum": 700}
HELMET_KEY_POINTS = "multi_lexsum/multi_lexsum_val.jsonl"


def icl_shots(dataset: str, length: int) -> int:
    """HELMET's shot count for the length; other lengths scale the nearest one proportionally."""
    table = dict(zip(HELMET_LENGTHS, ICL_SHOTS[dataset]))
    if length in table:
        return table[length]
    base = min(HELMET_LENGTHS, key=lambda L: abs(math.log(L / length)))
    return max(1, round(table[base] * length / base))


def balance_labels(groups: list[list], shots: int, seed: int) -> list:
    """HELMET's ``balance_labels``: ``ceil(shots / classes)`` rounds, one example of every class per
    round (drawn without replacement while a class lasts), each round shuffled, cut to ``shots``."""
    rand = random.Random(seed)
    rounds = math.ceil(shots / len(groups))
    batches: list[list] = [[] for _ in range(rounds)]
    for samples in groups:
        picks = rand.sample(range(len(samples)), rounds % len(samples))
        while len(picks) < rounds:
            picks += rand.sample(range(len(samples)), min(rounds - len(picks), len(samples)))
        for i, j in enumerate(picks):
            batches[i].append(samples[j])
    for batch in batches:
        rand.shuffle(batch)
    return [x for batch in batches for x in batch][:shots]


def _by_label(rows: list[dict]) -> list[list[dict]]:
    groups: dict = {}
    for r in rows:  # classes in order of first appearance, as HELMET's dict of lists
        groups.setdefault(r["label"], []).append(r)
    return list(groups.values())


def _label_ids(train: list[dict], test: list[dict], n_labels: int | None,
               where: str) -> tuple[list[dict], list[dict], int]:
    """Integer labels stay (HELMET's class ids); class names become ids in sorted order."""
    labels = [r["label"] for r in train + test]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in labels):
        return train, test, max(n_labels or 0, max(labels) + 1)
    if any(isinstance(v, (dict, list)) or v is None for v in labels):
        raise DataError(f"{where}: labels must be class ids or class names")
    ids = {name: i for i, name in enumerate(sorted({str(v) for v in labels}))}
    relabel = lambda rows: [{"text": r["text"], "label": ids[str(r["label"])]} for r in rows]  # noqa: E731
    return relabel(train), relabel(test), len(ids)


def icl_items(split: tuple[list[dict], list[dict], int], dataset: str, length: int, max_items: int,
              seed: int) -> Iterator[HelmetItem]:
    """``split``: (train, test, label count) with integer labels (:meth:`Sources.icl`)."""
    train, test, n_labels = split
    if len(test) > max_items:  # HELMET: shuffle with the seed, then a class-balanced sample
        test = balance_labels(_by_label([test[i] for i in hf_permutation(len(test), seed)]), max_items, seed)
    groups, shots = _by_label(train), icl_shots(dataset, length)
    for row in test:
        local = (text_seed(row["text"]) + seed) % 2**31
        demos = balance_labels(groups, shots, local)
        mapping = list(range(n_labels))
        random.Random(local).shuffle(mapping)
        context = "\n\n".join(ICL_DEMO.format(text=d["text"], label=mapping[d["label"]]) for d in demos)
        yield HelmetItem(dataset, "icl", length, Prompt(ICL_TEMPLATE, context, {"question": row["text"]}, "label:"),
                         answers=[str(mapping[row["label"]])])


def _demo_picks(seed_text: str, seed: int, pool: int, shots: int) -> list[int]:
    return random.Random((text_seed(seed_text) + seed) % 2**31).sample(range(pool), min(shots, pool))


def narrativeqa_items(sources: "Sources", length: int) -> Iterator[HelmetItem]:
    rows, (n_demos, demo_row) = sources.narrativeqa()
    for row in rows:
        demo = ""
        if sources.hc.shots and n_demos:
            demos = [demo_row(j) for j in _demo_picks(row["question"], sources.hc.seed, n_demos, sources.hc.shots)]
            demo = NARRATIVEQA_DEMOS.format(demos="\n\n".join(
                NARRATIVEQA_DEMO.format(question=d["question"], answer=d["answers"][0]) for d in demos))
        context = sources.cut(row["context"], length - RESERVED["narrativeqa"])
        yield HelmetItem("narrativeqa", "narrativeqa", length,
                         Prompt(NARRATIVEQA_TEMPLATE, context, {"demo": demo, "question": row["question"]}, "Answer:"),
                         answers=list(row["answers"]), meta={"question": row["question"]})


def multi_lexsum_items(sources: "Sources", length: int) -> Iterator[HelmetItem]:
    rows, train = sources.multi_lexsum()
    for row in rows:
        demo = ""
        if sources.hc.shots and train:
            picks = _demo_picks(str(row.get("id") or row["summary_short"]), sources.hc.seed, len(train),
                                sources.hc.shots)
            demo = MULTI_LEXSUM_DEMOS.format(demos="\n\n".join(
                MULTI_LEXSUM_DEMO.format(summary=train[j]["summary_short"]) for j in picks))
        context = sources.cut(row["context"], length - RESERVED["multi_lexsum"])
        yield HelmetItem("multi_lexsum", "multi_lexsum", length,
                         Prompt(MULTI_LEXSUM_TEMPLATE, context, {"demo": demo}, "Summary:",
                                separator=MULTI_LEXSUM_SEPARATOR),
                         answers=[row["summary_short"]],
                         meta={"id": row.get("id"), "summary_long": row.get("summary_long") or row["summary_short"],
                               "key_points": row.get("key_points")})


class Sources:
    """Where ICL, QA and Summ rows come from (data_dir files or ``eval.helmet.hf``), read once and
    shared by every length; ``tokenizer`` counts and cuts documents as HELMET's Llama-2 one does."""

    def __init__(self, data: HelmetData, hc, tokenizer):
        self.data, self.hc, self.tokenizer = data, hc, tokenizer
        self._cache: dict = {}

    def _once(self, key: str, load):
        if key not in self._cache:
            self._cache[key] = load()
        return self._cache[key]

    def n_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])  # special tokens counted, as HELMET counts

    def cut(self, text: str, max_tokens: int) -> str:
        # lengths below HELMET's reserve (tiny test lengths) leave the cut to the prompt fit alone
        return truncate_text(self.tokenizer, text, max_tokens, OMISSION) if max_tokens > 0 else text

    def _optional(self, rel: str, why: str) -> list[dict]:
        if self.data.exists(rel):
            return self.data.rows(rel)
        if self.hc.shots:
            log.warning("eval.helmet: no %s under data_dir: %s prompts without demonstrations", rel, why)
        return []

    def icl(self, dataset: str) -> tuple[list[dict], list[dict], int]:
        def load():
            if dataset in self.hc.hf:
                train, test, n = helmet_hf.icl_rows(dataset, self.hc.hf[dataset], self.hc.seed)
                where = f"eval.helmet.hf.{dataset}"
            else:
                where = f"icl/{dataset}"
                train = self.data.rows(self.data.first([f"icl/{dataset}-train.jsonl"]))
                test = self.data.rows(self.data.first([f"icl/{dataset}-test.jsonl"]))
                n = None
                for r in train[:1] + test[:1]:
                    need(r, ("text", "label"), where)
            # class ids map through a shuffle of HELMET's label count (class names: their own count)
            return _label_ids(train, test, n or helmet_hf.ICL_COLUMNS[dataset][2], where)

        return self._once(f"icl:{dataset}", load)

    def narrativeqa(self):
        """(selected test rows, (demo count, demo row by index))."""
        def load():
            n = self.hc.max_items
            if "narrativeqa" not in self.hc.hf:
                where = self.data.first(["narrativeqa/test.jsonl"])
                rows = self.data.rows(where)[:n]
                for r in rows:
                    need(r, ("context", "question", "answers"), where)
                demos = self._optional("narrativeqa/train.jsonl", "NarrativeQA")
                return rows, (len(demos), demos.__getitem__)
            src = helmet_hf.NarrativeQA(self.hc.hf["narrativeqa"])
            # HELMET: shuffle the test set, keep stories over the minimum length, take the first n
            minimum, counts, rows = self.hc.min_context_tokens.get("narrativeqa", 0), {}, []
            for i in hf_permutation(len(src.test), self.hc.seed):
                row = src.test_row(i)
                doc = row["doc_id"] or row["context"][:256]
                if doc not in counts:
                    counts[doc] = self.n_tokens(row["context"]) if minimum else 0
                if counts[doc] >= minimum:
                    rows.append(row)
                    if len(rows) == n:
                        break
            return rows, (len(src.train), src.demo_row)

        return self._once("narrativeqa", load)

    def multi_lexsum(self) -> tuple[list[dict], list[dict]]:
        """(selected test rows with their key points where known, train short summaries)."""
        def load():
            if "multi_lexsum" in self.hc.hf:
                rows, train = helmet_hf.multi_lexsum_rows(self.hc.hf["multi_lexsum"])
                rows = self._helmet_selection(rows)
            elif self.data.exists("multi_lexsum/test.jsonl"):
                where = "multi_lexsum/test.jsonl"
                rows = self.data.rows(where)[:self.hc.max_items]
                for r in rows:
                    need(r, ("context", "summary_short"), where)
                train = self._optional("multi_lexsum/train.jsonl", "Multi-LexSum")
            else:  # HELMET's release: the validation set with its key points
                where = self.data.first(["multi_lexsum/test.jsonl", HELMET_KEY_POINTS])
                raw = self.data.rows(where)
                need(raw[0], ("id", "sources", "summary/short", "summary/long"), where)
                rows = self._helmet_selection([
                    {"id": r["id"], "context": "\n\n".join(r["sources"]), "summary_short": r["summary/short"],
                     "summary_long": r["summary/long"], "key_points": r.get("summary/short_keypoints")}
                    for r in raw if r.get("summary/short") is not None])
                train = self._optional("multi_lexsum/train.jsonl", "Multi-LexSum")
            points = self._key_points()
            for r in rows:
                if not r.get("key_points") and r.get("id") is not None:
                    r["key_points"] = points.get(str(r["id"]))
            return rows, train

        return self._once("multi_lexsum", load)

    def _helmet_selection(self, rows: list[dict]) -> list[dict]:
        """HELMET: cases of at least the minimum length, then ``max_items`` of them, seeded."""
        minimum = self.hc.min_context_tokens.get("multi_lexsum", 0)
        if minimum:
            rows = [r for r in rows if self.n_tokens(r["context"]) >= minimum]
        if len(rows) > self.hc.max_items:
            rows = [rows[i] for i in hf_permutation(len(rows), self.hc.seed)[:self.hc.max_items]]
        return rows

    def _key_points(self) -> dict[str, list[str]]:
        """Key points by case id: ``eval.helmet.key_points`` or HELMET's file under data_dir."""
        path = self.hc.key_points
        if path is None:
            if not self.data.exists(HELMET_KEY_POINTS):
                return {}
            rows, where = self.data.rows(HELMET_KEY_POINTS), HELMET_KEY_POINTS
        elif self.data.store is not None and "://" not in path and not posixpath.isabs(path):
            rows, where = self.data.rows(self.data.first([path])), path
        else:
            parent, name = posixpath.split(path)
            rows, where = HelmetData(parent or ".").rows(name), path
        out = {}
        for r in rows:
            points = r.get("summary/short_keypoints", r.get("key_points"))
            if points is None and "id" in r:
                continue  # a case without key points gets them from the judge
            if "id" not in r or not isinstance(points, list):
                raise DataError(f"eval.helmet.key_points: {where}: rows need id and summary/short_keypoints "
                                "(a list of strings)")
            out[str(r["id"])] = [str(p) for p in points]
        return out


def icl_max_items(hc) -> int:
    """HELMET tests ICL on 500 examples where the other tasks get 100: the same 5:1 by default."""
    return hc.icl_max_items or 5 * hc.max_items


def build_items(hc, lengths: list[int], tokenizer, data: HelmetData | None = None) -> Iterator[HelmetItem]:
    """Every item of ``eval.helmet`` (``hc``), lazily: one length at a time, dataset by dataset.
    ``tokenizer`` counts and cuts long documents as HELMET's Llama-2 tokenizer does."""
    data = data if data is not None else HelmetData(hc.data_dir)
    sources = Sources(data, hc, tokenizer)
    for length in lengths:
        for ds in hc.datasets:
            if ds in RAG_DATASETS:
                yield from rag_items(data, ds, length, hc.max_items, hc.seed, hc.shots)
            elif ds == "msmarco":
                yield from rerank_items(data, length, hc.max_items, hc.seed, hc.shots)
            elif ds in ICL_DATASETS:
                yield from icl_items(sources.icl(ds), ds, length, icl_max_items(hc), hc.seed)
            elif ds == "narrativeqa":
                yield from narrativeqa_items(sources, length)
            elif ds == "multi_lexsum":
                yield from multi_lexsum_items(sources, length)
