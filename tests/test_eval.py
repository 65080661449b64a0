"""Evaluation: metrics by hand, prompt fitting, HELMET's tasks built from small files (our layout,
HELMET's release layout, local Hugging Face datasets) and checked against HELMET's recipe, the judge
and key points against a real local HTTP server, synthetic tasks, perplexity and the aggregation."""

import json
import logging
import random
import re

import pytest
import torch

from prolong.config import EvalConfig, HelmetConfig, HelmetHFConfig, JudgeConfig
from prolong.errors import DataError
from prolong.eval import report
from prolong.eval.helmet import data as helmet
from prolong.eval.helmet import hf as helmet_hf
from prolong.eval.helmet import tasks as helmet_tasks
from prolong.eval.synthetic import passkey as synthetic
from prolong.eval.helmet.run import run_helmet
from prolong.eval.judge.client import Judge, JudgeError, extract_key_points, judge_qa, judge_summary, parse_scores
from prolong.eval.synthetic.json_kv import make_example
from prolong.eval.metrics import (exact_match, ndcg_at_k, normalize_answer, parse_output, parse_ranking,
                                  substring_exact_match, token_f1)
from prolong.eval.likelihood import long_document_loss
from prolong.eval.prompts import HFGenerator, Prompt, fit, n_tokens, newline_token_ids, truncate_text
from tests import eval_helmet_data as data


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
    assert substring_exact_match("anything", [""]) == 1.0  # HELMET: "" is in every string
    assert exact_match("the Arctic", "arctic") == 1.0


def test_token_f1():
    # pred {north, pole, today}, gold {north, pole}: P 2/3, R 1 → F1 0.8
    assert token_f1("north pole today", ["the north pole"]) == pytest.approx(0.8)
    assert token_f1("x", ["y"]) == 0.0


def test_parse_ranking_and_parse_output_read_answers_as_helmet_does():
    assert parse_ranking("Ranking: [ID: 3] > ID1 > 2 > 3") == ["3", "1", "2"]
    assert parse_ranking("7205 > 1001\n\nsome explanation > 9") == ["7205", "1001"]
    assert parse_ranking("Ranking: 4 > 9\nso 7 > 1 > 2 > 5") == ["7", "1", "2", "5"]  # the longest chain wins
    assert parse_ranking("no ranking here") == ["no ranking here"]  # no number: one id that matches nothing
    assert parse_output("Answer: Paris\nmore") == "Paris" and parse_output("Paris\nmore") == "Paris"
    assert parse_output("label: label: 3\n", "label:") == "3"  # an echoed prefix is dropped
    assert parse_output("\n", "label:") == ""


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


def test_truncate_text_keeps_helmets_token_count_and_marker(tok):
    text = " ".join(f"word{i}" for i in range(300))
    cut = truncate_text(tok, text, 100, helmet.OMISSION)
    kept = cut[:-len(helmet.OMISSION)]
    assert cut.endswith(" ... [the rest of the text is omitted]") and text.startswith(kept)
    # HELMET keeps max - len(tokens(postfix)) + 1 - (special tokens) tokens of the text, then the postfix
    assert n_tokens(tok, kept) == 100 - n_tokens(tok, helmet.OMISSION) + 1
    assert truncate_text(tok, "short", 100, helmet.OMISSION) == "short"


def test_chat_prompts_have_no_prefix_and_plain_ones_use_the_tasks_separator(tok):
    p = Prompt("Q {context}", "ctx", {}, "Summary:", separator="\n\n")
    assert p.render(tok, chat=False) == "Q ctx\n\nSummary:"
    chat = p.render(tok, chat=True)
    assert "Q ctx" in chat and not chat.endswith("Summary:")  # HELMET: the generation prompt only
    assert newline_token_ids(tok) == sorted({tok.convert_tokens_to_ids("Ċ"), tok.convert_tokens_to_ids("ĊĊ")})


def test_json_kv_fills_the_length_and_puts_the_gold_key_at_its_depth(tok):
    a = make_example(tok, 1024, 0.0, 41, seed=3, use_chat_template=False)
    b = make_example(tok, 1024, 1.0, 41, seed=3, use_chat_template=False)
    assert 1024 - 41 - 60 < n_tokens(tok, a.prompt) <= 1024 - 41
    body = a.prompt.split("JSON data:\n")[1]
    assert body.index(a.key) < body.index(b.key)  # depth 0 first, depth 1 last
    assert "Extract the value corresponding to the specified key in the JSON object below." in a.prompt
    assert a.prompt.endswith("Corresponding value:") and a == make_example(tok, 1024, 0.0, 41, 3, False)


# ---------------------------------------------------------------- HELMET loaders on files made here


@pytest.fixture
def helmet_dir(tmp_path):
    return data.ours(tmp_path / "helmet")


def test_rag_and_rerank_items_follow_helmets_templates(helmet_dir):
    d = helmet.HelmetData(helmet_dir)
    (rag,) = helmet.rag_items(d, "nq", 256, 10)
    text = rag.prompt.render(None, chat=False)
    assert text.startswith("Use the given documents to write a concise and short answer to the question. Write your "
                           "answer in the following format:\nAnswer: [answer]\n\n")
    assert "Document (Title: T0): passage 0" in text and text.endswith("Question: who?\nAnswer:")
    assert len(re.findall(r"Question: what \d\?\nAnswer: X\n\n", text)) == 2  # two distinct demos
    (rr,) = helmet.rerank_items(d, 256, 10)
    assert rr.meta["qrels"] == {"11": 2, "12": 0} and "[ID: 11] Document: a" in rr.prompt.context
    assert rr.prompt.fields["demos"] == "[ID: 5] Document: c\n\n[ID: 6] Document: e\n\nQuery: d\nRanking: 6 > 5\n\n"


def test_rag_samples_questions_and_demos_as_helmet_does(tmp_path):
    import datasets

    d = tmp_path / "h"
    data.write(d / "kilt/nq-256.jsonl", data.kilt_rows(30, 2))
    data.write(d / "kilt/nq-demos.jsonl", data.kilt_rows(10, 3, "demo "))
    items = list(helmet.rag_items(helmet.HelmetData(str(d)), "nq", 256, 5, seed=42))
    ids = [it.meta["id"] for it in items]
    assert set(ids) == set(random.Random(42).sample(sorted(f"q{i}" for i in range(30)), 5))
    assert ids == sorted(ids, key=lambda q: int(q[1:]))  # the file's order is kept
    pool = datasets.Dataset.from_list(data.kilt_rows(10, 3, "demo "))
    for it in items:  # demos: the pool shuffled by datasets with the question's sha256 seed, first two
        want = pool.shuffle(seed=helmet.text_seed(it.meta["id"])).select(range(2))["question"]
        assert re.findall(r"Question: (demo question \d+\?)", it.prompt.fields["demos"]) == want
        assert it.prompt.fields["demos"].count("Document (Title: T") == 6  # every passage of both demos
    assert helmet.hf_permutation(7, 3) == [r["i"] for r in datasets.Dataset.from_list(
        [{"i": i} for i in range(7)]).shuffle(seed=3)]


def test_helmets_release_layout_is_read_by_length(tmp_path):
    d = helmet.HelmetData(data.helmets_release(tmp_path / "data"))
    assert d.test_file("nq", 4096) == "kilt/nq-dev-multikilt_1000_k20_dep6.jsonl"
    assert d.test_file("hotpotqa", 8192) == "kilt/hotpotqa-dev-multikilt_1000_k50_dep3.jsonl"
    assert d.demo_file("msmarco") == "msmarco/test_reranking_data_k10_dep3.jsonl"
    nq = list(helmet.rag_items(d, "nq", 8192, 100))
    assert len(nq) == 3 and nq[0].prompt.context.count("Document (Title:") == 50
    popqa = list(helmet.rag_items(d, "popqa", 4096, 100))
    assert sorted(it.meta["id"] for it in popqa) == ["q0", "q2", "q3"]  # s_pop 5000 is over HELMET's 10^3
    for it in popqa:  # popqa's demos come from its own test split, never the question itself
        assert f"Question: {it.prompt.fields['question']}\n" not in it.prompt.fields["demos"]
        assert "question 1?" not in it.prompt.fields["demos"] and it.prompt.fields["demos"].count("Answer:") == 2
    rr = list(helmet.rerank_items(d, 4096, 100))
    assert len(rr) == 3 and rr[0].prompt.context.count("[ID:") == 14
    assert rr[0].prompt.fields["demos"].count("Query:") == 2
    data.write(tmp_path / "data/kilt/nq-4096.jsonl", data.kilt_rows(1, 2))  # our name wins where both exist
    assert d.test_file("nq", 4096) == "kilt/nq-4096.jsonl"
    with pytest.raises(DataError, match=r"none of kilt/nq-512.jsonl in .*HELMET's own files cover lengths 4096, 8192"):
        d.test_file("nq", 512)


def test_icl_follows_helmets_balanced_many_shot_recipe(helmet_dir):
    src = helmet_tasks.Sources(helmet.HelmetData(helmet_dir), HelmetConfig(data_dir=helmet_dir), None)
    split = src.icl("nlu")
    assert split[2] == 3 and {r["label"] for r in split[0]} == {0, 1, 2}  # class names → ids in sorted order
    assert helmet_tasks.icl_shots("nlu", 256) == round(250 * 256 / 4096) == 16
    assert helmet_tasks.icl_shots("banking77", 32768) == 1450  # HELMET's table where it has the length
    assert helmet_tasks.icl_max_items(HelmetConfig(data_dir=helmet_dir)) == 500  # HELMET's ICL test size
    items = list(helmet_tasks.icl_items(split, "nlu", 256, 6, seed=1))
    classes = [int(it.prompt.fields["question"].split()[1]) % 3 for it in items]
    assert sorted(classes) == [0, 0, 1, 1, 2, 2]  # 6 of 8 test rows, class-balanced
    for it, cls in zip(items, classes):
        demos = it.prompt.context.split("\n\n")
        assert len(demos) == 16
        for r in range(5):  # one demo per class per round
            assert sorted(x.split("label: ")[1] for x in demos[3 * r:3 * r + 3]) == ["0", "1", "2"]
        # the answer is the number this example's demos give its class
        assert {x.split("label: ")[1] for x in demos if x.startswith("abc"[cls])} == set(it.answers)
    # numbers are shuffled per example: some class is written with different numbers
    assert any(len({it.answers[0] for it, c in zip(items, classes) if c == k}) > 1 for k in range(3))
    assert items == list(helmet_tasks.icl_items(split, "nlu", 256, 6, seed=1))
    out = helmet_tasks.balance_labels([["a1", "a2"], ["b1"]], 3, seed=0)
    assert len(out) == 3 and "b1" in out[:2] and sorted(x for x in out if x != "b1") in (["a1", "a2"], ["a1"], ["a2"])


def test_long_document_prompts_follow_helmet(helmet_dir, tok):
    hc = HelmetConfig(data_dir=helmet_dir, datasets=["narrativeqa", "multi_lexsum"])
    qa, summ = helmet_tasks.build_items(hc, [512], tok)
    text = qa.prompt.render(tok, chat=False)
    assert text.startswith("You are given a story, which can be either a novel or a movie script, and a question. "
                           "Answer the question as concisely as you can, using a single phrase if possible.\n\n"
                           "For example:\n\nQuestion: demo question ")
    assert "\n\nNow, use the following story to answer the question:\n\nstory story" in text
    assert text.endswith("\n\nQuestion: who?\nAnswer:") and text.count("\nAnswer: demo ") == 2
    assert qa.prompt.context.endswith(" ... [the rest of the text is omitted]")  # cut to HELMET's length - 300
    assert n_tokens(tok, qa.prompt.context) <= 512 - 300 + 1
    text = summ.prompt.render(tok, chat=False)
    assert "the outcomes of the case.\n\nExample summaries:\n\nSummary: Demo summary " in text
    assert "\n\nNow, write a summary of the following legal documents.\nLegal documents:\ncase case" in text
    assert text.endswith("\n\nNow please summarize the case.\n\nSummary:")
    assert summ.meta == {"id": "case-1", "summary_long": data.LONG, "key_points": None}


def test_icl_qa_and_summ_read_through_hugging_face_datasets(tmp_path, tok):
    import datasets

    paths = data.hf_sets(tmp_path / "hf")
    data.write(tmp_path / "points.jsonl", [{"id": "case-0", "summary/short_keypoints": ["Case 0 settled"]}])
    bank = {"train": f"{paths['banking77']}/train.jsonl", "test": f"{paths['banking77']}/test.jsonl"}
    hc = HelmetConfig(datasets=["trec_coarse", "banking77", "nlu", "narrativeqa", "multi_lexsum"], max_items=4,
                      icl_max_items=4,
                      hf={"trec_coarse": {"name": paths["trec"]}, "nlu": {"name": paths["nlu"]},
                          "banking77": {"name": "json", "data_files": bank},
                          "narrativeqa": {"name": paths["narrativeqa"]},
                          "multi_lexsum": {"name": paths["multi_lexsum"]}},
                      min_context_tokens={"narrativeqa": 300, "multi_lexsum": 300},
                      key_points=str(tmp_path / "points.jsonl"))
    by = {}
    for it in helmet_tasks.build_items(hc, [1024], tok):
        by.setdefault(it.dataset, []).append(it)
    trec = by["trec_coarse"]  # 12 test rows → 4, class-balanced over HELMET's 6 coarse classes
    assert len(trec) == 4 and all(a.isdigit() and int(a) < 6 for it in trec for a in it.answers)
    assert len(by["banking77"]) == 4 and len(by["nlu"]) == 4  # nlu: HELMET's 10% of the one split
    qa = by["narrativeqa"]  # stories over 300 tokens only (odd ones), in the order datasets' shuffle gives
    order = [r["question"]["text"] for r in datasets.load_from_disk(paths["narrativeqa"])["test"].shuffle(seed=42)]
    assert [it.meta["question"] for it in qa] == [q for q in order if int(q.split()[-1][:-1]) % 2]
    assert qa[0].answers == [f"hero {qa[0].meta['question'].split()[-1][:-1]}", "x"]
    assert qa[0].prompt.fields["demo"].startswith("For example:\n\nQuestion: who is in story 1")
    assert qa[0].prompt.context.endswith(helmet.OMISSION)
    summ = by["multi_lexsum"]  # the long validation cases with a short summary; key points from the file
    assert [it.meta["id"] for it in summ] == ["case-0", "case-1", "case-2"]
    assert summ[0].meta["key_points"] == ["Case 0 settled"] and summ[1].meta["key_points"] is None
    assert summ[0].prompt.context.startswith("filing 0 filing 0") and summ[0].prompt.context.endswith(helmet.OMISSION)
    assert summ[0].prompt.fields["demo"].startswith("Example summaries:\n\nSummary: Case 2")


def test_helmets_hub_sets_load_by_default_and_script_only_ones_from_the_parquet_conversion(monkeypatch):
    import datasets

    case = {"id": "c", "sources": ["doc"], "summary/short": "Short.", "summary/long": "Long."}
    calls = []

    def load_dataset(name, subset=None, revision=None, data_files=None):  # the hub, as datasets>=4 answers it
        calls.append((name, subset, revision))
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found multi_lexsum.py")
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list([case]),
                                     "train": datasets.Dataset.from_list([case])})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    rows, train = helmet_hf.multi_lexsum_rows(HelmetHFConfig())
    assert calls == [("allenai/multi_lexsum", "v20230518", None),
                     ("allenai/multi_lexsum", "v20230518", "refs/convert/parquet")]
    assert rows[0]["context"] == "doc" and train == [{"summary_short": "Short."}]


def test_helmet_config_and_data_errors_are_one_line(helmet_dir, tmp_path):
    with pytest.raises(ValueError, match="data_dir: needed for nq"):
        HelmetConfig(datasets=["nq", "narrativeqa"], hf={"narrativeqa": {}})
    assert HelmetConfig(datasets=["narrativeqa"], hf={"narrativeqa": {}}).data_dir is None
    with pytest.raises(DataError, match=r"eval.helmet.data_dir: none of kilt/popqa-256.jsonl in .*helmet"):
        list(helmet.rag_items(helmet.HelmetData(helmet_dir), "popqa", 256, 1))
    data.write(tmp_path / "bad/narrativeqa/test.jsonl", [{"context": "c", "question": "q"}])
    data.write(tmp_path / "bad/multi_lexsum/test.jsonl", [{"id": "1", "context": "c", "summary_short": "s"}])
    data.write(tmp_path / "bad/kp.jsonl", [{"id": "1", "summary/short_keypoints": "not a list"}])
    bad = str(tmp_path / "bad")
    src = helmet_tasks.Sources(helmet.HelmetData(bad), HelmetConfig(data_dir=bad, key_points="kp.jsonl"), None)
    with pytest.raises(DataError, match="narrativeqa/test.jsonl: a row has no answers field"):
        list(helmet_tasks.narrativeqa_items(src, 256))
    with pytest.raises(DataError, match="eval.helmet.key_points: kp.jsonl: rows need id and summary/short_keypoints"):
        list(helmet_tasks.multi_lexsum_items(src, 256))
    src = helmet_tasks.Sources(helmet.HelmetData(None), HelmetConfig(
        datasets=["nlu"], hf={"nlu": {"name": str(tmp_path / "nowhere")}}), None)
    with pytest.raises(DataError, match="eval.helmet.hf.nlu"):
        src.icl("nlu")


# ---------------------------------------------------------------- the judge, over real HTTP


def make_judge(url: str, mode: str, monkeypatch, retries: int = 2, rubrics: str = "card") -> Judge:
    monkeypatch.setenv("TEST_JUDGE_KEY", "sk-secret-123")
    return Judge.from_config(JudgeConfig(base_url=f"{url}/{mode}/v1", model="judge", api_key_env="TEST_JUDGE_KEY",
                                         retries=retries, backoff_s=0, rubrics=rubrics))


def requests_seen(url: str) -> int:
    import httpx

    return httpx.get(f"{url}/requests").json()["requests"]


@pytest.mark.parametrize("rubrics", ["card", "helmet"])
def test_the_qa_rubric_scores_fluency_times_correctness(judge_url, monkeypatch, caplog, rubrics):
    judge = make_judge(judge_url, "ok", monkeypatch, rubrics=rubrics)
    with caplog.at_level(logging.DEBUG):
        good = judge_qa(judge, "Where are they headed?", ["the North Pole"], "They are headed for the North Pole.")
        bad = judge_qa(judge, "Where are they headed?", ["the North Pole"], "To Paris.")
    assert good["score"] == 100 and good["fluency"] == 1 and bad["score"] == 0
    import httpx

    seen = httpx.get(f"{judge_url}/requests").json()
    assert "Bearer sk-secret-123" in seen["authorization"]  # sent to the endpoint ...
    assert "sk-secret-123" not in caplog.text  # ... never logged


@pytest.mark.parametrize("rubrics", ["card", "helmet"])
def test_the_summary_score_is_fluency_times_f1_of_helmets_recall_and_precision(judge_url, monkeypatch, rubrics):
    judge = make_judge(judge_url, "ok", monkeypatch, rubrics=rubrics)
    s = judge_summary(judge, " The court ruled for Ann. Bananas are yellow.\n", short=data.SUMMARY, long=data.LONG,
                      key_points=["The court ruled for Ann", "Ann sued the mayor"])
    # the test server finds 1 of 2 key points in the output and 1 of its 2 sentences in the long summary
    assert s["recall"] == 0.5 and s["precision"] == 0.5 and s["f1"] == 0.5 and s["score"] == pytest.approx(50)
    assert ("card_correctness" in s) == (rubrics == "card")
    assert extract_key_points(judge, data.SUMMARY) == ["The court ruled for Ann.", "Ann sued the city."]


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
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    cfg = EvalConfig(lengths=[256], helmet={"data_dir": helmet_dir, "max_items": 1,
                                            "datasets": ["nq", "msmarco", "nlu", "narrativeqa", "multi_lexsum"],
                                            "max_new_tokens": {"multi_lexsum": 20, "rerank": 20}},
                     judge={"base_url": f"{judge_url}/down/v1", "api_key_env": "TEST_JUDGE_KEY", "retries": 0,
                            "backoff_s": 0})
    items = run_helmet(cfg, HFGenerator(tiny_lm, tok, "cpu"), tok, True)
    by = {i["dataset"]: i for i in items}
    assert set(by) == {"nq", "msmarco", "nlu", "narrativeqa", "multi_lexsum"}
    assert all(i["input_tokens"] <= 256 for i in items) and by["narrativeqa"]["context_tokens_cut"] > 0
    # HELMET's configs: the chat template for QA and Summ of the instruction-tuned model only
    assert {d for d, i in by.items() if i["chat_template"]} == {"narrativeqa", "multi_lexsum"}
    assert by["narrativeqa"]["failed"] and "HTTP 503" in by["narrativeqa"]["error"] and "score" not in by["narrativeqa"]
    assert by["multi_lexsum"]["failed"]  # its key points had to come from the judge, which is down
    results = report.aggregate(items)
    assert results["failed_items"] == 2 and results["categories"]["QA"]["mean"] is None  # no score, never 0
    assert "| QA | — | — |" in report.markdown("r", "sft", results)
    assert results["datasets"]["narrativeqa"]["256"] == {"score": None, "items": 1, "failed": 1}


@pytest.mark.parametrize("layout", ["helmet", "ours"])
def test_summaries_use_released_key_points_or_ask_the_judge_once_per_case(tmp_path, tiny_lm, tok, judge_url,
                                                                         monkeypatch, layout):
    monkeypatch.setenv("TEST_JUDGE_KEY", "k")
    root = data.helmets_release(tmp_path / "d") if layout == "helmet" else data.ours(tmp_path / "d")
    cfg = EvalConfig(lengths=[256, 512], helmet={"data_dir": root, "datasets": ["multi_lexsum"], "max_items": 2,
                                                 "min_context_tokens": {}, "max_new_tokens": {"multi_lexsum": 8}},
                     judge={"base_url": f"{judge_url}/ok/v1", "api_key_env": "TEST_JUDGE_KEY", "backoff_s": 0})
    before = requests_seen(judge_url)
    rows = run_helmet(cfg, HFGenerator(tiny_lm, tok, "cpu"), tok, True)
    calls = requests_seen(judge_url) - before
    assert not any(r.get("failed") for r in rows) and all(0 <= r["score"] <= 100 for r in rows)
    if layout == "helmet":  # HELMET's multi_lexsum_val.jsonl: 2 of its 3 cases, with their key points
        assert len(rows) == 4 and all(r["key_points"] == data.KEY_POINTS for r in rows)
        assert {r["key_points_from"] for r in rows} == {"released"} and calls == 3 * 4
    else:  # no released key points: the judge writes them once per case, for every length
        assert len(rows) == 2 and {r["key_points_from"] for r in rows} == {"judge"}
        assert rows[0]["key_points"] == ["The court ruled for Ann.", "Ann sued the city."] and calls == 3 * 2 + 1


# ---------------------------------------------------------------- synthetic tasks and perplexity


def test_passkey_and_needle_prompts_fit_and_hold_their_answer(tok):
    (ex,) = synthetic.passkey_examples(tok, [512], [0.5], 1, 11, seed=0)
    assert n_tokens(tok, ex.prompt) <= 501 and ex.prompt.count(ex.answer) == 2
    assert 0.3 < ex.prompt.index(ex.answer) / len(ex.prompt) < 0.7
    assert synthetic.passkey_score("The pass key is 12345.", "12345") == 1.0
    assert synthetic.passkey_score("It is 1234 or 12345", "12345") == 0.0
    (nd,) = synthetic.needle_examples(tok, "A sentence about nothing. " * 200, [400], [0.0], 33)
    assert n_tokens(tok, nd.prompt) <= 367 and nd.prompt.startswith(synthetic.NEEDLE)


def test_a_long_haystack_gives_the_first_tokens_tokenizing_all_of_it_gives(tok):
    from prolong import assets

    books = [json.loads(x)["text"] for x in open(assets.resolve("builtin:tiny-corpus/books.jsonl"))]
    haystack = "\n\n".join(books)
    whole = tok(haystack, add_special_tokens=False)["input_ids"]
    for tokens in (10, 300, 2000, len(whole) // 2):
        ids = synthetic._haystack_ids(tok, haystack, tokens)
        assert len(ids) >= tokens and ids == whole[:len(ids)], tokens
    short = tok("Short. ", add_special_tokens=False)["input_ids"]  # repeated to the length asked for
    ids = synthetic._haystack_ids(tok, "Short. ", 50)
    assert len(ids) >= 50 and ids == (short * 64)[:len(ids)]


def test_lm_eval_indexes_only_the_recipes_task_folder_when_it_defines_every_task():
    from prolong import assets
    from prolong.eval.short_tasks import _task_manager

    folder = assets.resolve("builtin:tiny-lm-eval")
    local = _task_manager(folder, ["pymodule_mc"])
    assert "pymodule_mc" in local.all_tasks and "hellaswag" not in local.all_tasks
    both = _task_manager(folder, ["pymodule_mc", "hellaswag"])  # a built-in task as well: all of lm-eval's
    assert {"pymodule_mc", "hellaswag"} <= set(both.all_tasks)


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
