"""The data stage: sources → tokenize → filter → pack → MDS streams in the store → manifest.

Which streams to write, and how many samples each, follows from the training stages' mixtures:
a stage of ``steps`` optimizer steps over ``batch_tokens / seq_len`` sequences reads
``proportion × steps × sequences`` samples of each of its streams (times ``data.oversample``).
A long domain used at several document lengths in one stage (stage 2: code repos at 512K and
64K) assigns each document to one length only, longest first, so the 64K documents packed to
512K are distinct from the 512K documents (§A.2).
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from prolong import layout
from prolong.recipe import Recipe
from prolong.data.mds import StreamKey, stage_streams, write_stream
from prolong.data.pack import TokenizedDoc, long_pieces, pack_concatenated, pack_long
from prolong.data.report import histogram_png, length_stats, report_markdown
from prolong.data.sources import Document, iter_documents
from prolong.data.tokenize import DocumentTokenizer
from prolong.errors import DataError
from prolong.manifest import StageRecorder
from prolong.progress import StageProgress
from prolong.store import Store

log = logging.getLogger(__name__)
# Documents are tokenized in batches of about this many characters: large enough to keep every
# core of the Rust tokenizer busy, small enough that a capped stream does not tokenize far ahead.
BATCH_CHARS = 1 << 23


def stream_plan(recipe: Recipe, data_stage: str = "data") -> dict[StreamKey, dict]:
    """Every stream the training stages that read ``data_stage`` need → samples needed and which
    stages read it."""
    plan: dict[StreamKey, dict] = {}
    for stage in recipe.stage(data_stage).readers():
        cfg = recipe.train_stage(stage)
        sequences = cfg.steps * cfg.global_batch_size
        for key, proportion in stage_streams(recipe, stage):
            need = math.ceil(sequences * proportion * recipe.data.oversample)
            entry = plan.setdefault(key, {"samples": 0, "stages": []})
            entry["samples"] = max(entry["samples"], need)
            entry["stages"].append(stage)
    return plan


def _shuffled_documents(name: str, recipe: Recipe) -> list[Document]:
    docs = list(iter_documents(name, recipe.data.domains[name], recipe.data.seed))
    if not docs:
        raise DataError(f"data.domains.{name}: the source yielded no documents")
    random.Random(f"{recipe.data.seed}:{name}").shuffle(docs)  # "randomly sample and concatenate" (§A.2)
    return docs


def _tokenized(docs: list[Document], tok: DocumentTokenizer, sft: bool, workers: int = 0,
               on_fraction: Callable[[float], None] | None = None) -> Iterator[TokenizedDoc]:
    """Documents in order; ``on_fraction`` hears the share of ``docs`` tokenized so far."""
    for i, doc in enumerate(_encoded(docs, tok, sft, workers), 1):
        if on_fraction is not None and i % 256 == 0:
            on_fraction(i / len(docs))
        yield doc


def _encoded(docs: list[Document], tok: DocumentTokenizer, sft: bool, workers: int) -> Iterator[TokenizedDoc]:
    if sft:
        yield from tok.encode_chats(docs, workers)
        return
    start = 0
    while start < len(docs):
        end, chars = start, 0
        while end < len(docs) and (end == start or chars < BATCH_CHARS):
            chars += len(docs[end].text or "")
            end += 1
        batch = docs[start:end]
        start = end
        texts = iter(tok.encode_texts([d.text for d in batch if d.messages is None and d.ids is None]))
        for d in batch:  # chats in a text domain are rendered with the chat template, trained on in full
            if d.ids is not None:
                yield tok.encode_ids(d)
            else:
                yield TokenizedDoc(ids=tok.encode_chat(d).ids) if d.messages is not None else next(texts)


def _long_streams(name: str, keys: list[StreamKey], plan, docs, tok, seed: int,
                  on_fraction: Callable[[float], None] | None = None) -> dict[StreamKey, list]:
    """Cut long documents into pieces for each stream of this domain.

    Within one stage length a document feeds one stream only (distinct 64K/512K documents, §A.2):
    each document goes to the stream, among those it is long enough for, that is furthest below its
    need. Pieces are then drawn round-robin across a stream's documents, so a capped stream still
    samples many documents instead of exhausting the first large one.
    """
    tokenized = list(_tokenized(docs, tok, sft=False, on_fraction=on_fraction))
    wanted = {k: plan[k]["samples"] * (k.seq_len // k.doc_len) for k in keys}
    by_seq: dict[int, list[StreamKey]] = defaultdict(list)
    for k in keys:
        by_seq[k.seq_len].append(k)
    assigned: dict[StreamKey, list[TokenizedDoc]] = {k: [] for k in keys}
    for group in by_seq.values():
        supply = {k: 0 for k in group}
        for doc in tokenized:
            fits = [k for k in group if len(doc.ids) >= k.doc_len]
            if fits:
                k = min(fits, key=lambda k: (supply[k] / wanted[k], -k.doc_len))
                assigned[k].append(doc)
                supply[k] += len(doc.ids) // k.doc_len
    out = {}
    rng = random.Random(seed)
    for k in keys:
        per_doc = [list(long_pieces([d], k.doc_len)) for d in assigned[k]]
        for pieces in per_doc:
            rng.shuffle(pieces)
        chosen = [p for round_ in itertools.zip_longest(*per_doc) for p in round_ if p is not None][:wanted[k]]
        if len(chosen) < k.seq_len // k.doc_len:
            raise DataError(f"data.domains.{name}: {len(assigned[k])} documents have at least {k.doc_len} tokens, "
                            f"too few for one sample of stream {k.name}")
        out[k] = list(pack_long(chosen, k.doc_len, k.seq_len, name, seed))
    return out


def _concatenated_streams(name, keys, plan, docs, tok, sft: bool, workers: int,
                          on_fraction: Callable[[float], None] | None = None) -> dict[StreamKey, list]:
    out = {}
    for i, k in enumerate(keys):
        def per_stream(f: float, i: int = i) -> None:
            if on_fraction is not None:
                on_fraction((i + f) / len(keys))

        samples = []
        for s in pack_concatenated(_tokenized(docs, tok, sft, workers, per_stream), k.seq_len, name,
                                   carry_over=not sft):
            samples.append(s)
            if len(samples) >= plan[k]["samples"]:
                break
        if not samples:
            raise DataError(f"data.domains.{name}: not enough tokens for one {k.seq_len}-token sample (stream {k.name})")
        out[k] = samples
    return out


def _domain(recipe: Recipe, name: str, keys: list[StreamKey], plan, tok, out: Path, progress: StageProgress,
            unit: float, units: float) -> tuple[dict, dict, np.ndarray]:
    """One domain: read, tokenize, filter and pack it, and write its streams under ``out``; returns
    (its streams' metrics, the domain's, its document lengths). ``unit``..``unit + units`` is its
    share of the stage's progress."""
    kind = recipe.data.domains[name].kind
    log.info("domain %s (%s): reading", name, kind)
    progress.update(unit, phase=f"{name}: reading")
    docs = _shuffled_documents(name, recipe)
    progress.update(phase=f"{name}: tokenizing {len(docs)} documents")

    def tokenized(f: float) -> None:
        progress.update(unit + 0.8 * units * f)

    if kind == "long":
        samples = _long_streams(name, keys, plan, docs, tok, recipe.data.seed, tokenized)
    else:
        samples = _concatenated_streams(name, keys, plan, docs, tok, sft=kind == "sft",
                                        workers=recipe.data.num_workers, on_fraction=tokenized)
    progress.update(unit + 0.8 * units, phase=f"{name}: writing {len(samples)} streams")
    streams, seen = {}, []
    for s_i, (key, rows) in enumerate(samples.items(), 1):
        counts, doc_lengths = write_stream(rows, out / key.name, sft=kind == "sft", compression=recipe.data.compression)
        progress.update(unit + (0.8 + 0.2 * s_i / len(samples)) * units)
        seen.append(doc_lengths)
        if counts["samples"] < plan[key]["samples"]:
            log.warning("stream %s: %d samples, %d wanted; training will repeat them", key.name,
                        counts["samples"], plan[key]["samples"])
        streams[key.name] = {"seq_len": key.seq_len, "domain": name, "doc_len": key.doc_len,
                             "wanted": plan[key]["samples"], "stages": plan[key]["stages"], **counts}
        log.info("stream %s: %d samples, %d tokens", key.name, counts["samples"], counts["tokens"])
    lengths = np.concatenate(seen)
    domain = {"kind": kind, "source_documents": len(docs),
              "lengths": length_stats(lengths, recipe.data.report_thresholds)}
    return streams, domain, lengths


def _by_domain(recipe: Recipe, stage: str) -> tuple[dict, dict[str, list[StreamKey]]]:
    plan = stream_plan(recipe, stage)
    by_domain: dict[str, list[StreamKey]] = defaultdict(list)
    for key in sorted(plan):
        by_domain[key.domain].append(key)
    return plan, dict(by_domain)


def _finish(rec: StageRecorder, run: str, recipe: Recipe, streams: dict, domains: dict, lengths_by_domain: dict,
            tmp: Path):
    """The report (from every domain's document lengths) and the manifest, written last."""
    histogram_png(lengths_by_domain, tmp / "doc_lengths.png")
    rec.put_file(tmp / "doc_lengths.png", "report/doc_lengths.png")
    report = report_markdown(run, domains, streams, recipe.data.report_thresholds, "report/doc_lengths.png")
    (tmp / "report.md").write_text(report)
    rec.put_file(tmp / "report.md", "report/report.md")
    totals = {"samples": sum(s["samples"] for s in streams.values()), "tokens": sum(s["tokens"] for s in streams.values())}
    return rec.finish(metrics={"streams": streams, "domains": domains, **totals},
                      artifacts={"streams": {k: layout.stream(k) for k in streams}, "report": "report/report.md",
                                 "histogram": "report/doc_lengths.png"})


def prepare(recipe: Recipe, store: Store, run: str, stage: str = "data", *extra: str, workdir: Path | None = None):
    """The data stage's job: all of it (no ``extra``), one domain of it (``part DOMAIN``), or the
    merge of its finished parts (``merge``) — the last two when the stage runs as parts."""
    if extra[:1] == ("part",) and len(extra) == 2:
        return _prepare_part(recipe, store, run, stage, extra[1], workdir)
    if extra == ("merge",):
        return _merge_parts(recipe, store, run, stage, workdir)
    if extra:
        raise DataError(f"{stage}: unknown job arguments {' '.join(extra)} (part DOMAIN, or merge)")
    rec = StageRecorder(store, run, recipe, stage)
    rec.invalidate()
    plan, by_domain = _by_domain(recipe, stage)
    streams, domains, lengths_by_domain = {}, {}, {}
    # one unit per domain (reading and tokenizing 80% of it, writing its streams the rest) + the upload
    progress = StageProgress(store, layout.progress(rec.prefix), stage, total=len(by_domain) + 1, unit="domains")
    tok = DocumentTokenizer(recipe.model.tokenizer_path, recipe.model.revision)
    with tempfile.TemporaryDirectory(prefix="prolong-data-", dir=workdir) as tmp_:
        tmp = Path(tmp_)
        # Every stream is written locally first; nothing reaches the store unless all domains succeed.
        for d_i, (name, keys) in enumerate(by_domain.items()):
            got, domains[name], lengths_by_domain[name] = _domain(recipe, name, keys, plan, tok, tmp, progress, d_i, 1)
            streams.update(got)
        progress.update(len(by_domain), phase="uploading streams and report")
        for name in streams:
            rec.put_dir(tmp / name, layout.stream(name), move=True)
        manifest = _finish(rec, run, recipe, streams, domains, lengths_by_domain, tmp)
    progress.finish()
    return manifest


LENGTHS = "doc_lengths.npy"  # a part's document lengths, for the merged report


def _prepare_part(recipe: Recipe, store: Store, run: str, stage: str, name: str, workdir: Path | None):
    """One domain of a data stage run as parts: its streams and document lengths under its part folder."""
    plan, by_domain = _by_domain(recipe, stage)
    if name not in by_domain:
        raise DataError(f"{stage}: no part {name!r} (parts: {', '.join(by_domain)})")
    rec = StageRecorder(store, run, recipe, stage, prefix=layout.part_prefix(run, stage, name))
    rec.invalidate()
    store.delete(rec.rel(layout.stream("")).rstrip("/"))  # an earlier attempt's, for other inputs
    progress = StageProgress(store, layout.progress(rec.prefix), f"{stage}[{name}]", total=1, unit="domain")
    tok = DocumentTokenizer(recipe.model.tokenizer_path, recipe.model.revision)
    with tempfile.TemporaryDirectory(prefix=f"prolong-data-{name}-", dir=workdir) as tmp_:
        tmp = Path(tmp_)
        streams, domain, lengths = _domain(recipe, name, by_domain[name], plan, tok, tmp / "streams", progress, 0, 1)
        progress.update(1, phase="uploading streams")
        for stream in streams:
            rec.put_dir(tmp / "streams" / stream, layout.stream(stream), move=True)
        np.save(tmp / LENGTHS, lengths)
        rec.put_file(tmp / LENGTHS, LENGTHS)
        manifest = rec.finish(metrics={"streams": streams, "domain": domain},
                              artifacts={"streams": {k: layout.stream(k) for k in streams}, "lengths": LENGTHS})
    progress.finish()
    return manifest


def _merge_parts(recipe: Recipe, store: Store, run: str, stage: str, workdir: Path | None):
    """Every part's streams into the stage's folder (moved, with the hashes the parts recorded), the
    report from all parts' document lengths, and the stage's manifest: the same files as one job."""
    from prolong.manifest import FileEntry, read_manifest_at

    rec = StageRecorder(store, run, recipe, stage)
    rec.invalidate()
    _, by_domain = _by_domain(recipe, stage)
    parts = {}
    for name in by_domain:
        m = read_manifest_at(store, layout.part_prefix(run, stage, name))
        if m is None or m.input_key != rec.input_key:
            raise DataError(f"{stage}: part {name} has not finished for these inputs; run the stage again")
        parts[name] = m
    streams, domains, lengths_by_domain = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="prolong-data-merge-", dir=workdir) as tmp_:
        tmp = Path(tmp_)
        for name, m in parts.items():
            prefix = layout.part_prefix(run, stage, name)
            if store.exists(f"{prefix}/{layout.LOGS}"):  # the part's job logs stay with the stage
                store.move(f"{prefix}/{layout.LOGS}", rec.rel(f"{layout.LOGS}/{name}"))
            with store.open(f"{prefix}/{LENGTHS}", "rb") as f:
                lengths_by_domain[name] = np.load(f)
            domains[name] = m.metrics["domain"]
            streams.update(m.metrics["streams"])
            for stream, sub in m.artifacts["streams"].items():
                if store.exists(f"{prefix}/{sub}"):  # a merge that failed after moving some: moved already
                    store.move(f"{prefix}/{sub}", rec.rel(sub))
                rec.record([FileEntry(path=o["path"], bytes=o["bytes"], sha256=o["sha256"]) for o in m.outputs
                            if o["path"].startswith(f"{sub}/")])
        manifest = _finish(rec, run, recipe, streams, domains, lengths_by_domain, tmp)
    store.delete(layout.parts_prefix(run, stage))
    parent = layout.parts_prefix(run, stage).rsplit("/", 1)[0]
    if store.is_local and not store.list(parent):
        store.delete(parent)  # an empty folder (object stores have none)
    return manifest
