"""Answer metrics, as HELMET computes them (public API: later stages and users import these)."""

from __future__ import annotations

import re
import string
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def substring_exact_match(prediction: str, answers: str | Iterable[str]) -> float:
    """1.0 if any normalised gold answer occurs inside the normalised prediction (SubEM)."""
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(prediction)
    return float(any(normalize_answer(a) in pred for a in answers if normalize_answer(a)))


def exact_match(prediction: str, answers: str | Iterable[str]) -> float:
    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: str | Iterable[str]) -> float:
    """SQuAD token F1 against the best-matching answer."""
    from collections import Counter

    if isinstance(answers, str):
        answers = [answers]
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            p, r = common / len(pred), common / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def ndcg_at_k(ranking: list[str], qrels: dict[str, int], k: int = 10) -> float:
    """nDCG@k as trec_eval's ``ndcg_cut`` computes it: gain = the qrel's relevance (linear),
    discount log2(rank + 1), ideal DCG from the qrels sorted by relevance. Documents without a qrel
    or with relevance ≤ 0 gain nothing; a repeated id counts once, at its first rank."""
    import math

    seen, dcg = set(), 0.0
    for doc in ranking:
        if doc in seen:
            continue
        seen.add(doc)
        rank = len(seen)
        if rank > k:
            break
        gain = qrels.get(doc, 0)
        if gain > 0:
            dcg += gain / math.log2(rank + 1)
    ideal = sorted((g for g in qrels.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
    return dcg / idcg if idcg else 0.0


def parse_ranking(text: str) -> list[str]:
    """Document ids from a re-ranking answer such as ``Ranking: [ID: 3] > ID1 > 2``: one id per
    ``>``-separated part (``ID``/``Ranking`` words and brackets ignored), first occurrence kept."""
    text = text.strip()
    if text.lower().startswith("ranking:"):
        text = text[len("ranking:"):]
    text = text.split("\n\n")[0]
    out, seen = [], set()
    for part in text.split(">"):
        tokens = [t for t in re.findall(r"[\w\-]+", part) if t.lower() not in ("id", "ranking")]
        if not tokens:
            continue
        doc = re.sub(r"^(?i:id)(?=\d)", "", tokens[0])  # "ID3" → "3"
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out
