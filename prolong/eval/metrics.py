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
