"""An evaluation stage as a job: HELMET's categories, synthetic recall, long-document perplexity,
loss by token position and lm-eval short tasks on the model of one stage (``model_from``); passkey
and perplexity also as LongLoRA's scripts measure them.

Writes ``items.jsonl`` (every prompt's prediction and score), ``results.json``, ``results.md`` (the
table shown in the Prefect UI) and PNG charts into the stage's folder, then the manifest. Greedy
decoding throughout; scores are 0-100.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from pathlib import Path

from prolong.config import DomainConfig, FileSource
from prolong.recipe import Recipe, recipe_from_dict
from prolong.errors import ConfigError, DataError, StageError
from prolong.eval.backends import generator
from prolong.eval import report
from prolong.eval.synthetic import passkey as synthetic
from prolong.eval.helmet.run import run_helmet
from prolong.eval.synthetic.json_kv import make_examples
from prolong.eval.synthetic.json_kv import score as json_kv_score
from prolong.eval.metrics import substring_exact_match
from prolong.eval.likelihood import (long_document_loss, loss_by_position, sliding_window_perplexity, token_stream,
                                     window_starts)
from prolong.eval.short_tasks import run_lm_eval
from prolong.eval.prompts import GenerationFailed
from prolong import layout
from prolong.layout import stage_prefix
from prolong.manifest import StageRecorder, read_manifest
from prolong.parallel.world import init_world
from prolong.progress import StageProgress
from prolong.store import Store

log = logging.getLogger(__name__)


class EvalProgress:
    """Evaluation's ``progress.json`` (prolong.progress) in parts: one per task and length (HELMET:
    per dataset and length), one for perplexity and one per lm-eval shot count — known up front,
    unlike the number of items, which HELMET's lazily built datasets only tell as they go."""

    def __init__(self, store, rel: str, cfg, stage: str):
        parts = [(name, L) for name in ("json_kv", "passkey", "needle") if getattr(cfg, name) is not None
                 for L in cfg.lengths_of(getattr(cfg, name))]
        if cfg.helmet is not None:
            parts += [(ds, L) for L in cfg.lengths_of(cfg.helmet) for ds in cfg.helmet.datasets]
        if cfg.perplexity is not None:
            parts += [("perplexity", L) for L in cfg.perplexity.parts()]
        if cfg.position_loss is not None:
            parts.append(("position_loss", cfg.position_loss.length))
        if cfg.lm_eval is not None:
            parts += [("lm-eval", shots) for shots in sorted({cfg.lm_eval.shots(t) for t in cfg.lm_eval.tasks})]
        self.started: list[tuple] = []
        self.items = 0
        self.progress = StageProgress(store, rel, stage, total=len(parts), unit="parts")
        self.progress.update(0, phase="loading the model", force=True)

    def item(self, task: str, length: int) -> None:
        """Called before each item of ``task`` at ``length`` tokens."""
        if (task, length) not in self.started:
            self.started.append((task, length))
            self.items = 0
        self.items += 1
        self.progress.update(len(self.started) - 1, phase=f"{task} at {length} tokens, item {self.items}")

    def part(self, task: str, detail) -> None:
        """A part run as a whole (perplexity, one lm-eval call)."""
        self.started.append((task, detail))
        label = f"{detail}-shot" if task == "lm-eval" else f"{detail} tokens"
        self.progress.update(len(self.started) - 1, phase=f"{task} ({label})")

    def finish(self) -> None:
        self.progress.finish()


def _source_texts(source, where: str, seed: int):
    """Texts of a recipe source (files / hf), read by the data stage's own readers."""
    from prolong.data.sources import iter_documents

    return (d.text for d in iter_documents(where, DomainConfig(kind="long", source=source), seed, where=where)
            if d.text)


def _timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run_recall_and_synthetic(cfg, gen, tok, progress: EvalProgress | None = None) -> list[dict]:
    """JSON KV, passkey and needle items through the generator ``gen`` (prolong.eval.prompts)."""
    items = []

    def one(dataset: str, ex, max_new_tokens: int, score, special_tokens: bool = False, **fields) -> None:
        if progress is not None:
            progress.item(dataset, ex.length)
        try:
            (raw, n), secs = _timed(gen, ex.prompt, max_new_tokens, special_tokens=special_tokens)
        except GenerationFailed as e:  # failed, never 0
            items.append({"dataset": dataset, "length": ex.length, "depth": ex.depth, "answer": ex.answer,
                          "failed": True, "error": str(e), **fields})
            return
        items.append({"dataset": dataset, "length": ex.length, "depth": ex.depth, "input_tokens": n,
                      "answer": ex.answer, "prediction": raw.strip(), "score": 100 * score(raw, ex.answer),
                      "seconds": secs, **fields})

    if cfg.json_kv is not None:
        kv = cfg.json_kv
        # HELMET's recall configs prompt every model without the chat template; HELMET scores the raw output
        for ex in make_examples(tok, cfg.lengths_of(kv), kv.depths, kv.samples_per_depth, kv.max_new_tokens + 1,
                                kv.seed, use_chat_template=False):
            one("json_kv", ex, kv.max_new_tokens, json_kv_score, num_pairs=ex.num_pairs)
    if cfg.passkey is not None and cfg.passkey.style == "longlora":
        pk = cfg.passkey
        for ex in synthetic.longlora_passkey_examples(cfg.lengths_of(pk), pk.num_tests, pk.seed):
            # as passkey_retrivial.py: the tokenizer's own special tokens, as many new tokens as the key has
            one(ex.task, ex, synthetic.longlora_answer_tokens(tok, ex.answer), synthetic.longlora_passkey_score,
                special_tokens=True, filler_chars=synthetic.longlora_filler_chars(ex.length))
    elif cfg.passkey is not None:
        pk = cfg.passkey
        for ex in synthetic.passkey_examples(tok, cfg.lengths_of(pk), pk.depths, pk.samples_per_depth,
                                             pk.max_new_tokens + 1, pk.seed):
            one("passkey", ex, pk.max_new_tokens, lambda raw, answer: synthetic.passkey_score(raw.strip(), answer))
    if cfg.needle is not None:
        nd = cfg.needle
        haystack = "\n\n".join(_source_texts(FileSource(type="files", path=nd.haystack), "eval.needle.haystack", 0))
        for ex in synthetic.needle_examples(tok, haystack, cfg.lengths_of(nd), nd.depths, nd.max_new_tokens + 1):
            one("needle", ex, nd.max_new_tokens, lambda raw, answer: substring_exact_match(raw.strip(), answer))
    return items


def _likelihood(cfg, model, tok, seed: int, stage: str, device, progress: EvalProgress) -> dict:
    """Perplexity and loss by position (the hf backend: they need the model's logits)."""
    out = {}
    if cfg.perplexity is not None and cfg.perplexity.seq_lens is not None:
        docs = _source_texts(cfg.perplexity.source, f"{stage}.perplexity.source", seed)
        out["perplexity"] = _sliding_perplexity(cfg.perplexity, model, tok, docs, stage, device, progress)
    elif cfg.perplexity is not None:
        pc = cfg.perplexity
        progress.part("perplexity", pc.length)
        docs = _source_texts(pc.source, f"{stage}.perplexity.source", seed)
        out["perplexity"] = long_document_loss(model, tok, docs, length=pc.length, last=pc.last, max_docs=pc.max_docs,
                                               device=device)
    if cfg.position_loss is not None:
        pl = cfg.position_loss
        progress.part("position_loss", pl.length)
        docs = _source_texts(pl.source, f"{stage}.position_loss.source", seed)
        out["position_loss"] = loss_by_position(model, tok, docs, length=pl.length, buckets=pl.buckets,
                                                max_docs=pl.max_docs, device=device)
    return out


def _sliding_perplexity(pc, model, tok, docs, stage: str, device, progress: EvalProgress) -> dict:
    """LongLoRA's perplexity at every ``seq_len`` on one token stream (LongLoRA's Table 1: a column a length)."""
    stream, n_docs = token_stream(tok, docs, pc.max_docs)
    for seq_len in pc.seq_lens:  # before the first window: a stream too short for any length fails now
        if not window_starts(len(stream), seq_len, pc.sliding_window):
            raise DataError(f"{stage}.perplexity.seq_lens: {seq_len} needs more than {seq_len + pc.sliding_window} "
                            f"tokens of documents; {n_docs} documents of {stage}.perplexity.source give {len(stream)}")
    by_length = {}
    for seq_len in pc.seq_lens:
        progress.part("perplexity", seq_len)
        r = sliding_window_perplexity(model, stream, seq_len=seq_len, sliding_window=pc.sliding_window,
                                      batch_size=pc.batch_size, device=device)
        by_length[str(seq_len)] = {k: r[k] for k in ("windows", "loss", "perplexity")}
    return {"view": "sliding_window", "sliding_window": pc.sliding_window, "batch_size": pc.batch_size,
            "documents": n_docs, "tokens": len(stream), "by_length": by_length}


PARTIAL_ITEMS = f"{layout.LOGS}/partial-items.jsonl"


def _keep_for_inspection(rec: StageRecorder, tmp: Path, items: list[dict]) -> None:
    """A stopped evaluation's items (failed ones marked) and logs, under ``logs/``: kept even when
    the stage's earlier outputs are put back in place."""
    try:
        (tmp / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        rec.store.put_file(tmp / "items.jsonl", rec.rel(PARTIAL_ITEMS))
        for log_file in (tmp / "logs").iterdir():
            rec.store.put_file(log_file, rec.rel(f"{layout.LOGS}/{log_file.name}"))
    except Exception as e:  # the failure being raised matters more
        log.warning("could not keep the partial evaluation (%s)", e)


def _check_lengths(cfg, model, stage: str) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    tasks = [t for t in (cfg.json_kv, cfg.helmet, cfg.passkey, cfg.needle) if t is not None]
    longest = max((L for t in tasks for L in cfg.lengths_of(t)), default=0)
    if limit and longest > limit:
        raise ConfigError(f"{stage}.lengths: {longest} tokens is beyond the model's max_position_embeddings {limit}")
    if limit and cfg.perplexity is not None and cfg.perplexity.seq_lens and max(cfg.perplexity.seq_lens) > limit:
        raise ConfigError(f"{stage}.perplexity.seq_lens: {max(cfg.perplexity.seq_lens)} tokens is beyond the model's "
                          f"max_position_embeddings {limit}")


def run_eval_stage(recipe: Recipe, store: Store, run: str, stage: str = "eval", snapshot: str | None = None) -> None:
    """The eval stage on ``eval.model_from``'s weights; with ``snapshot`` (a folder written by
    prolong.snapshots, holding request.json) the same evaluation of another model, into that folder."""
    world = init_world()
    if not world.is_main:
        return  # evaluation runs on one process; extra ranks have nothing to do
    request = store.read_json(f"{snapshot}/request.json") if snapshot is not None else None
    if request is not None:
        recipe = recipe_from_dict(request["recipe"])
        stage = request.get("stage", request.get("eval_stage", stage))  # eval_stage: requests before 0.3
    cfg = recipe.stages[stage]
    if request is None:
        rec = StageRecorder(store, run, recipe, stage)
        model_stage = cfg.model_from
        rel = f"{stage_prefix(run, model_stage)}/{read_manifest(store, run, model_stage).artifacts['hf_model']}"
    else:
        rec = StageRecorder(store, run, recipe, stage, prefix=snapshot, upstream=request["upstream"])
        model_stage, rel = request["model_stage"], request["model"]
    seq_len = recipe.graph.trained_length(model_stage)
    rec.invalidate()
    progress = EvalProgress(store, layout.progress(rec.prefix), cfg, stage)
    with tempfile.TemporaryDirectory(prefix="prolong-eval-") as tmp_:
        tmp = Path(tmp_)
        model_dir = str(store.local_path(rel)) if store.is_local else str(store.get_dir(rel, tmp / "model"))
        items, extra = [], {}
        (tmp / "logs").mkdir()
        try:
            with generator(cfg, recipe, store, run, model_stage, rel, model_dir, tmp, world.device, tmp / "logs") as \
                    (gen, tok, model, scored_model):
                if model is not None:
                    _check_lengths(cfg, model, stage)
                items += run_recall_and_synthetic(cfg, gen, tok, progress)
                if cfg.helmet is not None:  # HELMET's chat-template rule follows instruction tuning
                    items += run_helmet(cfg, gen, tok, recipe.graph.instruct(model_stage), on_item=progress.item)
                extra.update(_likelihood(cfg, model, tok, recipe.seed, stage, world.device, progress))
                if cfg.lm_eval is not None and not getattr(gen, "died", None):
                    extra["lm_eval"] = run_lm_eval(model_dir, cfg.lm_eval, cfg.lm_eval.max_length or seq_len,
                                                   recipe.model.dtype, world.device, progress,
                                                   served=None if model is not None else gen, stage=stage)
            del model
        except StageError:
            _keep_for_inspection(rec, tmp, items)  # what was scored before it stopped, outside the manifest
            raise
        for log_file in (tmp / "logs").iterdir():
            rec.put_file(log_file, f"{layout.LOGS}/{log_file.name}")
        scored = [i for i in items if not i.get("unscored")]
        results = report.aggregate(scored)
        if any(i["dataset"] == synthetic.LONGLORA_DATASET for i in items):
            results[synthetic.LONGLORA_DATASET] = report.longlora_passkey(items)
        unscored = sorted({i["dataset"] for i in items if i.get("unscored")})
        if unscored:
            results["unscored"] = f"{', '.join(unscored)} (no judge endpoint: eval.judge); token F1 in items.jsonl"
        results.update(extra)
        results["scored_model"] = scored_model
        (tmp / "items.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
        rec.put_file(tmp / "items.jsonl", "items.jsonl")
        rec.write_json("results.json", results)
        (tmp / "results.md").write_text(report.markdown(run, model_stage, results))
        rec.put_file(tmp / "results.md", "results.md")
        charts = report.charts(results, tmp)
        for name in charts:
            rec.put_file(tmp / name, f"charts/{name}")
    progress.finish()
    rec.finish(metrics=_headline(results),
               artifacts={"results": "results.json", "report": "results.md", "items": "items.jsonl",
                          **{f"chart_{Path(c).stem}": f"charts/{c}" for c in charts}})


def _headline(results: dict) -> dict:
    """The manifest's metrics: category means by length, perplexity and lm-eval (details in results.json)."""
    out = {"categories": {k: {"by_length": v["by_length"], "mean": v["mean"]} for k, v in results["categories"].items()},
           "failed_items": results["failed_items"], "scored_model": results["scored_model"]}
    if "by_depth" in results and "json_kv" in results["by_depth"]:
        out["json_kv_by_depth"] = results["by_depth"]["json_kv"]
    for key in ("perplexity", "position_loss", "lm_eval", synthetic.LONGLORA_DATASET):
        if key in results:
            out[key] = {k: v for k, v in results[key].items() if k != "per_document"}
    return out
