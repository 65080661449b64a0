"""``builtin:tiny-prolong-mds``: the tiny corpus in the layout and formats of ProLong's released data.

The released data the ProLong scripts train from, at the tiny recipe's scale (64K → 512 tokens):

* ``data-512/`` like ``princeton-nlp/prolong-data-64K``: one folder per domain, samples packed to
  512 tokens — ``books-512`` (single-document samples of long manuals), ``code-512`` (written in two
  sub-folders whose indexes are merged into one top-level index.json, as the large released domains
  are), ``shortmix`` (short documents packed together) and ``textbooks`` (no ``indices`` column:
  each sample is one document);
* ``ultrachat-512/`` like ``prolong-ultrachat-64K``: chats packed to 512 tokens with a ``mask``;
* ``raw/books/`` like ``data_before_packing/books``: one tokenized document per sample, no BOS/EOS.

Columns as the ProLong code reads them: ``input_ids`` uint32, ``indices`` uint32 (n, 2) half-open
spans, ``domain`` str, ``length`` int32 (+ ``mask`` uint8 for SFT); zstd shards, no shard hashes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

SEQ_LEN = 512
PACKED = {"input_ids": "ndarray:uint32", "indices": "ndarray:uint32", "domain": "str", "length": "int32"}
SHARD = "64kb"  # several shards per folder even at this scale


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write(out: Path, columns: dict, rows) -> int:
    from prolong.data.mds import import_streaming

    n = 0
    with import_streaming().MDSWriter(out=str(out), columns=columns, compression="zstd", size_limit=SHARD,
                                      progress_bar=False) as writer:
        for row in rows:
            writer.write(row)
            n += 1
    return n


def _packed_rows(samples, domain: str, *, spans: bool = True, mask: bool = False):
    for s in samples:
        row = {"input_ids": s.input_ids.astype(np.uint32), "domain": domain, "length": np.int32(len(s.input_ids))}
        if spans:
            row["indices"] = s.indices.astype(np.uint32)
        if mask:
            row["mask"] = s.mask.astype(np.uint8)
        yield row


def build(out: Path, final: Path, deps: dict[str, Path]) -> None:
    from prolong.data.pack import long_pieces, pack_concatenated, pack_long
    from prolong.data.sources import Document
    from prolong.data.tokenize import DocumentTokenizer
    from prolong.data.mds import import_streaming

    corpus = deps["tiny-corpus"]
    tok = DocumentTokenizer(str(deps["tiny-bpe"]))
    books = tok.encode_texts([r["text"] for r in _rows(corpus / "books.jsonl")])
    short = tok.encode_texts([r["text"] for r in _rows(corpus / "short.jsonl")])
    chats = [tok.encode_chat(Document(id=str(i), messages=tuple(r["messages"])))
             for i, r in enumerate(_rows(corpus / "chat.jsonl"))]
    root = out / "data-512"

    long = list(pack_long(list(long_pieces(books, SEQ_LEN)), SEQ_LEN, SEQ_LEN, "books", seed=1))
    _write(root / "books-512", PACKED, _packed_rows(long, "book-65536"))
    # code: the short documents' larger half cut into 256-token pieces, two to a sample, written in
    # two parts whose indexes are merged (streaming's merge_index) as the released 512K folders are
    code = list(pack_long(list(long_pieces(short, SEQ_LEN // 2)), SEQ_LEN // 2, SEQ_LEN, "code", seed=2))
    half = len(code) // 2
    for i, part in enumerate((code[:half], code[half:])):
        _write(root / "code-512" / f"part-{i}", PACKED, _packed_rows(part, "thestackv1_concat_by_repo-65536"))
    import_streaming().base.util.merge_index(
        [str(root / "code-512" / f"part-{i}" / "index.json") for i in range(2)], str(root / "code-512"),
        keep_local=True)
    mix = list(pack_concatenated(iter(short), SEQ_LEN, "shortmix", carry_over=True))
    _write(root / "shortmix", PACKED, _packed_rows(mix, "fineweb-edu"))
    no_spans = {k: v for k, v in PACKED.items() if k != "indices"}
    _write(root / "textbooks", no_spans, _packed_rows(long[::-1], "textbooks", spans=False))

    sft = list(pack_concatenated(iter(chats), SEQ_LEN, "ultrachat", carry_over=False))
    _write(out / "ultrachat-512", {**PACKED, "mask": "ndarray:uint8"}, _packed_rows(sft, "ultrachat", mask=True))

    body = slice(1 if tok.bos is not None else 0, -1)  # the released raw documents carry no BOS/EOS
    raw = ({"domain": "books", "input_ids": d.ids[body].astype(np.uint32), "length": np.int32(len(d.ids[body]))}
           for d in books)
    _write(out / "raw" / "books", {"domain": "str", "input_ids": "ndarray:uint32", "length": "int32"}, raw)
