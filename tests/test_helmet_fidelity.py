"""Our HELMET metrics and prompt cuts against HELMET's own behaviour (princeton-nlp/HELMET utils.py,
data.py, model_utils.py; re-rank through the trec_eval that pytrec_eval bundles), edge cases first.

Every expected value below was computed by running HELMET's functions on the same input; HELMET
itself is not imported here.
"""

from __future__ import annotations

import json

import pytest

from prolong.eval import report
from prolong.eval.helmet import data as helmet
from prolong.eval.helmet.run import score_item
from prolong.eval.synthetic.json_kv import score as json_kv_score
from prolong.eval.metrics import (exact_match, gold_answers, ndcg_at_k, parse_output, parse_ranking, rerank_cutoffs,
                                  rerank_ndcg, substring_exact_match, token_f1)
from prolong.eval.prompts import Prompt, fit, n_tokens, prompt_ids, truncate_text

OMISSION = helmet.OMISSION


# ---------------------------------------------------------------- tokenizers that add BOS and/or EOS


def word_tokenizer(bos: bool, eos: bool):
    """One token per word or punctuation run (unknown words are all <unk>: offsets are what count)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece()
    single = " ".join((["<s>"] if bos else []) + ["$A"] + (["</s>"] if eos else []))
    tok.post_processor = processors.TemplateProcessing(single=single, special_tokens=[("<s>", 0), ("</s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.chat_template = ("{% for m in messages %}<s>[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %} [assistant]{% endif %}")
    return out


def tiny_bpe(bos: bool, eos: bool):
    """The builtin byte-level BPE with a post-processor that adds BOS and/or EOS."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from prolong import assets

    base = AutoTokenizer.from_pretrained(assets.resolve("builtin:tiny-bpe"))
    tok = Tokenizer.from_str(base.backend_tokenizer.to_str())
    b, e = base.bos_token, base.eos_token
    single = " ".join(([b] if bos else []) + ["$A"] + ([e] if eos else []))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=single, special_tokens=[(b, base.bos_token_id), (e, base.eos_token_id)])])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=b, eos_token=e, pad_token=base.pad_token)
    out.chat_template = base.chat_template
    return out


# 60 words, a comma after every 7th from w3: 69 word tokens
WORDS = " ".join(f"w{i}," if i % 7 == 3 else f"w{i}" for i in range(60))


# ---------------------------------------------------------------- answer metrics (utils.py)


@pytest.mark.parametrize("prediction, answers, expected", [
    ("yes", ["yes"], 1.0), ("Yes.", ["yes"], 1.0), ("The no!", ["no"], 1.0), ("NoAnswer", ["noanswer"], 1.0),
    ("yes it is", ["yes"], 0.0),        # gold is yes/no and they differ: 0, not 0.5
    ("yes", ["yes it is"], 0.0),        # prediction is yes/no and they differ
    ("maybe yes", ["yes"], 0.0), ("no", ["No answer"], 0.0), ("noanswer", ["no answer"], 0.0),
    ("no answer", ["noanswer"], 0.0), ("yes", ["no", "yes"], 1.0), ("no", ["noanswer", "no"], 1.0),
    ("no way", ["no way"], 1.0), ("north pole today", ["the north pole"], 0.8), ("a b c", "b c d", 0.8),
    ("", [""], 0.0), ("Paris France", [["Paris"], ["Lyon", "France"]], 2 / 3), ("x", [["x y"], "x"], 1.0),
])
def test_token_f1_is_helmets(prediction, answers, expected):
    assert token_f1(prediction, answers) == pytest.approx(expected)


@pytest.mark.parametrize("prediction, answers, expected", [
    ("anything", [""], 1.0), ("anything", ["The"], 1.0), ("", ["a"], 1.0), ("", [""], 1.0), ("an", ["An!"], 1.0),
    ("They went north.", [["a", "b"], "c"], 1.0),  # "a" normalises to ""
    ("South", ["north pole"], 0.0), ("north-pole", ["north pole"], 0.0), ("Bob", "bob", 1.0),
    ("The Arctic Ocean", [["arctic"], ["pacific"]], 1.0), ("x", [["north pole"], "x"], 1.0),
    ("d", [["ab"], "cd"], 1.0), ("xyz", [["ab"], "cd"], 0.0),
])
def test_substring_exact_match_is_helmets(prediction, answers, expected):
    assert substring_exact_match(prediction, answers) == expected


@pytest.mark.parametrize("prediction, answers, expected", [
    ("The Arctic!", [["arctic"]], 1.0), ("c", [["a", "b"], "c"], 1.0), ("", [""], 1.0), ("", ["the"], 1.0),
    ("Paris", ["paris", "Lyon"], 1.0), ("Paris.", "paris", 1.0), ("d", [["x"], "cd"], 1.0),
    ("cd", [["a", "b"], "cd"], 0.0),  # beside lists HELMET iterates a string: "c", "d", never "cd"
])
def test_exact_match_is_helmets(prediction, answers, expected):
    assert exact_match(prediction, answers) == expected


def test_nested_answers_are_flattened_as_helmet_flattens_them():
    assert gold_answers("a") == ["a"]
    assert gold_answers([["a", "b"], "c"]) == ["a", "b", "c"]
    assert gold_answers([["a"], "cd", ["e"]]) == ["a", "c", "d", "e"]
    assert gold_answers(("x", "y")) == ["x", "y"]
    assert gold_answers(["a", ["b", "c"]]) == ["a", "b", "c"]  # HELMET raises; we flatten
    assert token_f1("b", [["a", "b"], "c"]) == 1.0 and exact_match("z", []) == 0.0


@pytest.mark.parametrize("output, prefix, expected", [
    ("Answer: Paris\nmore", "Answer:", "Paris"), ("x\ny", "Answer:", "x"), ("answer: answer: 42", "Answer:", "42"),
    ("", "label:", ""), ("label: label: 3\n", "label:", "3"), ("  ANSWER:   Rome  ", "Answer:", "Rome"),
    ("I think\nAnswer: Oslo", "Answer:", "Oslo"), ("\n\nAnswer:", "Answer:", ""),
    ("Summary: it was good. Summary: twice", "Summary:", "it was good. Summary: twice"),
    ("value: 1 value: 2", "value:", "1 value: 2"),
    ("Corresponding value: abc\nKey: x", "corresponding value:", "abc"),
    ("a result: 5", "a.result:", "5"),  # HELMET searches for the prefix as a regular expression
])
def test_parse_output_is_helmets(output, prefix, expected):
    assert parse_output(output, prefix) == expected


@pytest.mark.parametrize("output, expected", [
    ("[1] > [2] > [3]", ["1", "2", "3"]), ("ID: 12 > ID: 7 > 12 > 3", ["12", "7", "3"]),
    ("ranking: 5>4 and 3 > 2 > 1", ["3", "2", "1"]), ("no ranking here", ["no ranking here"]),
    ("Identity: IDE", ["entity e"]), ("1 > 2 then 3 > 4", ["1", "2"]), ("Ranking: [ID: 3] > ID1 > 2", ["3", "1", "2"]),
    ("[ID2] > [ID10]>[ID 7]", ["2", "10", "7"]), ("10 > 2", ["10", "2"]), ("RANKING: Id5 > id 6\n> 8", ["5", "6", "8"]),
])
def test_parse_ranking_is_helmets(output, expected):
    assert parse_ranking(output) == expected


# ---------------------------------------------------------------- re-rank (calculate_retrieval_metrics)

Q1 = {"1": 1, "2": 0, "3": 2, "9": 1}
Q2 = {str(i): r for i, r in enumerate([0, 3, 0, 1, 2, 0, 0, 1, 0, 0, 0, 2, 0, 3, 1])}


@pytest.mark.parametrize("output, qrels, cutoffs, expected", [
    ("Ranking: [ID: 3] > ID1 > 2", Q1, [1, 5, 10], [1.0, 0.8403, 0.8403]),
    ("9 > 1 > 3", Q1, [1, 5, 10], [0.5, 0.8403, 0.8403]),
    ("0 > 2 > 5 > 6 > 8 > 9 > 10 > 12 > 1 > 13 > 3 > 4 > 11 > 14 > 7", Q2, [1, 5, 10], [0.0, 0.0, 0.22607]),
    ("13 > 1 > 4 > 11 > 3 > 7 > 14 > 0 > 2", Q2, [1, 5, 10], [1.0, 1.0, 1.0]),
    ("1 > 1 > 13 > 13 > 4", Q2, [1, 5, 10], [1.0, 0.82521, 0.75254]),
    ("4 > 5 > 6", {"4": -1, "5": 1, "6": 0}, [1], [0.0]), ("5", {"4": -1, "5": 1, "6": 0}, [1], [1.0]),
    ("2 > 1", {"1": 0, "2": 0}, [1], [0.0]), ("I cannot rank these", Q1, [1, 5, 10], [0.0, 0.0, 0.0]),
    ("3 > 99 > 1", Q1, [1, 5], [1.0, 0.79848]),
])
def test_rerank_ndcg_is_helmets_trec_eval(output, qrels, cutoffs, expected):
    assert rerank_ndcg(parse_ranking(output), qrels, cutoffs) == {f"NDCG@{k}": v for k, v in zip(cutoffs, expected)}
    assert ndcg_at_k(parse_ranking(output), qrels, cutoffs[-1]) == pytest.approx(expected[-1], abs=5e-6)


def test_rerank_cutoffs_stop_at_the_number_of_passages():
    assert rerank_cutoffs(0) == [] and rerank_cutoffs(4) == [1] and rerank_cutoffs(9) == [1, 5]
    assert rerank_cutoffs(10) == rerank_cutoffs(14) == [1, 5, 10]
    assert rerank_cutoffs(999) == [1, 5, 10, 20, 50, 100, 200, 500]
    assert rerank_cutoffs(5000) == [1, 5, 10, 20, 50, 100, 200, 500, 1000]


def _rerank_dir(tmp_path, sizes: tuple[int, ...]) -> str:
    rows = [{"qid": f"q{j}", "query": f"query {j}",
             "ctxs": [{"id": str(i), "text": f"passage {i}", "label": int(i in (1, 2))} for i in range(n)]}
            for j, n in enumerate(sizes)]
    (tmp_path / "msmarco").mkdir(parents=True)
    (tmp_path / "msmarco/rerank-512.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path)


@pytest.mark.parametrize("sizes, expected", [
    ((9, 12), [None, None]),   # the first example has 9 passages: HELMET has no NDCG@10 for any
    ((12, 9), [91.972, 91.972]),  # the first has 12: every example gets NDCG@10, even the one with 9
    ((10, 3), [91.972, 91.972]),
])
def test_rerank_scores_ndcg_at_10_only_where_helmet_reports_it(tmp_path, sizes, expected):
    data = helmet.HelmetData(_rerank_dir(tmp_path, sizes))
    items = list(helmet.rerank_items(data, 512, max_items=10, shots=0))
    rows = [{"dataset": "msmarco", "length": 512, **score_item(it, "Ranking: 2 > 0 > 1", None, {})} for it in items]
    assert [r["score"] if r["score"] is None else pytest.approx(r["score"]) for r in rows] == expected
    assert all(r["ndcg"]["NDCG@5"] == 0.91972 for r in rows)
    score = report.aggregate(rows)["datasets"]["msmarco"]["512"]["score"]
    assert score == (None if expected[0] is None else pytest.approx(91.972))


# ---------------------------------------------------------------- task scoring (data.py post_process)


@pytest.mark.parametrize("generated, answer, expected", [
    (" 1b2c-3d\nKey: x", "1b2c-3d", 1.0),
    ("7b3c", "e7b3c", 1.0),       # HELMET scores "Corresponding value:" + output: "...value7b3c"
    (" 42", "value 42", 1.0), ("", "", 1.0), (" The value is a-b", "ab", 1.0),
    ("\nCorresponding value: abc", "abc", 1.0), (" xyz", "abc", 0.0), (" ABC.", "abc", 1.0), (" none", "the", 1.0),
    ("\n\nKey: k\nCorresponding value: zz", "zz", 1.0), (" a\nb", "a b", 1.0), ("8c1e", "8c 1e", 0.0),
])
def test_json_kv_is_scored_on_helmets_text(generated, answer, expected):
    assert json_kv_score(generated, answer) == expected


def _item(kind: str, answers: list) -> helmet.HelmetItem:
    return helmet.HelmetItem(kind, kind, 256, Prompt("{context}", ""), answers=answers)


def test_rag_qa_and_summ_scores_take_helmets_parse():
    assert score_item(_item("rag", ["The"]), "Answer: the\n", None, {})["score"] == 100
    assert score_item(_item("rag", [["Paris"], ["France"]]), "Answer: Paris, France", None, {})["score"] == 100
    qa = score_item(_item("narrativeqa", ["no"]), "Answer: no\nmore text", None, {})
    assert qa["token_f1"] == 100 and qa["parsed"] == "no more text"  # the judge reads the answer on one line
    assert score_item(_item("narrativeqa", ["yes"]), "The answer is yes.\nAnswer: yes", None, {})["token_f1"] == 100
    assert score_item(_item("multi_lexsum", ["yes"]), "Summary: yes", None, {})["token_f1"] == 100
    assert score_item(_item("multi_lexsum", ["The court ruled for Ann."]), "Summary: the court ruled for Ann\nand more",
                      None, {})["token_f1"] == 100


# ---------------------------------------------------------------- truncate_llama2 (data.py)


@pytest.mark.parametrize("bos, eos, max_tokens, kept", [
    # the index max_tokens - len(tokens(postfix)) (12 with BOS and EOS) is into the ids with specials
    (True, True, 20, "w0 w1 w2 w3, w4 w5 w6"), (True, False, 20, "w0 w1 w2 w3, w4 w5 w6 w7"),
    (False, True, 20, "w0 w1 w2 w3, w4 w5 w6 w7 w8"), (False, False, 20, "w0 w1 w2 w3, w4 w5 w6 w7 w8 w9"),
    (True, True, 12, ""),  # the index lands on BOS: no text is kept
    (True, False, 12, "w0"), (False, True, 12, "w0 w1"), (False, False, 12, "w0 w1 w2"),
    (True, True, 70, "w0 " + WORDS.split(" w43 ")[0].split(" ", 1)[1] + " w43 w44 w45, w46 w47 w48 w49 w50"),
    (True, True, 5, WORDS.split(" w56")[0]),  # a negative index counts from the end, as in HELMET
    (False, False, 1, WORDS.split(" w53")[0]),
])
def test_truncate_text_is_truncate_llama2(bos, eos, max_tokens, kept):
    assert truncate_text(word_tokenizer(bos, eos), WORDS, max_tokens, OMISSION) == kept + OMISSION


def test_truncate_text_keeps_what_fits_only_when_over():
    for bos, eos, limit in ((True, True, 71), (True, False, 70), (False, False, 69)):
        assert truncate_text(word_tokenizer(bos, eos), WORDS, limit, OMISSION) == WORDS
        assert truncate_text(word_tokenizer(bos, eos), WORDS, limit - 1, OMISSION) != WORDS


@pytest.mark.parametrize("bos, eos, kept", [(True, True, 88), (True, False, 89), (False, True, 90), (False, False, 91)])
def test_truncate_text_counts_special_tokens_as_helmet_with_a_bpe(prolong_home, bos, eos, kept):
    tok = tiny_bpe(bos, eos)
    text = " ".join(f"word{i}" for i in range(300))
    out = truncate_text(tok, text, 100, OMISSION)
    assert out.endswith(OMISSION) and text.startswith(out[:-len(OMISSION)])
    # BOS and EOS count on both sides: kept = 100 - len(tokens(postfix)) - BOS + 1 (HELMET: 88 with both)
    assert n_tokens(tok, out[:-len(OMISSION)]) == kept == 100 - (n_tokens(tok, OMISSION) + bos + eos) - bos + 1


# ---------------------------------------------------------------- tokenize (model_utils.py)

FIT_PROMPT = Prompt("Read this.\n\n{context}\n\nQuestion: {question}", WORDS, {"question": "which word?"}, "Answer:")


@pytest.mark.parametrize("bos, eos, over, context", [
    (True, False, 0, WORDS), (True, False, 1, WORDS[:-1]), (True, False, 3, WORDS.split("w58")[0]),
    (True, False, 10, WORDS.split("w52,")[0]), (True, False, 69, ""), (True, False, 70, ""), (True, False, 71, None),
    (True, True, 1, ""),  # HELMET's quirk: one token over with EOS, the offset of EOS (0) empties the context
    (True, True, 2, WORDS[:-1]), (True, True, 10, WORDS.split(", w53")[0]), (True, True, 69, "w0 "),
    (True, True, 71, ""), (True, True, 72, None), (False, True, 2, WORDS[:-1]), (False, True, 71, None),
    (False, False, 1, WORDS[:-1]), (False, False, 69, ""), (False, False, 70, None),
])
@pytest.mark.parametrize("chat", [False, True])
def test_fit_cuts_the_context_as_helmets_tokenize(bos, eos, over, context, chat):
    tok = word_tokenizer(bos, eos)
    limit = len(prompt_ids(tok, FIT_PROMPT.render(tok, chat), chat)) - over
    if context is None:  # HELMET fails with an IndexError
        with pytest.raises(ValueError, match="without any context"):
            fit(FIT_PROMPT, tok, limit, chat)
        return
    text, cut = fit(FIT_PROMPT, tok, limit, chat)
    assert text == Prompt(FIT_PROMPT.template, context, FIT_PROMPT.fields, "Answer:").render(tok, chat)
    assert cut == n_tokens(tok, WORDS) - n_tokens(tok, context)


@pytest.mark.parametrize("bos, eos", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("chat", [False, True])
def test_fit_with_a_bpe_keeps_helmets_count(prolong_home, bos, eos, chat):
    tok = tiny_bpe(bos, eos)
    p = Prompt("Read this.\n\n{context}\n\nQuestion: {question}", " ".join(f"word{i}" for i in range(300)),
               {"question": "which word?"}, "Answer:")
    limit = len(prompt_ids(tok, p.render(tok, chat), chat)) - 17
    text, cut = fit(p, tok, limit, chat)
    # HELMET counts the context's EOS among the tokens it cuts: with one, the prompt ends one over
    assert len(prompt_ids(tok, text, chat)) == limit + eos and cut == 17 - eos


def test_helmet_prompts_reach_the_model_as_helmet_tokenizes_them(prolong_home):
    from transformers import AutoModelForCausalLM

    from prolong import assets
    from prolong.eval.prompts import generate

    model = AutoModelForCausalLM.from_pretrained(assets.resolve("builtin:tiny-llama")).eval()
    tok = tiny_bpe(True, True)
    _, n = generate(model, tok, "Question: who?\nAnswer:", 1, "cpu", add_bos=False, special_tokens=True)
    assert n == len(tok("Question: who?\nAnswer:")["input_ids"]) == n_tokens(tok, "Question: who?\nAnswer:") + 2
