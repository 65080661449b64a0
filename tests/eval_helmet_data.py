"""Small HELMET data sets written by the tests: our per-length JSONL layout, HELMET's own release
layout (k-named files, multi_lexsum_val.jsonl with key points) and Hugging Face datasets saved to
disk or as JSON files, shaped like the hub sets HELMET loads (CogComp/trec, PolyAI/banking77,
xingkunliuxtracta/nlu_evaluation_data, deepmind/narrativeqa, allenai/multi_lexsum)."""

from __future__ import annotations

import json
from pathlib import Path

SUMMARY = "The court ruled for Ann. Ann sued the city."
LONG = "Ann sued the city in 2020. The court ruled for Ann. The city appealed."
KEY_POINTS = ["The court ruled for Ann", "The city appealed the ruling"]


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def kilt_rows(n: int, k: int, tag: str = "") -> list[dict]:
    return [{"id": f"{tag}q{i}", "question": f"{tag}question {i}?", "answers": [f"answer {i}"],
             "ctxs": [{"title": f"T{i}.{j}", "text": f"passage {i}.{j}"} for j in range(k)]} for i in range(n)]


def rerank_rows(n: int, k: int, first_qid: int = 0) -> list[dict]:
    return [{"qid": str(first_qid + i), "query": f"query {i}",
             "ctxs": [{"id": str(100 * i + j), "text": f"doc {j}", "label": int(j == 0)} for j in range(k)]}
            for i in range(n)]


def ours(d: Path) -> str:
    """Our per-length layout at length 256."""
    ctx = [{"title": f"T{i}", "text": f"passage {i}"} for i in range(5)]
    write(d / "kilt/nq-256.jsonl", [{"question": "who?", "answers": ["Ann"], "ctxs": ctx}])
    write(d / "kilt/nq-demos.jsonl", [{"question": f"what {i}?", "answers": ["X"], "ctxs": ctx[:2]} for i in range(3)])
    write(d / "msmarco/rerank-256.jsonl", [{"qid": "1", "query": "q", "ctxs": [
        {"id": "11", "text": "a", "label": 2}, {"id": "12", "text": "b", "label": 0}]}])
    write(d / "msmarco/rerank-demos.jsonl", [{"qid": "0", "query": "d", "ctxs": [
        {"id": "5", "text": "c", "label": 0}, {"id": "6", "text": "e", "label": 1}]}])
    write(d / "icl/nlu-train.jsonl", [{"text": f"{lab} text {i}", "label": lab} for lab in "abc" for i in range(4)])
    write(d / "icl/nlu-test.jsonl", [{"text": f"query {i}", "label": "abc"[i % 3]} for i in range(8)])
    write(d / "narrativeqa/test.jsonl", [{"context": "story " * 300, "question": "who?", "answers": ["the fox"]}])
    write(d / "narrativeqa/train.jsonl", [{"question": f"demo question {i}?", "answers": [f"demo {i}"]}
                                          for i in range(3)])
    write(d / "multi_lexsum/test.jsonl", [{"id": "case-1", "context": "case " * 300, "summary_short": SUMMARY,
                                           "summary_long": LONG}])
    write(d / "multi_lexsum/train.jsonl", [{"summary_short": f"Demo summary {i}."} for i in range(3)])
    return str(d)


def helmets_release(d: Path) -> str:
    """HELMET's data.tar.gz layout: k-named files for 4K and 8K, Multi-LexSum's validation file."""
    for name, dep in (("nq", 6), ("hotpotqa", 3)):
        for k in (20, 50):
            write(d / f"kilt/{name}-dev-multikilt_1000_k{k}_dep{dep}.jsonl", kilt_rows(3, k))
        write(d / f"kilt/{name}-train-multikilt_1000_k3_dep{dep}.jsonl", kilt_rows(4, 3, "demo "))
    popqa = kilt_rows(4, 20)
    for i, r in enumerate(popqa):
        r["s_pop"] = [10, 5000, 999, 20][i]  # HELMET's popqa_3 keeps log10(s_pop) < 3
    write(d / "kilt/popqa_test_1000_k20_dep6.jsonl", popqa)
    write(d / "kilt/popqa_test_1000_k3_dep6.jsonl", [dict(r, ctxs=r["ctxs"][:3]) for r in popqa])
    write(d / "msmarco/test_reranking_data_k14_dep3.jsonl", rerank_rows(3, 14))
    write(d / "msmarco/test_reranking_data_k10_dep3.jsonl", rerank_rows(10, 10, first_qid=50))
    write(d / "multi_lexsum/multi_lexsum_val.jsonl", [
        {"id": f"case-{i}", "sources": [f"filing {i} " * 40, f"order {i} " * 40], "summary/short": SUMMARY,
         "summary/long": LONG, "summary/short_keypoints": KEY_POINTS, "summary/long_keypoints": ["x"]}
        for i in range(3)] + [{"id": "case-none", "sources": ["x"], "summary/short": None, "summary/long": "y"}])
    return str(d)


def hf_sets(d: Path) -> dict[str, str]:
    """Local copies of HELMET's hub sets: save_to_disk folders and one folder of JSON files."""
    import datasets

    trec_labels = datasets.ClassLabel(names=["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"])
    trec = datasets.Features({"text": datasets.Value("string"), "coarse_label": trec_labels,
                              "fine_label": datasets.ClassLabel(num_classes=50)})

    def trec_split(n):
        return datasets.Dataset.from_list([{"text": f"trec question {i}", "coarse_label": i % 6, "fine_label": i % 50}
                                           for i in range(n)], features=trec)

    datasets.DatasetDict({"train": trec_split(60), "test": trec_split(12)}).save_to_disk(str(d / "trec"))
    nlu = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(num_classes=68)})
    nlu_rows = [{"text": f"nlu utterance {i}", "label": i % 4} for i in range(40)]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(nlu_rows, features=nlu)}).save_to_disk(str(d / "nlu"))
    for split, n in (("train", 30), ("test", 6)):  # banking77 as JSON files with plain integer labels
        write(d / "banking77" / f"{split}.jsonl", [{"text": f"bank {split} {i}", "label": i % 5} for i in range(n)])

    def story(i, words):
        return {"document": {"id": f"doc{i}", "text": f"story {i} " * words},
                "question": {"text": f"who is in story {i}?"}, "answers": [{"text": f"hero {i}"}, {"text": "x"}]}

    datasets.DatasetDict({"test": datasets.Dataset.from_list([story(i, 1000 if i % 2 else 20) for i in range(6)]),
                          "train": datasets.Dataset.from_list([story(i, 5) for i in range(10, 14)])
                          }).save_to_disk(str(d / "narrativeqa"))

    def case(i, words):
        return {"id": f"case-{i}", "sources": [f"filing {i} " * words, "order"],
                "summary/short": f"Case {i} settled." if i != 5 else None,
                "summary/long": f"Case {i} was filed. Case {i} settled."}

    # 0-2 long enough, 3-4 too short, 5 without a short summary (HELMET drops it)
    datasets.DatasetDict({"validation": datasets.Dataset.from_list([case(i, 600 if i in (0, 1, 2, 5) else 10)
                                                                    for i in range(6)]),
                          "train": datasets.Dataset.from_list([case(i, 5) for i in range(20, 23)])
                          }).save_to_disk(str(d / "multi_lexsum"))
    return {"trec": str(d / "trec"), "nlu": str(d / "nlu"), "banking77": str(d / "banking77"),
            "narrativeqa": str(d / "narrativeqa"), "multi_lexsum": str(d / "multi_lexsum")}
