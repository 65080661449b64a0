"""``kind: data``: sources → tokenize → filter → pack (paper §A.2) → MDS streams in the store.

It writes every stream the training stages that read from it need (``data_from``, default
``data``), sized by their steps; the recipe's ``data:`` section is the catalogue of domains.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Literal

from prolong import checks, layout
from prolong.config.base import StageConfig, format_tokens
from prolong.config.data import FileSource, HFSource, MDSSource, RepoSource
from prolong.errors import DataError
from prolong.fingerprint import tokenizer_fingerprint
from prolong.stages.base import JobNeeds, Stage


class StreamsStage(Stage, ABC):
    """A stage whose outputs are the streams training stages read (``data_from``): where each
    stream of a reader's mixture is, and how its files are checked before training."""

    needs = JobNeeds(ranks="one", nodes="one", gpus="none")

    def readers(self) -> list[str]:
        """The training stages that read this stage's streams, in run order."""
        return [s for s in self.recipe.graph.of_kind("train") if self.recipe.stages[s].data_from == self.name]

    def validate_mixture(self, train) -> None:
        """Raise ValueError (starting with the field) for a mixture entry this stage cannot supply."""

    def sft_mixture(self, train) -> bool:
        """With ``objective: auto``: whether ``train``'s mixture is chat data."""
        return False

    @abstractmethod
    def stream_sources(self, store, run: str, train: str) -> list:
        """The ``prolong.data.mds.StreamSource`` of each entry of ``train``'s mixture (job side)."""

    def stored_streams(self, train: str) -> str:
        """The sub-folder of this stage's outputs that ``train`` reads (checked by sizes before a run)."""
        return layout.stream("")

    def verify_streams(self, store, run: str, train: str) -> None:
        """Before ``train``'s first step: what it will read is as this stage recorded it."""


class DataStageConfig(StageConfig):
    kind: Literal["data"] = "data"
    # split the work into one job per domain, run side by side (jobs.max_parallel_parts), then merged:
    # the same bytes as one job; a failed part is re-run alone
    parts: Literal["one", "domain"] = "one"


class DataStage(StreamsStage):
    kind = "data"
    config = DataStageConfig
    entry = "prolong.data.prepare:prepare"

    def parts(self) -> list[str]:
        """The jobs this stage's work splits into (none: one job)."""
        if self.cfg.parts != "domain":
            return []
        return sorted({k.domain for k in _plan_keys(self.recipe, self.name)})

    def validate_mixture(self, train) -> None:
        recipe, name, cfg = self.recipe, train.name, train.cfg
        if recipe.data is None:
            raise ValueError(f"{name}.mixture: needs the recipe's data section (data.domains)")
        for comp in cfg.components():
            domain = recipe.data.domains.get(comp.domain)
            where = f"{name}.mixture.{comp.domain}"
            if domain is None:
                raise ValueError(f"{where}: no such domain in data.domains")
            if cfg.objective != "auto" and (cfg.objective == "sft") != (domain.kind == "sft"):
                want = "sft" if cfg.objective == "sft" else "long or short"
                raise ValueError(f"{where}: {name} needs {want} domains, {comp.domain} is {domain.kind}")
            if comp.doc_len is not None and domain.kind != "long":
                raise ValueError(f"{where}: a document length (@) applies to long domains only")
        if len({recipe.data.domains[c.domain].kind == "sft" for c in cfg.components()}) > 1:
            raise ValueError(f"{name}.mixture: mixes sft domains with long/short ones; an SFT stage trains on "
                             "chat data only (set objective: sft or pretrain to say which)")

    def sft_mixture(self, train) -> bool:
        return self.recipe.data is not None and any(self.recipe.data.domains[c.domain].kind == "sft" for c in train.cfg.components()
                   if c.domain in self.recipe.data.domains)

    def stored_streams(self, train: str) -> str:
        return layout.stream(f"L{format_tokens(self.recipe.train_stage(train).seq_len)}")

    def stream_sources(self, store, run: str, train: str) -> list:
        from prolong.data.mds import StreamSource, stage_streams, stream_rel

        return [StreamSource(key.name, store.uri(stream_rel(run, key, self.name)), proportion)
                for key, proportion in stage_streams(self.recipe, train)]

    def verify_streams(self, store, run: str, train: str) -> None:
        """Every shard ``train`` reads, against this stage's manifest: sizes always, contents where
        the store is local (a remote store's shards are checked as they are fetched)."""
        from prolong.data.mds import stage_streams
        from prolong.integrity import outputs_under, verify_outputs
        from prolong.manifest import read_manifest

        m = read_manifest(store, run, self.name)
        for key, _ in stage_streams(self.recipe, train):
            entries = outputs_under(m.outputs, layout.stream(key.name))
            if not entries:
                raise DataError(f"{train}: the {self.name} manifest lists no stream {key.name}; re-run the data "
                                f"stage with --from-stage {self.name}")
            verify_outputs(store, layout.stage_prefix(run, self.name), entries, content=store.is_local,
                           error=DataError, fix=f"re-run the data stage with --from-stage {self.name}")

    def validate(self, graph) -> None:
        if self.recipe.data is None:
            raise ValueError(f"{self.name}: a data stage needs the recipe's data section (data.domains)")

    def config_slice(self) -> dict:
        r = self.recipe.model_dump(mode="json")
        model = self.recipe.model
        needs = {s: {k: r["stages"][s][k] for k in ("seq_len", "steps", "batch_tokens", "mixture")}
                 for s in self.readers()}
        tokenizer = {"ref": model.tokenizer_path, **tokenizer_fingerprint(model.tokenizer_path, model.revision)}
        return {"data": self.recipe.data.digest_dump(), "tokenizer": tokenizer, "needs": needs}

    def check(self, ctx, reruns: set[str]) -> None:
        recipe = self.recipe
        checks.check_tokenizer(recipe.model.tokenizer_path)
        used = {c.domain for s in self.readers() for c in recipe.train_stage(s).components()}
        for name in sorted(used):
            src = recipe.data.domains[name].source
            field = f"data.domains.{name}.source"
            if isinstance(src, RepoSource):
                checks.check_path(src.path, f"{field}.path", folder=True)
            elif isinstance(src, FileSource):
                checks.check_path(src.path, f"{field}.path")
            elif isinstance(src, HFSource) and checks.looks_local(src.name):
                checks.check_path(src.name, f"{field}.name")
            elif isinstance(src, MDSSource):
                checks.check_mds_folder(src.path, src.storage_options, f"{field}.path")

    def headline(self, metrics: dict) -> str:
        return (f"{metrics.get('samples', 0)} samples, {metrics.get('tokens', 0):,} tokens in "
                f"{len(metrics.get('streams', {}))} streams")


def _plan_keys(recipe, data_stage: str):
    from prolong.data.mds import stage_streams

    return [key for s in recipe.stage(data_stage).readers() for key, _ in stage_streams(recipe, s)]
