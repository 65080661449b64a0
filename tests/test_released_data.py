"""ProLong's released data: packed MDS folders read in place (`kind: packed`), tokenized raw MDS as a
source (`type: mds`), on local folders and the S3 API server, and the recipe over the released folders.

The folders here are written by the tests with streaming's own MDSWriter in the formats the ProLong
code reads (uint32 `input_ids`, (n, 2) uint32 `indices`, `domain`, `length`, `mask`; zstd; a folder
of sub-folders with a merged index).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml

from prolong.data.mds import import_streaming
from prolong.data.packed import TOKENIZER_RECORD, run_packed_stage, tokenizer_signature
from prolong.errors import DataError
from prolong.manifest import read_manifest
from prolong.recipe import load_recipe, recipe_from_dict
from prolong.store import Store
from tests.conftest import prolong_cli
from tests.test_reliability import one_line_error

SEQ = 64
PACKED = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str", "length": "int32"}


def write_folder(out: Path, rows: list[dict], columns: dict = PACKED, *, compression: str | None = "zstd") -> Path:
    with import_streaming().MDSWriter(out=str(out), columns=columns, compression=compression, size_limit="16kb",
                                      progress_bar=False) as w:
        for row in rows:
            w.write(row)
    return out


def packed_rows(n: int, *, seed: int, seq: int = SEQ, vocab: int = 4096, docs: int = 2, mask: bool = False,
                domain: str = "d") -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        cuts = np.sort(rng.choice(np.arange(1, seq), docs - 1, replace=False)) if docs > 1 else np.array([], int)
        ends = np.append(cuts, seq)
        spans = np.stack([np.insert(ends[:-1], 0, 0), ends], axis=1).astype(np.uint32)
        row = {"input_ids": rng.integers(3, vocab, seq).astype(np.uint32), "indices": spans, "domain": domain,
               "length": np.int32(seq)}
        if mask:
            row["mask"] = (rng.random(seq) < 0.5).astype(np.uint8)
        rows.append(row)
    return rows


@pytest.fixture
def released(tmp_path) -> Path:
    """A released-style root: two domain folders (one of them two sub-folders merged) and an SFT folder."""
    root = tmp_path / "prolong-data"
    write_folder(root / "book-65536", packed_rows(40, seed=1, docs=1, domain="book-65536"))
    for i in range(2):
        write_folder(root / "thestackv1_concat_by_repo-65536" / f"part-{i}", packed_rows(30, seed=10 + i))
    import_streaming().base.util.merge_index(
        [str(root / "thestackv1_concat_by_repo-65536" / f"part-{i}" / "index.json") for i in range(2)],
        str(root / "thestackv1_concat_by_repo-65536"), keep_local=True)
    write_folder(root / "prolong-ultrachat-64K", packed_rows(40, seed=3, mask=True),
                 {**PACKED, "mask": "ndarray:uint8"})
    return root


def recipe_for(root: str, tiny_model_dir: str, *, storage_options: dict | None = None, copy: bool = False,
               mixture: dict | None = None):
    return recipe_from_dict({
        "name": "rel", "model": {"path": tiny_model_dir, "dtype": "float32", "attention": "sdpa"},
        "stages": {
            "released": {"kind": "packed", "root": root, "storage_options": storage_options or {}, "copy": copy},
            "stage1": {"kind": "train", "data_from": "released", "objective": "pretrain", "seq_len": SEQ,
                       "rope_theta": 8e6, "steps": 4, "batch_tokens": 4 * SEQ, "lr": 1e-3,
                       "activation_checkpointing": False,
                       "mixture": mixture or {"thestackv1_concat_by_repo-65536": 0.5, "book-65536": 0.5}},
            "sft": {"kind": "train", "data_from": "released", "objective": "sft", "seq_len": SEQ, "rope_theta": 8e6,
                    "steps": 2, "batch_tokens": 2 * SEQ, "lr": 1e-3, "activation_checkpointing": False,
                    "mixture": {"prolong-ultrachat-64K": 1.0}},
        },
        "jobs": {"backend": "local"}})


def publish(store: Store, recipe) -> None:
    from prolong.layout import run_recipe

    store.write_json_atomic(run_recipe("r"), recipe.model_dump(mode="json"))


def streamed(recipe, store: Store, stage: str, tmp_path: Path, n: int = 16) -> list[dict]:
    """What training reads: the stage's mixture through mixture_dataset, as the train job builds it."""
    from prolong.data.mds import mixture_dataset

    sources = recipe.stage("released").stream_sources(store, "r", stage)
    ds = mixture_dataset(sources, cache_dir=tmp_path / f"cache-{stage}", seed=1, batch_size=1, epoch_size=n)
    return list(ds)


# ---------------------------------------------------------------- packed folders, read in place


def test_packed_folders_are_checked_recorded_and_streamed_in_place(released, tiny_model_dir, tmp_path):
    from prolong.train.batch import collate

    store = Store(str(tmp_path / "runs"))
    recipe = recipe_for(str(released), tiny_model_dir)
    run_packed_stage(recipe, store, "r", "released")
    m = read_manifest(store, "r", "released")
    folders = store.read_json("r/released/folders.json")
    assert set(folders) == {"thestackv1_concat_by_repo-65536", "book-65536", "prolong-ultrachat-64K"}
    code = folders["thestackv1_concat_by_repo-65536"]
    assert code["samples"] == 60 and code["shards"] >= 2 and code["validate_hash"] is None
    assert code["uri"] == str(released / "thestackv1_concat_by_repo-65536")
    import hashlib

    index = (released / "thestackv1_concat_by_repo-65536" / "index.json").read_bytes()
    assert code["index_sha256"] == hashlib.sha256(index).hexdigest()
    assert m.metrics["samples"] == 140 and not store.exists("r/released/streams")  # nothing copied

    samples = streamed(recipe, store, "stage1", tmp_path)
    assert {s["domain"] for s in samples} == {"d", "book-65536"}
    batch = collate(samples[:4], SEQ)
    for s, lengths in zip(samples[:4], batch.doc_lengths):
        spans = np.asarray(s["indices"]).reshape(-1, 2)
        assert lengths == (spans[:, 1] - spans[:, 0]).tolist()
    # a document's first token is never a target: no prediction across a document boundary
    starts = np.cumsum([0] + batch.doc_lengths[0][:-1])
    assert all(batch.targets[0, s - 1] == -100 for s in starts[1:])
    chats = streamed(recipe, store, "sft", tmp_path, 2)
    sft = collate(chats, SEQ)
    for b, chat in enumerate(chats):  # a token off the mask is never a target
        off = np.asarray(chat["mask"])[1:] == 0
        assert (sft.targets[b, :-1].numpy()[off] == -100).all()
    assert (sft.targets >= 0).any()

    # released data re-uploaded under the same name after the check: refused before training
    shutil.copy(released / "book-65536" / "index.json", released / "thestackv1_concat_by_repo-65536" / "index.json")
    with pytest.raises(DataError, match=r"thestackv1_concat_by_repo-65536/index.json changed since the released "
                                        r"stage checked it; re-run the released stage with --from-stage released"):
        recipe.stage("released").verify_streams(store, "r", "stage1")


def test_a_folder_without_indices_is_one_document_per_sample(tmp_path, tiny_model_dir):
    from prolong.train.batch import collate

    root = tmp_path / "root"
    rows = [{k: v for k, v in r.items() if k != "indices"} for r in packed_rows(8, seed=5)]
    write_folder(root / "textbooks", rows, {k: v for k, v in PACKED.items() if k != "indices"})
    recipe = recipe_for(str(root), tiny_model_dir, mixture={"textbooks": 1.0})
    recipe = recipe_from_dict({**recipe.model_dump(mode="json"),
                               "stages": {k: v for k, v in recipe.model_dump(mode="json")["stages"].items()
                                          if k != "sft"}})
    store = Store(str(tmp_path / "runs"))
    run_packed_stage(recipe, store, "r", "released")
    assert collate(streamed(recipe, store, "stage1", tmp_path, 2), SEQ).doc_lengths == [[SEQ], [SEQ]]


def test_packed_folders_on_s3_with_requester_pays_and_a_copy_into_the_store(released, tiny_model_dir, tmp_path,
                                                                            s3_store):
    import fsspec

    fs = fsspec.filesystem("s3", client_kwargs={"endpoint_url": __import__("os").environ["S3_ENDPOINT_URL"]})
    bucket = s3_store.split("/")[2]
    fs.put(str(released), f"{bucket}/princeton-prolong/prolong-data", recursive=True)
    root = f"s3://{bucket}/princeton-prolong/prolong-data"
    for copy in (False, True):
        store = Store(str(tmp_path / f"runs-{copy}"))
        recipe = recipe_for(root, tiny_model_dir, storage_options={"requester_pays": True}, copy=copy)
        recipe.stage("released").check(None, set())  # the preflight reaches the bucket with the recipe's options
        run_packed_stage(recipe, store, "r", "released")
        folders = store.read_json("r/released/folders.json")
        assert folders["book-65536"]["uri"] == f"{root}/book-65536"
        samples = streamed(recipe, store, "stage1", tmp_path / f"c{copy}")
        assert len(samples) == 16 and all(len(s["input_ids"]) == SEQ for s in samples)
        copied = [o["path"] for o in read_manifest(store, "r", "released").outputs if o["path"].startswith("streams/")]
        if copy:  # every shard and index, in the manifest with its hash; training reads the store's copy
            assert "streams/thestackv1_concat_by_repo-65536/index.json" in copied
            assert any(p.startswith("streams/thestackv1_concat_by_repo-65536/part-1/shard.") for p in copied)
            assert recipe.stage("released").stream_sources(store, "r", "stage1")[0].uri.startswith(str(tmp_path))
        else:
            assert copied == []


@pytest.mark.parametrize("case", ["no input_ids", "float ids", "length", "vocabulary", "no mask", "tokenizer",
                                  "no index"])
def test_bad_packed_folders_are_one_line_errors_before_training(case, released, tiny_model_dir, tmp_path):
    book = released / "book-65536"
    shutil.rmtree(book)
    rows = packed_rows(4, seed=7, docs=1)
    columns, fail = dict(PACKED), None
    if case == "no input_ids":
        rows = [{"tokens": r["input_ids"], "domain": "x"} for r in rows]
        columns = {"tokens": "ndarray:uint32", "domain": "str"}
        fail = "book-65536 .*: shard 0 has no input_ids column \\(columns: domain, tokens\\)"
    elif case == "float ids":
        rows = [{**r, "input_ids": r["input_ids"].astype(np.float32)} for r in rows]
        columns["input_ids"] = "ndarray:float32"
        fail = "input_ids is ndarray:float32, not an integer array"
    elif case == "length":
        rows = packed_rows(4, seed=7, docs=1, seq=2 * SEQ)
        fail = f"sample 0 has {2 * SEQ} tokens, the stage trains on {SEQ}"
    elif case == "vocabulary":
        rows[-1]["input_ids"][5] = 128000  # a Llama-3 id in a 4096-token vocabulary
        fail = "sample 3 has token id 128000, outside the model's vocabulary of 4096"
    elif case == "no mask":
        shutil.rmtree(released / "prolong-ultrachat-64K")
        write_folder(released / "prolong-ultrachat-64K", packed_rows(4, seed=8))
        fail = "prolong-ultrachat-64K .*: an SFT stage reads it but it has no mask column"
    if case not in ("no index", "no mask"):
        write_folder(book, rows, columns)
    if case == "no mask":
        write_folder(book, rows)
    if case == "tokenizer":
        from transformers import AutoTokenizer

        sig = tokenizer_signature(AutoTokenizer.from_pretrained(tiny_model_dir))
        (book / TOKENIZER_RECORD).write_text(json.dumps({**sig, "vocab_size": 128256, "bos_token_id": 128000}))
        fail = "packed with another tokenizer \\(vocab_size, bos_token_id differ"
    store = Store(str(tmp_path / "runs"))
    recipe = recipe_for(str(released), tiny_model_dir)
    if case == "no index":  # before the run starts: the preflight
        with pytest.raises(DataError, match=r"^stage1.mixture.book-65536 \(under released.root\): .*book-65536/"
                                            r"index.json does not exist \(not an MDS folder\)$"):
            recipe.stage("released").check(None, set())
        return
    with pytest.raises(DataError, match=fail) as e:
        run_packed_stage(recipe, store, "r", "released")
    assert "\n" not in str(e.value) and not store.exists("r/released/manifest.json")


def test_a_recipe_over_a_bad_folder_fails_in_one_line_and_trains_nothing(released, tiny_model_dir, tmp_path,
                                                                         prefect_env):
    """Through the CLI: the packed stage's job refuses the folder; stage 1 never starts."""
    shutil.rmtree(released / "book-65536")
    write_folder(released / "book-65536", packed_rows(4, seed=7, docs=1, seq=2 * SEQ))
    recipe = tmp_path / "rel.yaml"
    recipe.write_text(yaml.safe_dump(recipe_for(str(released), tiny_model_dir).model_dump(mode="json")))
    store = tmp_path / "runs"
    out = prolong_cli("run", str(recipe), "--store", str(store), env=prefect_env)
    one_line_error(out, DataError.exit_code, "book-65536", f"sample 0 has {2 * SEQ} tokens, the stage trains on {SEQ}")
    assert not (store / "rel" / "stage1").exists()


# ---------------------------------------------------------------- raw tokenized MDS as a source


def _raw_recipe(source: dict, tiny_model_dir: str):
    base = load_recipe("recipes/tiny.yaml").model_dump(mode="json")
    base["model"]["tokenizer"] = tiny_model_dir
    base["data"]["domains"] = {"books": {"kind": "long", "source": source}}
    stage1 = {**base["stages"]["stage1"], "mixture": {"books": 1.0}, "steps": 4}
    base["stages"] = {"data": {"kind": "data"}, "stage1": stage1}
    return recipe_from_dict(base)


def test_raw_tokenized_documents_pack_exactly_as_the_same_text_does(tmp_path, tiny_model_dir):
    """ProLong's data_before_packing: ids without BOS/EOS, packed by our rules with no tokenizer pass —
    the streams are byte for byte those of the same documents given as text."""
    from transformers import AutoTokenizer

    from prolong import assets
    from prolong.data.prepare import prepare

    books = Path(assets.resolve("builtin:tiny-corpus/books.jsonl"))
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = [json.loads(x)["text"] for x in books.read_text().splitlines() if x.strip()]
    raw = write_folder(tmp_path / "data_before_packing" / "books", [
        {"domain": "books", "input_ids": np.asarray(tok(t, add_special_tokens=False)["input_ids"], np.uint32),
         "length": np.int32(len(tok(t, add_special_tokens=False)["input_ids"]))} for t in texts],
        {"domain": "str", "input_ids": "ndarray:uint32", "length": "int32"})
    digests = {}
    for name, source in (("text", {"type": "files", "path": str(books)}), ("raw", {"type": "mds", "path": str(raw)})):
        store = Store(str(tmp_path / name))
        m = prepare(_raw_recipe(source, tiny_model_dir), store, "r")
        digests[name] = {o["path"]: o["sha256"] for o in m.outputs if o["path"].startswith("streams/")}
    assert digests["raw"] == digests["text"] and len(digests["raw"]) >= 2

    bad = write_folder(tmp_path / "other-tokenizer", [{"domain": "b", "input_ids": np.array([5, 128000, 9], np.uint32),
                                                       "length": np.int32(3)}],
                       {"domain": "str", "input_ids": "ndarray:uint32", "length": "int32"})
    with pytest.raises(DataError, match=r"other-tokenizer#0: token id 128000 is outside the vocabulary of .* \(4096 "
                                        r"tokens\); the documents were tokenized with another tokenizer$"):
        prepare(_raw_recipe({"type": "mds", "path": str(bad)}, tiny_model_dir), Store(str(tmp_path / "bad")), "r")
    with_bos = write_folder(tmp_path / "with-bos", [{"domain": "b", "input_ids": np.array(
        [tok.bos_token_id, 5, 9], np.uint32), "length": np.int32(3)}], {"domain": "str", "input_ids": "ndarray:uint32",
                                                                        "length": "int32"})
    with pytest.raises(DataError, match=r"the document already has BOS/EOS ids"):
        prepare(_raw_recipe({"type": "mds", "path": str(with_bos)}, tiny_model_dir), Store(str(tmp_path / "b2")), "r")


def test_credentials_in_storage_options_are_refused_at_validation(tiny_model_dir):
    with pytest.raises(Exception, match=r"storage_options.secret: looks like a credential"):
        recipe_for("s3://bucket/x", tiny_model_dir, storage_options={"secret": "abc"})


# ---------------------------------------------------------------- the recipe over the released folders


def test_prolong_8b_released_names_the_scripts_folders_and_trains_as_prolong_8b():
    released, original = load_recipe("recipes/prolong-8b-released.yaml"), load_recipe("recipes/prolong-8b.yaml")
    assert released.stage("released_64k").cfg.root == "hf://datasets/princeton-nlp/prolong-data-64K"
    assert released.stage("released_512k").cfg.root == "hf://datasets/princeton-nlp/prolong-data-512K"
    short = {"fineweb-edu": 0.1, "fineweb-2023-50": 0.1, "stackexchange": 0.04, "dolmawiki": 0.04, "tuluv2": 0.03,
             "arxiv": 0.03, "openwebmath": 0.03}
    assert released.train_stage("stage1").mixture == {"thestackv1_concat_by_repo-65536": 0.3, "book-65536": 0.3,
                                                      **short, "textbooks": 0.03}
    assert released.train_stage("stage2").mixture == {
        "thestackv1_concat_by_repo-524288": 0.15, "thestackv1_concat_by_repo-65536": 0.15, "book-524288": 0.05,
        "book-65536": 0.25, **short, "textbooks": 0.03}
    assert released.train_stage("sft").mixture == {"prolong-ultrachat-64K": 1.0}
    assert [released.train_stage(s).data_from for s in ("stage1", "stage2", "sft")] == \
        ["released_64k", "released_512k", "released_sft"]
    for stage in ("stage1", "stage2", "sft"):
        a = released.train_stage(stage).model_dump(exclude={"mixture", "data_from"})
        b = original.train_stage(stage).model_dump(exclude={"mixture", "data_from"})
        assert a == b, stage
    assert released.model == original.model and released.jobs == original.jobs
    assert released.stage("eval").cfg == original.stage("eval").cfg
    assert released.stage("export").cfg == original.stage("export").cfg
    assert "data" not in released.stages and released.data is None  # no data preparation step


def test_the_tiny_released_recipe_trains_stage1_and_sft_straight_from_packed_folders(tmp_path, prefect_env):
    store = Store(str(tmp_path / "runs"))
    cache = tmp_path / "stream-cache"
    out = prolong_cli("run", "recipes/tiny-released.yaml", "--store", store.url, "--set", "stage1.steps=8",
                      "--set", "sft.steps=4", "--stages", "released,released_sft,stage1,sft",
                      "--set", f"jobs.stream_cache={{dir: {cache}, limit: 2gb}}", env=prefect_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert cache.is_dir() and not any(cache.iterdir())  # shards cached there while training, removed after
    for stage in ("released", "released_sft"):  # checked and recorded, nothing copied, no data preparation
        m = read_manifest(store, "tiny-released", stage)
        assert m.metrics["samples"] > 0 and not any(o["path"].startswith("streams/") for o in m.outputs)
    s1, sft = (read_manifest(store, "tiny-released", s) for s in ("stage1", "sft"))
    assert s1.metrics["steps"] == 8 and s1.metrics["loss_last10"] < s1.metrics["loss_first"]
    assert sft.metrics["steps"] == 4 and sft.upstream.keys() >= {"released_sft", "stage1"}


def test_hf_folders_are_pinned_to_a_commit_in_huggingface_hubs_fsspec_syntax():
    """(Resolving a branch to its commit asks the hub, which these machines cannot reach.)"""
    from prolong.data.packed import _pinned
    from prolong.data.remote import with_revision

    sha = "0123456789abcdef0123456789abcdef01234567"
    assert _pinned("hf://datasets/princeton-nlp/prolong-data-64K/book-65536", sha) == (
        f"hf://datasets/princeton-nlp/prolong-data-64K@{sha}/book-65536", sha)
    recipe = load_recipe("recipes/prolong-8b-released.yaml")
    assert recipe.stage("released_sft").folder_uri("prolong-ultrachat-64K", sha) == \
        f"hf://datasets/princeton-nlp/prolong-ultrachat-64K@{sha}"
    assert recipe.stage("released_512k").folder_uri("book-524288") == \
        "hf://datasets/princeton-nlp/prolong-data-512K@main/book-524288"
    with pytest.raises(DataError, match="pins a revision already"):
        with_revision("hf://datasets/a/b@main/x", sha)
    assert _pinned("s3://bucket/prolong-data-64K/book-65536", "main") == ("s3://bucket/prolong-data-64K/book-65536",
                                                                         "main")
