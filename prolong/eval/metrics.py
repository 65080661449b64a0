"""Answer metrics, as HELMET computes them (public API: later stages and users import these).

Each function follows its namesake in HELMET's utils.py (princeton-nlp/HELMET), edge cases
included; where HELMET's behaviour is odd and we keep it, a comment says so.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)
# HELMET's re-rank cutoffs (data.py load_msmarco_rerank), kept only up to the number of passages
RERANK_CUTOFFS = (1, 5, 10, 20, 50, 100, 200, 500, 1000)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def gold_answers(answers) -> list[str]:
    """The gold answers as HELMET's ``drqa_metric_max_over_ground_truths`` reads them: a string is
    one answer; when the first entry is a list, every entry is iterated one level down. HELMET's
    quirk, kept: a string beside those lists is iterated too, so ``[["a"], "cd"]`` gives "a", "c",
    "d". A list after a leading string (HELMET raises there) is flattened."""
    if isinstance(answers, str):
        return [answers]
    answers = list(answers)
    if answers and isinstance(answers[0], (list, tuple)):
        return [a for group in answers for a in group]
    return [a for entry in answers
            for a in (entry if isinstance(entry, (list, tuple)) else [entry])]


def _best(score, answers) -> float:
    # HELMET fails on no gold answer at all; no answer scores 0 here
    return max((float(score(a)) for a in gold_answers(answers)), default=0.0)


def substring_exact_match(prediction: str, answers) -> float:
    """1.0 if a normalised gold answer occurs inside the normalised prediction (SubEM). As in
    HELMET, a gold answer that normalises to "" (e.g. "The") is inside every prediction."""
    pred = normalize_answer(prediction)
    return _best(lambda a: normalize_answer(a) in pred, answers)


def exact_match(prediction: str, answers) -> float:
    pred = normalize_answer(prediction)
    return _best(lambda a: pred == normalize_answer(a), answers)


def _f1(prediction: str, answer: str) -> float:
    pred, gold = normalize_answer(prediction), normalize_answer(answer)
    # HELMET (from HotpotQA): a yes/no/noanswer prediction or gold scores only when both are equal
    if (pred in ("yes", "no", "noanswer") or gold in ("yes", "no", "noanswer")) and pred != gold:
        return 0.0
    pred_tokens, gold_tokens = pred.split(), gold.split()
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if not common:
        return 0.0
    p, r = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * p * r / (p + r)


def token_f1(prediction: str, answers) -> float:
    """SQuAD token F1 against the best-matching answer (HELMET's ``f1_score``)."""
    return _best(lambda a: _f1(prediction, a), answers)


def ndcg_at_k(ranking: list[str], qrels: dict[str, int], k: int = 10) -> float:
    """nDCG@k as trec_eval's ``ndcg_cut`` (the version pytrec_eval bundles) computes it: gain = the
    qrel's relevance (linear), discount log2(rank + 1), ideal DCG from the qrels sorted by
    relevance. Documents without a qrel or with relevance ≤ 0 gain nothing; a repeated id counts
    once, at its first rank (HELMET's ``parse_rankings`` keeps the first)."""
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


def rerank_cutoffs(n_passages: int) -> list[int]:
    """The cutoffs HELMET evaluates: its list up to the number of passages, counted on the first
    test example (data.py). With fewer than 10 passages there is no NDCG@10."""
    return [k for k in RERANK_CUTOFFS if k <= n_passages]


def rerank_ndcg(ranking: list[str], qrels: dict[str, int], cutoffs: Iterable[int]) -> dict[str, float]:
    """HELMET's ``calculate_retrieval_metrics`` for one query, nDCG part: ``{"NDCG@k": value}``
    for each cutoff, rounded to 5 decimals as HELMET rounds each example."""
    return {f"NDCG@{k}": round(ndcg_at_k(ranking, qrels, k), 5) for k in cutoffs}


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
    first line, with a repeated prefix stripped (chat models sometimes echo it). As in HELMET the
    prefix is a regular expression where it is searched for and a literal where it is stripped."""
    for pattern in (re.compile(f"(?:{prefix})(.*)(?:\n|$)", flags=re.IGNORECASE),
                    re.compile(r"(?:^)(.*)(?:\n|$)")):
        match = pattern.search(output)
        if match is not None:
            return re.sub(f"^{re.escape(prefix)}", "", match[1].strip(), flags=re.IGNORECASE).strip()
    return None
