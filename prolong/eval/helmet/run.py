"""Running and scoring HELMET's tasks on a model, as HELMET's eval.py and scripts do.

Prompts: plain for RAG, re-rank and ICL, the chat template for QA and Summ when the model is the
instruction-tuned one (HELMET's configs; ``eval.helmet.use_chat_template`` forces either way).
Greedy decoding within ``length``; RAG, re-rank and ICL stop at a line break. Without a chat
template the prompt ends in the assistant prefix ("Answer:"), which HELMET puts back in front of
the output before parsing. Scores (0-100): RAG SubEM (the better of the output and its parsed
answer), ICL exact match of the parsed label, re-rank nDCG@10 (none when the passages are fewer than
10, as in HELMET), QA and Summ by the judge — a judge failure marks the item failed, never 0.
"""

from __future__ import annotations

import time
from typing import Callable

from prolong.errors import ConfigError
from prolong.eval.helmet import data as helmet
from prolong.eval.helmet.tasks import build_items
from prolong.eval.judge.client import Judge, JudgeError, extract_key_points, judge_qa, judge_summary
from prolong.eval.metrics import (exact_match, parse_output, parse_ranking, rerank_cutoffs, rerank_ndcg,
                                  substring_exact_match, token_f1)
from prolong.eval.prompts import GenerationFailed, fit


def truncation_tokenizer(hc, tok):
    """The tokenizer HELMET's document cut counts with (``eval.helmet.truncation_tokenizer``)."""
    if hc.truncation_tokenizer is None:
        return tok
    from transformers import AutoTokenizer

    from prolong import assets

    try:
        out = AutoTokenizer.from_pretrained(assets.resolve(hc.truncation_tokenizer))
    except Exception as e:  # hub, network and format errors come in many types
        raise ConfigError(f"eval.helmet.truncation_tokenizer: cannot load {hc.truncation_tokenizer!r} "
                          f"({type(e).__name__}: {e})") from None
    out.model_max_length = 1 << 62  # whole books are counted, never cut by the tokenizer
    return out


def score_item(item: helmet.HelmetItem, output: str, judge: Judge | None, key_points: dict) -> dict:
    """One item's metrics from its ``output`` (the generation, after the prefix when one was
    prompted). ``key_points`` caches judge-made key points by case across lengths."""
    answers = item.answers
    if item.kind == "rag":  # HELMET's default_post_process: the better of the output and its parse
        parsed = parse_output(output)
        best = max(substring_exact_match(output, answers),
                   substring_exact_match(parsed, answers) if parsed is not None else 0.0)
        return {"parsed": parsed, "score": 100 * best}
    if item.kind == "icl":
        parsed = parse_output(output, "label:")
        return {"parsed": parsed, "score": 100 * exact_match(parsed or "", answers)}
    if item.kind == "rerank":
        ranking, qrels = parse_ranking(output), item.meta["qrels"]
        cutoffs = item.meta["cutoffs"] if "cutoffs" in item.meta else rerank_cutoffs(len(qrels))
        ndcg = rerank_ndcg(ranking, qrels, cutoffs)
        # HELMET reports NDCG@10 only when the passages reach 10: otherwise no score, never 0
        score = 100 * ndcg["NDCG@10"] if "NDCG@10" in ndcg else None
        return {"score": score, "ndcg": ndcg, "ranking": ranking[:10]}
    parsed = parse_output(output, "Answer:" if item.kind == "narrativeqa" else "Summary:")
    f1 = max(token_f1(output, answers), token_f1(parsed, answers) if parsed is not None else 0.0)
    auto = {"token_f1": 100 * f1}
    if item.kind == "narrativeqa":  # eval_gpt4_longqa.py judges the answer after "Answer:", on one line
        parsed = parse_output(output.replace("\n", " ")) or ""
        auto["parsed"] = parsed
    if judge is None:
        return {**auto, "unscored": "no judge endpoint (eval.judge)"}
    try:
        if item.kind == "narrativeqa":
            return {**auto, **judge_qa(judge, item.meta["question"], answers, parsed)}
        points, source = item.meta.get("key_points"), "released"
        if not points:
            case = str(item.meta.get("id") or answers[0])
            if case not in key_points:
                key_points[case] = extract_key_points(judge, answers[0])
            points, source = key_points[case], "judge"
        return {**auto, "key_points": points, "key_points_from": source,
                **judge_summary(judge, output, answers[0], item.meta["summary_long"], points)}
    except JudgeError as e:
        return {**auto, "failed": True, "error": str(e)}


def run_helmet(cfg, gen, tok, instruct: bool, on_item: Callable[[str, int], None] | None = None) -> list[dict]:
    """Every ``eval.helmet`` item through the generator ``gen`` (prolong.eval.prompts: the model here,
    or a server); ``instruct``: the model is instruction-tuned. ``on_item(dataset, length)`` hears of
    each item before it runs; a generation that fails makes a failed item."""
    hc = cfg.helmet
    judge = Judge.from_config(cfg.judge) if cfg.judge is not None else None
    made_key_points: dict = {}
    rows = []
    for it in build_items(hc, cfg.lengths_of(hc), truncation_tokenizer(hc, tok)):
        if on_item is not None:
            on_item(it.dataset, it.length)
        chat = instruct and helmet.CHAT_FOR_INSTRUCT[it.kind] if hc.use_chat_template is None else hc.use_chat_template
        chat = bool(chat and getattr(tok, "chat_template", None))  # without a template the prompt is plain
        budget = hc.max_new_tokens.get(it.kind, it.max_new_tokens)
        text, cut = fit(it.prompt, tok, it.length - budget, chat)
        t0 = time.perf_counter()
        try:  # tokenised as fit counted it: a plain prompt with the tokenizer's own special tokens (HELMET)
            pred, n = gen(text, budget, stop_at_newline=helmet.STOP_AT_NEWLINE[it.kind], add_bos=False,
                          special_tokens=not chat)
        except GenerationFailed as e:
            rows.append({"dataset": it.dataset, "length": it.length, "context_tokens_cut": cut, "failed": True,
                         "error": str(e), "answers": it.answers})
            continue
        secs = time.perf_counter() - t0
        output = pred if chat else it.prompt.assistant_prefix + pred
        rows.append({"dataset": it.dataset, "length": it.length, "input_tokens": n, "context_tokens_cut": cut,
                     "chat_template": chat, "answers": it.answers, "prediction": pred, "seconds": secs,
                     **score_item(it, output, judge, made_key_points)})
    return rows
