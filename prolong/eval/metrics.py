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
    """Document ids from a re-ranking answer, as HELMET's ``parse_rankings`` reads them: brackets,
    colons and every "id" dropped, then the longest ``N > N > ...`` chain of integers, first
    occurrence kept. With no number at all the whole (cleaned) text is the one id, which matches
    no document."""
    text = re.sub(r"[\[\]:]", "", text).lower().replace("id", "")
    longest = max((m.group(0) for m in re.finditer(r"(\d+)(?:\s*>\s*(\d+))*", text)), key=len, default="")
    ranking = [n.strip() for n in longest.split(">") if n.strip().isdigit()] if longest else [text]
    return list(dict.fromkeys(ranking))


def parse_output(output: str, prefix: str = "Answer:") -> str | None:
    """HELMET's ``parse_output``: the rest of the line after ``prefix`` (case-insensitive), else the
    first line, with a repeated prefix stripped (chat models sometimes echo it)."""
    for pattern in (re.compile(f"(?:{re.escape(prefix)})(.*)(?:\n|$)", flags=re.IGNORECASE),
                    re.compile(r"(?:^)(.*)(?:\n|$)")):
        match = pattern.search(output)
        if match is not None:
            return re.sub(f"^{re.escape(prefix)}", "", match[1].strip(), flags=re.IGNORECASE).strip()
    return None
