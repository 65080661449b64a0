"""Evaluation: metrics by hand, prompt fitting, HELMET loaders on small files, the judge against a
real local HTTP server, synthetic tasks, perplexity and the aggregation to categories."""

import json
import logging
import subprocess
import sys

import pytest
import torch

from prolong.config import JudgeConfig
from prolong.errors import DataError
from prolong.eval import helmet, report, synthetic
from prolong.eval.judge import Judge, JudgeError, judge_qa, judge_summary, parse_scores
from prolong.eval.json_kv import make_example
from prolong.eval.metrics import (exact_match, ndcg_at_k, normalize_answer, parse_ranking, substring_exact_match,
                                  token_f1)
from prolong.eval.perplexity import long_document_loss
from prolong.eval.prompts import Prompt, fit, n_tokens
from tests.conftest import ROOT, free_port


@pytest.fixture(scope="module")
def tok(prolong_home):
    from transformers import AutoTokenizer

    from prolong import assets

    return AutoTokenizer.from_pretrained(assets.resolve("builtin:tiny-llama"))


@pytest.fixture(scope="module")
def tiny_lm(prolong_home):
    from transformers import AutoModelForCausalLM

    from prolong import assets

    return AutoModelForCausalLM.from_pretrained(assets.resolve("builtin:tiny-llama")).eval()


# ---------------------------------------------------------------- metrics, by hand


def test_normalize_and_substring_exact_match():
    assert normalize_answer("The  North-Pole!") == "northpole"
    assert substring_exact_match("They headed for the North Pole.", ["north pole", "Arctic"]) == 1.0
    assert substring_exact_match("South", ["north pole"]) == 0.0
    assert substring_exact_match("anything", [""]) == 0.0  # an empty gold answer matches nothing
    assert exact_match("the Arctic", "arctic") == 1.0


def test_token_f1():
    # pred {north, pole, today}, gold {north, pole}: P 2/3, R 1 → F1 0.8
    assert token_f1("north pole today", ["the north pole"]) == pytest.approx(0.8)
    assert token_f1("x", ["y"]) == 0.0


def test_parse_ranking():
    assert parse_ranking("Ranking: [ID: 3] > ID1 > 2 > 3") == ["3", "1", "2"]
    assert parse_ranking("7205 > 1001\n\nsome explanation > 9") == ["7205", "1001"]
    assert parse_ranking("no ranking here") == ["no"]  # one id-like token per part; scored 0 by nDCG
    assert parse_ranking("") == []


def test_ndcg_at_10_is_trec_evals():
    qrels = {"a": 1, "c": 2, "z": 1}
    # DCG: a@1 1/log2(2) + c@3 2/log2(4) = 2; IDCG: 2 + 1/log2(3) + 1/log2(4) = 3.1309
    assert ndcg_at_k(["a", "b", "c"], qrels) == pytest.approx(2 / (2 + 1 / 1.5849625 + 0.5), rel=1e-6)
    assert ndcg_at_k(["c", "a", "z"], qrels) == pytest.approx(1.0)
    assert ndcg_at_k(["b"] * 3 + ["a"], qrels, k=1) == 0.0
    assert ndcg_at_k(["a", "a", "c"], qrels) == ndcg_at_k(["a", "c"], qrels)  # repeats count once
    assert ndcg_at_k(["a"], {"a": 0}) == 0.0


# ---------------------------------------------------------------- prompts


def test_fit_cuts_the_context_from_its_end_and_keeps_instruction_and_question(tok):
    context = " ".join(f"word{i}" for i in range(400))
    p = Prompt("Read this.\n\n{context}\n\nQuestion: {question}", context, {"question": "which word?"}, "Answer:",
               omission=" [...]")
    text, cut = fit(p, tok, 120, chat=False)
    assert n_tokens(tok, text) <= 120 and cut > 0
    assert text.startswith("Read this.\n\nword0 word1") and text.endswith("Question: which word?\nAnswer:")
    assert " [...]" in text and "word399" not in text
    with pytest.raises(ValueError, match="without any context"):
        fit(p, tok, 5, chat=False)


def test_json_kv_fills_the_length_and_puts_the_gold_key_at_its_depth(tok):
    a = make_example(tok, 1024, 0.0, 41, seed=3, use_chat_template=False)
    b = make_example(tok, 1024, 1.0, 41, seed=3, use_chat_template=False)
    assert 1024 - 41 - 60 < n_tokens(tok, a.prompt) <= 1024 - 41
    body = a.prompt.split("JSON data:\n")[1]
    assert body.index(a.key) < body.index(b.key)  # depth 0 first, depth 1 last
    assert "Extract the value corresponding to the specified key in the JSON object below." in a.prompt
    assert a.prompt.endswith("Corresponding value:") and a == make_example(tok, 1024, 0.0, 41, 3, False)


# ---------------------------------------------------------------- HELMET loaders on files made here


def write(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture
def helmet_dir(tmp_path):
    d = tmp_path / "helmet"
    ctx = [{"title": f"T{i}", "text": f"passage {i}"} for i in range(5)]
    write(d / "kilt/nq-256.jsonl", [{"question": "who?", "answers": ["Ann"], "ctxs": ctx}])
    write(d / "kilt/nq-demos.jsonl", [{"question": "what?", "answers": ["X"], "ctxs": ctx[:2]}] * 3)
    write(d / "msmarco/rerank-256.jsonl", [{"qid": "1", "query": "q", "ctxs": [
        {"id": "11", "text": "a", "label": 2}, {"id": "12", "text": "b", "label": 0}]}])
    write(d / "msmarco/rerank-demos.jsonl", [{"qid": "0", "query": "d", "ctxs": [{"id": "5", "text": "c", "label": 1}]}])
    write(d / "icl/nlu-train.jsonl", [{"text": f"{lab} text {i}", "label": lab} for lab in "abc" for i in range(4)])
    write(d / "icl/nlu-test.jsonl", [{"text": "query", "label": "b"}] * 8)
    write(d / "narrativeqa/test.jsonl", [{"context": "story " * 300, "question": "who?", "answers": ["the fox"]}])
    write(d / "multi_lexsum/test.jsonl", [{"context": "case " * 300, "summary_short": "The court ruled for Ann.",
                                           "summary_long": "Ann sued. The court ruled for Ann."}])
    return str(d)


def test_rag_and_rerank_items_follow_helmets_templates(helmet_dir):
    data = helmet.HelmetData(helmet_dir)
    (rag,) = helmet.rag_items(data, "nq", 256, 10)
    text = rag.prompt.render(None, chat=False)
    assert text.startswith("Use the given documents to write a concise and short answer to the question.")
    assert "Document (Title: T0): passage 0" in text and text.endswith("Question: who?\nAnswer:")
    assert text.count("Question: what?\nAnswer: X") == 2  # two demos
    (rr,) = helmet.rerank_items(data, 256, 10)
    assert rr.meta["qrels"] == {"11": 2, "12": 0} and "[ID: 11] Document: a" in rr.prompt.context


def test_icl_labels_are_numbers_shuffled_per_item_and_demos_are_balanced(helmet_dir):
    items = helmet.icl_items(helmet.HelmetData(helmet_dir), "nlu", 256, 8, seed=1)
    demos = items[0].prompt.context.split("\n\n")
    assert len(demos) == 12 and {d.split("label: ")[1] for d in demos} == {"0", "1", "2"}
    first_round = [d.split("label: ")[1] for d in demos[:3]]
    assert sorted(first_round) == ["0", "1", "2"]  # one demo per class per round
    mappings = {it.answers[0] for it in items}  # the label "b" gets a different number across items
    assert len(mappings) > 1
    assert items[0].answers == [next(d.split("label: ")[1] for d in demos if d.startswith("b text"))]
    assert items == helmet.icl_items(helmet.HelmetData(helmet_dir), "nlu", 256, 8, seed=1)


def test_missing_files_and_fields_are_one_line_errors(helmet_dir, tmp_path):
    with pytest.raises(DataError, match=r"eval.helmet.data_dir: .*kilt/popqa-256.jsonl: not found"):
        helmet.rag_items(helmet.HelmetData(helmet_dir), "popqa", 256, 1)
    write(tmp_path / "bad/narrativeqa/test.jsonl", [{"context": "c", "question": "q"}])
    with pytest.raises(DataError, match="narrativeqa/test.jsonl: a row has no answers field"):
        helmet.narrativeqa_items(helmet.HelmetData(str(tmp_path / "bad")), 256, 1)


# ---------------------------------------------------------------- the judge, over real HTTP


@pytest.fixture(scope="module")
def judge_url():
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "judge_server.py"), str(port)],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


def make_judge(url: str, mode: str, monkeypatch, retries: int = 2) -> Judge:
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    return Judge.from_config(JudgeConfig(base_url=f"{url}/{mode}/v1", model="judge", api_key_env="TEST_JUDGE_KEY",
                                         retries=retries, backoff_s=0))


def test_the_qa_rubric_scores_fluency_times_correctness(judge_url, monkeypatch, caplog):
    judge = make_judge(judge_url, "ok", monkeypatch)
    with caplog.at_level(logging.DEBUG):
        good = judge_qa(judge, "Where are they headed?", ["the North Pole"], "They are headed for the North Pole.")
        bad = judge_qa(judge, "Where are they headed?", ["the North Pole"], "To Paris.")
    assert good["score"] == 100 and good["fluency"] == 1 and bad["score"] == 0
    import httpx

    seen = httpx.get(f"{judge_url}/requests").json()
    assert "Bearer sk-secret-123" in seen["authorization"]  # sent to the endpoint ...
    assert "sk-secret-123" not in caplog.text  # ... never logged


def test_the_summary_score_is_fluency_times_f1_of_recall_and_precision(judge_url, monkeypatch):
    judge = make_judge(judge_url, "ok", monkeypatch)
    s = judge_summary(judge, "The court ruled for Ann. Bananas are yellow.", short="The court ruled for Ann.",
                      long="Ann sued. The court ruled for Ann.", key_points=["the court ruled for Ann", "Ann sued"])
    # the test server counts one supported item per check: recall 1/2, precision 1/2 → F1 0.5
    assert s["recall"] == 0.5 and s["precision"] == 0.5 and s["score"] == pytest.approx(50)


def test_a_flaky_endpoint_is_retried(judge_url, monkeypatch):
    judge = make_judge(judge_url, "flaky2", monkeypatch, retries=2)
    assert judge_qa(judge, "q?", ["yes"], "yes")["score"] == 100


@pytest.mark.parametrize("mode,error", [("garbage", "unparsable judgment"), ("down", "HTTP 503")])
def test_a_failing_judge_raises_after_its_retries(judge_url, monkeypatch, mode, error):
    judge = make_judge(judge_url, mode, monkeypatch, retries=1)
    with pytest.raises(JudgeError, match=error):
        judge_qa(judge, "q?", ["yes"], "yes")


def test_parse_scores_takes_the_last_complete_json_object():
    assert parse_scores('reasoning {"fluency": 1} ... {"fluency": 1, "correctness": 2}', ("fluency", "correctness")) \
        == {"fluency": 1.0, "correctness": 2.0}
    assert parse_scores('{"fluency": "high"}', ("fluency",)) is None


def test_helmet_tasks_run_on_a_model_and_judge_failures_become_failed_items(helmet_dir, tiny_lm, tok, judge_url,
                                                                            monkeypatch):
    from prolong.config import EvalConfig
    from prolong.eval.main import run_helmet

    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    cfg = EvalConfig(lengths=[256], helmet={"data_dir": helmet_dir, "max_items": 1,
                                            "datasets": ["nq", "msmarco", "nlu", "narrativeqa", "multi_lexsum"],
                                            "max_new_tokens": {"multi_lexsum": 20, "rerank": 20}},
                     judge={"base_url": f"{judge_url}/down/v1", "api_key_env": "TEST_JUDGE_KEY", "retries": 0,
                            "backoff_s": 0})
    items = run_helmet(cfg, tiny_lm, tok, False, "cpu")
    by = {i["dataset"]: i for i in items}
    assert set(by) == {"nq", "msmarco", "nlu", "narrativeqa", "multi_lexsum"}
    assert all(i["input_tokens"] <= 256 for i in items) and by["narrativeqa"]["context_tokens_cut"] > 0
    assert by["narrativeqa"]["failed"] and "HTTP 503" in by["narrativeqa"]["error"] and "score" not in by["narrativeqa"]
    results = report.aggregate(items)
    assert results["failed_items"] == 2 and results["categories"]["QA"]["mean"] is None  # no score, never 0
    assert "| QA | — | — |" in report.markdown("r", "sft", results)
    assert results["datasets"]["narrativeqa"]["256"] == {"score": None, "items": 1, "failed": 1}


# ---------------------------------------------------------------- synthetic tasks and perplexity


def test_passkey_and_needle_prompts_fit_and_hold_their_answer(tok):
    (ex,) = synthetic.passkey_examples(tok, [512], [0.5], 1, 11, seed=0)
    assert n_tokens(tok, ex.prompt) <= 501 and ex.prompt.count(ex.answer) == 2
    assert 0.3 < ex.prompt.index(ex.answer) / len(ex.prompt) < 0.7
    assert synthetic.passkey_score("The pass key is 12345.", "12345") == 1.0
    assert synthetic.passkey_score("It is 1234 or 12345", "12345") == 0.0
    (nd,) = synthetic.needle_examples(tok, "A sentence about nothing. " * 200, [400], [0.0], 33)
    assert n_tokens(tok, nd.prompt) <= 367 and nd.prompt.startswith(synthetic.NEEDLE)


def test_perplexity_scores_the_end_of_long_documents_only(tiny_lm, tok):
    docs = ["short text", "word " * 2000, "other words " * 1500]
    out = long_document_loss(tiny_lm, tok, docs, length=512, last=128, max_docs=5, device="cpu")
    assert out["documents"] == 2 and out["skipped_short"] == 1 and out["loss"] > 0
    # the same loss computed directly from the logits
    ids = torch.tensor([[tok.bos_token_id] + tok("word " * 2000, add_special_tokens=False)["input_ids"][:511]])
    logits = tiny_lm(ids).logits[0]
    ref = torch.nn.functional.cross_entropy(logits[512 - 129:511], ids[0, 512 - 128:]).item()
    assert out["per_document"][0] == pytest.approx(ref, rel=1e-4)
    with pytest.raises(ValueError, match="no document has 512 tokens"):
        long_document_loss(tiny_lm, tok, ["tiny"], length=512, last=128, max_docs=1, device="cpu")


# ---------------------------------------------------------------- aggregation, table, charts


def test_categories_average_datasets_then_lengths(tmp_path):
    items = [{"dataset": "nq", "length": 1, "score": 100}, {"dataset": "nq", "length": 1, "score": 0},
             {"dataset": "popqa", "length": 1, "score": 100}, {"dataset": "nq", "length": 2, "score": 20},
             {"dataset": "json_kv", "length": 1, "depth": 0.5, "score": 100},
             {"dataset": "json_kv", "length": 1, "depth": 0.0, "score": 0}]
    r = report.aggregate(items)
    # RAG@1 = mean(nq 50, popqa 100) = 75; RAG@2 = nq 20; RAG = 47.5
    assert r["categories"]["RAG"]["by_length"] == {"1": 75, "2": 20} and r["categories"]["RAG"]["mean"] == 47.5
    assert r["by_depth"]["json_kv"]["1"] == {"0": 0, "0.5": 100}
    md = report.markdown("run", "sft", r)
    assert "| RAG | 75.0 | 20.0 | 47.5 |" in md
    assert sorted(report.charts(r, tmp_path)) == ["categories.png", "depth.png"]
    assert (tmp_path / "categories.png").read_bytes()[:4] == b"\x89PNG"


def test_an_unreachable_judge_is_a_clear_error():
    j = Judge(base_url="http://127.0.0.1:9", model="m", retries=0, backoff_s=0, timeout_s=5)
    with pytest.raises(JudgeError, match="ConnectError talking to the judge endpoint"):
        j.score("x", ("a",))
