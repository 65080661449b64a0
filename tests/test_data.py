"""Data preparation: sources, packing rules (§A.2) on crafted documents, chat masks, MDS streams."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from prolong.config import DomainConfig
from prolong.recipe import load_recipe, recipe_from_dict
from prolong.data.mds import StreamKey, read_stream, stream_rel
from prolong.data.pack import TokenizedDoc, long_pieces, pack_concatenated, pack_long
from prolong.data.prepare import prepare, stream_plan
from prolong.data.sources import iter_documents
from prolong.data.tokenize import DocumentTokenizer
from prolong.errors import DataError
from prolong.store import Store
from tests.conftest import ROOT


def doc(*ids, mask=None):
    return TokenizedDoc(ids=np.asarray(ids, dtype=np.uint32), mask=None if mask is None else np.asarray(mask, np.uint8))


# ---------------------------------------------------------------- packing rules


def test_long_documents_are_filtered_and_cut_into_single_document_pieces():
    docs = [doc(*range(10)), doc(*range(100, 103)), doc(*range(200, 208))]
    pieces = list(long_pieces(docs, 4))
    # 10 tokens → 2 pieces (remainder dropped); 3 tokens → filtered out; 8 tokens → 2 pieces
    assert [p.tolist() for p in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7], [200, 201, 202, 203], [204, 205, 206, 207]]
    samples = list(pack_long(pieces, doc_len=4, seq_len=4, domain="code", seed=0))
    assert all(s.indices.tolist() == [[0, 4]] for s in samples) and len(samples) == 4
    grouped = list(pack_long(pieces, doc_len=4, seq_len=8, domain="code", seed=0))
    assert len(grouped) == 2 and all(s.indices.tolist() == [[0, 4], [4, 8]] for s in grouped)
    assert sorted(tuple(x) for s in grouped for x in s.input_ids.reshape(2, 4).tolist()) == sorted(tuple(p) for p in
                                                                                                  [q.tolist() for q in pieces])


def test_short_data_carries_the_truncated_remainder_into_the_next_sample():
    docs = [doc(1, 2, 3), doc(4, 5, 6, 7, 8), doc(9, 10)]
    samples = list(pack_concatenated(docs, 4, "web", carry_over=True))
    assert [s.input_ids.tolist() for s in samples] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert [s.indices.tolist() for s in samples] == [[[0, 3], [3, 4]], [[0, 4]]]  # 5..8 continue doc 2
    assert samples[0].mask is None  # the trailing partial sample [9, 10] is dropped


def test_sft_data_discards_the_truncated_remainder():
    docs = [doc(1, 2, 3, mask=[0, 1, 1]), doc(4, 5, 6, 7, mask=[0, 0, 1, 1]), doc(8, 9, 10, 11, mask=[0, 1, 1, 1])]
    samples = list(pack_concatenated(docs, 4, "chat", carry_over=False))
    assert [s.input_ids.tolist() for s in samples] == [[1, 2, 3, 4], [8, 9, 10, 11]]  # 5, 6, 7 discarded
    assert [s.mask.tolist() for s in samples] == [[0, 1, 1, 0], [0, 1, 1, 1]]
    assert samples[0].indices.tolist() == [[0, 3], [3, 4]]


def test_64k_and_512k_documents_are_distinct_and_proportions_are_followed(tmp_path):
    """Within one stage length, a long document feeds one document length only (§A.2)."""
    rows = [{"text": " ".join(f"w{i}x{j}" for j in range(n)), "title": f"d{i}"}
            for i, n in enumerate([3000, 2500, 1800, 1500, 1200, 900, 800, 700, 650, 600])]
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw = load_recipe(ROOT / "recipes" / "tiny.yaml").model_dump(mode="json")
    raw["data"]["domains"] = {"books": {"kind": "long", "source": {"type": "files", "path": str(path)}},
                              "chat": raw["data"]["domains"]["chat"]}
    stages = raw["stages"]
    stages["stage1"]["mixture"] = {"books": 1.0}
    stages["stage2"]["mixture"] = {"books@2K": 0.5, "books@512": 0.5}
    stages["stage2"]["steps"] = 2
    del stages["sft"], stages["eval"], stages["export"]
    recipe = recipe_from_dict(raw)
    store = Store(str(tmp_path / "runs"))
    store.write_json_atomic("r/recipe.json", raw)  # as the orchestrator does
    m = prepare(recipe, store, "r")
    seen = {}
    for key in (StreamKey(2048, "books", 2048), StreamKey(2048, "books", 512)):
        samples = read_stream(store.uri(stream_rel("r", key)), tmp_path / "cache" / key.name)
        spans = [np.asarray(s["indices"]).reshape(-1, 2) for s in samples]
        assert all((sp[:, 1] - sp[:, 0] == key.doc_len).all() for sp in spans)
        # identify each piece's source document by its first word's document number
        tok = DocumentTokenizer(recipe.model.tokenizer_path)
        docs = set()
        for s, sp in zip(samples, spans):
            for a, b in sp:
                text = tok.tok.decode(np.asarray(s["input_ids"][a:b], dtype=np.int64))
                ids = {m.group(1) for m in re.finditer(r"\bw(\d+)x\d+\b", text)}
                assert len(ids) == 1, ids  # a piece comes from one document
                docs |= ids
        seen[key.doc_len] = docs
    assert seen[2048] and seen[512] and not seen[2048] & seen[512]
    streams = m.metrics["streams"]
    assert streams["L2K/books@2K"]["wanted"] == streams["L2K/books@512"]["wanted"] == 2  # 0.5 × 2 steps × 2 seqs


# ---------------------------------------------------------------- sources


def test_repos_become_one_document_each_with_files_in_seeded_random_order(tmp_path):
    for repo, files in {"alpha": ["a.py", "b.py", "c.py", "d.py"], "beta": ["x.py", "notes.md"]}.items():
        for f in files:
            (tmp_path / repo / "pkg").mkdir(parents=True, exist_ok=True)
            (tmp_path / repo / "pkg" / f).write_text(f"# {repo}/{f}\n")
    (tmp_path / "alpha" / "pkg" / "blob.py").write_bytes(b"\xff\xfe binary")  # skipped, not fatal
    domain = DomainConfig.model_validate({"kind": "long", "source": {"type": "repos", "path": str(tmp_path),
                                                                     "files": ["*.py"]}})
    docs = list(iter_documents("code", domain, seed=1))
    assert [d.id.split("/")[-1] for d in docs] == ["alpha", "beta"]
    order = [line for line in docs[0].text.split("\n") if line]
    assert sorted(order) == [f"# alpha/{f}" for f in ["a.py", "b.py", "c.py", "d.py"]]
    assert order == [line for line in list(iter_documents("code", domain, seed=1))[0].text.split("\n") if line]
    orders = {tuple(x for x in list(iter_documents("code", domain, seed=s))[0].text.split("\n") if x) for s in range(8)}
    assert len(orders) > 1  # the order depends on the seed, not on file names
    assert "notes.md" not in docs[1].text


def test_file_sources_jsonl_txt_parquet_where_and_group_by(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one", "meta": {"set": "Book"}}) + "\n\n" +
                                      json.dumps({"text": "two", "meta": {"set": "Web"}}) + "\n")
    (tmp_path / "b.txt").write_text("three")
    pq.write_table(pa.table({"content": ["f1", "f2", "f3"], "repo": ["r2", "r1", "r2"]}), tmp_path / "c.parquet")

    def docs(source, kind="short"):
        return list(iter_documents("d", DomainConfig.model_validate({"kind": kind, "source": source}), seed=0))

    assert [d.text for d in docs({"type": "files", "path": str(tmp_path / "*.jsonl")})] == ["one", "two"]
    assert [d.text for d in docs({"type": "files", "path": str(tmp_path / "a.jsonl"),
                                  "where": {"meta.set": "Book"}})] == ["one"]
    assert [d.text for d in docs({"type": "files", "path": str(tmp_path / "b.txt")})] == ["three"]
    grouped = docs({"type": "files", "path": str(tmp_path / "c.parquet"), "text_field": "content", "group_by": "repo"}, "long")
    assert [(d.id, sorted(d.text.split("\n\n"))) for d in grouped] == [("r1", ["f2"]), ("r2", ["f1", "f3"])]
    # textbooks: chapters concatenated per book, in chapter order
    (tmp_path / "book.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"text": "ch3", "book": "B", "n": 3}, {"text": "ch1", "book": "B", "n": 1}, {"text": "ch2", "book": "B", "n": 2}]))
    (book,) = docs({"type": "files", "path": str(tmp_path / "book.jsonl"), "group_by": "book", "order_by": "n"}, "long")
    assert book.text == "ch1\n\nch2\n\nch3"


def test_hf_datasets_source_loads_through_datasets(tmp_path):
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(3)))
    domain = DomainConfig.model_validate({"kind": "short", "source": {
        "type": "hf", "name": "json", "data_files": str(tmp_path / "rows.jsonl")}})
    assert [d.text for d in iter_documents("web", domain, seed=0)] == ["row 0", "row 1", "row 2"]


@pytest.mark.parametrize("content, source_extra, message", [
    (None, {}, "does not exist or matches no files"),
    (b'{"text": "ok"}\n{"text": "\xff"}\n', {}, r"x.jsonl:2: invalid UTF-8"),
    (b'{"text": "ok"}\n{oops\n', {}, r"x.jsonl:2: not valid JSON"),
    (b'{"body": "ok"}\n', {}, r"x.jsonl:1: no text field 'text'"),
])
def test_bad_source_files_fail_with_one_line_naming_the_file(tmp_path, content, source_extra, message):
    path = tmp_path / "x.jsonl"
    if content is not None:
        path.write_bytes(content)
    domain = DomainConfig.model_validate({"kind": "short", "source": {"type": "files", "path": str(path), **source_extra}})
    with pytest.raises(DataError, match=message) as err:
        list(iter_documents("web", domain, seed=0))
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- tokenization and chats


def test_chat_mask_covers_assistant_turns_only():
    tok = DocumentTokenizer("builtin:tiny-bpe")
    from prolong.data.sources import Document

    messages = ({"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."},
                {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."})
    enc = tok.encode_chat(Document(id="c", messages=messages))
    trained = tok.tok.decode(enc.ids[enc.mask == 1].astype(np.int64))
    assert trained.replace("<|eot_id|>", "|") == "Four.|Six.|"
    assert "2+2" not in trained and enc.ids[-1] == tok.eos


def test_fallback_template_for_a_tokenizer_without_one(tmp_path):
    from transformers import AutoTokenizer

    from prolong import assets
    from prolong.data.sources import Document

    base = AutoTokenizer.from_pretrained(assets.resolve("builtin:tiny-bpe"))
    base.chat_template = None
    base.save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "chat_template.jinja").unlink(missing_ok=True)
    tok = DocumentTokenizer(str(tmp_path / "tok"))
    enc = tok.encode_chat(Document(id="c", messages=({"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"})))
    assert tok.tok.decode(enc.ids[enc.mask == 1].astype(np.int64)).strip() == "yo<|end_of_text|>"


def test_tokenizer_without_eos_is_rejected(tmp_path):
    from transformers import AutoTokenizer

    from prolong import assets

    t = AutoTokenizer.from_pretrained(assets.resolve("builtin:tiny-bpe"))
    t.eos_token = None
    t.save_pretrained(tmp_path / "noeos")
    with pytest.raises(DataError, match="has no EOS token"):
        DocumentTokenizer(str(tmp_path / "noeos"))


# ---------------------------------------------------------------- the data stage


def test_tiny_data_stage_writes_every_planned_stream_as_mds(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", ["stage1.steps=4", "stage2.steps=2", "sft.steps=2"])
    store = Store(str(tmp_path / "runs"))
    m = prepare(recipe, store, "t")
    plan = stream_plan(recipe)
    assert set(m.metrics["streams"]) == {k.name for k in plan}
    for key, need in plan.items():
        samples = read_stream(store.uri(stream_rel("t", key)), tmp_path / "cache" / key.name)
        assert len(samples) == need["samples"]
        for s in samples:
            ids, spans = np.asarray(s["input_ids"]), np.asarray(s["indices"]).reshape(-1, 2)
            assert ids.dtype == np.uint32 and len(ids) == key.seq_len and s["domain"] == key.domain
            assert spans[0, 0] == 0 and spans[-1, 1] == key.seq_len and (spans[1:, 0] == spans[:-1, 1]).all()
            assert ("mask" in s) == (key.domain == "chat")
    # the manifest lists every shard with its hash; MDS index files carry their own hashes too
    assert any(o["path"].endswith(".mds.zstd") for o in m.outputs)
    index = json.loads((store.local_path(stream_rel("t", StreamKey(512, "chat"))) / "index.json").read_text())
    assert index["shards"][0]["compression"] == "zstd" and "sha1" in index["shards"][0]["zip_data"]["hashes"]
    progress = store.read_json("t/data/progress.json")  # what the orchestrator showed while it ran
    domains = {k.domain for k in plan}
    assert (progress["state"], progress["unit"], progress["total"]) == ("finished", "domains", len(domains) + 1)


def test_a_domain_without_long_enough_documents_is_a_clear_error(tmp_path):
    path = tmp_path / "short.jsonl"
    path.write_text(json.dumps({"text": "too short"}) + "\n")
    raw = load_recipe(ROOT / "recipes" / "tiny.yaml").model_dump(mode="json")
    raw["data"]["domains"]["books"]["source"] = {"type": "files", "path": str(path)}
    store = Store(str(tmp_path / "runs"))
    with pytest.raises(DataError, match=r"data.domains.books: 0 documents have at least 512 tokens"):
        prepare(recipe_from_dict(raw), store, "t")
    assert not store.exists("t/data/manifest.json")


def test_data_stage_is_deterministic_and_reports_table14(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "tiny.yaml", ["stage1.steps=3", "stage2.steps=1", "sft.steps=1"])
    first = prepare(recipe, Store(str(tmp_path / "a")), "t")
    second = prepare(recipe, Store(str(tmp_path / "b")), "t")
    shards = lambda m: {o["path"]: o["sha256"] for o in m.outputs if "/shard." in o["path"]}  # noqa: E731
    assert shards(first) and shards(first) == shards(second)
    books = first.metrics["domains"]["books"]["lengths"]
    assert set(books["share_longer_than"]) == {"128", "256", "512", "1K"}
    assert books["documents"] > 0 and books["tokens"] == books["documents"] * books["mean_length"]
    report = Store(str(tmp_path / "a")).read_text("t/data/report/report.md")
    assert "| books | long |" in report and "Table 14" in report
    assert Store(str(tmp_path / "a")).read_bytes("t/data/report/doc_lengths.png")[:4] == b"\x89PNG"


def test_another_tokenizer_is_one_config_change(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast


    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator([f"word{i} " * 20 for i in range(200)], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path / "tok300")
    base = load_recipe(ROOT / "recipes" / "tiny.yaml", ["stage1.steps=2", "stage2.steps=1", "sft.steps=1"])
    other = load_recipe(ROOT / "recipes" / "tiny.yaml", ["stage1.steps=2", "stage2.steps=1", "sft.steps=1",
                                                         f"model.tokenizer={tmp_path / 'tok300'}"])
    assert base.stage("data").config_digest() != other.stage("data").config_digest()
    store = Store(str(tmp_path / "runs"))
    prepare(other, store, "t")
    ids = np.concatenate([np.asarray(s["input_ids"]) for s in
                          read_stream(store.uri(stream_rel("t", StreamKey(512, "shortmix"))), tmp_path / "c")])
    assert ids.max() < 302 and (ids == 0).any()  # the new vocabulary, BOS id 0 of the new tokenizer


def test_mixture_proportions_are_followed_within_sampling_error(tmp_path):
    from prolong.data.mds import StreamSource, mixture_dataset, write_stream
    from prolong.data.pack import Sample

    store = Store(str(tmp_path / "runs"))
    proportions = {"a": 0.5, "b": 0.3, "c": 0.2}
    keys = []
    for i, name in enumerate(proportions):
        key = StreamKey(8, name)
        rows = [Sample(input_ids=np.full(8, i, np.uint32), indices=np.array([[0, 8]]), domain=name) for _ in range(50)]
        write_stream(rows, Path(store.path(stream_rel("r", key))), sft=False, compression="zstd")
        keys.append(StreamSource(key.name, store.uri(stream_rel("r", key)), proportions[name]))
    ds = mixture_dataset(keys, cache_dir=tmp_path / "cache", seed=3, batch_size=1, epoch_size=1000)
    counts = {name: 0 for name in proportions}
    for s in ds:
        counts[s["domain"]] += 1
    assert sum(counts.values()) == 1000
    for name, p in proportions.items():  # 3 standard deviations of a binomial
        assert abs(counts[name] - 1000 * p) <= 3 * (1000 * p * (1 - p)) ** 0.5, counts


def test_longalpaca_rows_become_chats(tmp_path):
    path = tmp_path / "longalpaca.jsonl"
    path.write_text(json.dumps({"instruction": "Summarise the paper.", "output": "It trains long models."}) + "\n")
    domain = DomainConfig.model_validate({"kind": "sft", "source": {"type": "files", "path": str(path)}})
    (d,) = iter_documents("la", domain, seed=0)
    assert [m["role"] for m in d.messages] == ["user", "assistant"]
    enc = DocumentTokenizer("builtin:tiny-bpe").encode_chat(d)
    assert "It trains long models." in DocumentTokenizer("builtin:tiny-bpe").tok.decode(
        enc.ids[enc.mask == 1].astype(np.int64))
