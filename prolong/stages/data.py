"""``kind: data``: sources → tokenize → filter → pack (paper §A.2) → MDS streams in the store.

It writes every stream the training stages that read from it need (``data_from``, default
``data``), sized by their steps; the recipe's ``data:`` section is the catalogue of domains.
"""

from __future__ import annotations

from typing import Literal

from prolong import checks
from prolong.config.base import StageConfig
from prolong.config.data import FileSource, HFSource, RepoSource
from prolong.fingerprint import tokenizer_fingerprint
from prolong.stages.base import JobNeeds, Stage


class DataStageConfig(StageConfig):
    kind: Literal["data"] = "data"


class DataStage(Stage):
    kind = "data"
    config = DataStageConfig
    entry = "prolong.data.prepare:prepare"
    needs = JobNeeds(ranks="one", nodes="one", gpus="none")

    def readers(self) -> list[str]:
        """The training stages that read this stage's streams, in run order."""
        return [s for s in self.recipe.graph.of_kind("train") if self.recipe.stages[s].data_from == self.name]

    def validate(self, graph) -> None:
        if self.recipe.data is None:
            raise ValueError(f"{self.name}: a data stage needs the recipe's data section (data.domains)")

    def config_slice(self) -> dict:
        r = self.recipe.model_dump(mode="json")
        model = self.recipe.model
        needs = {s: {k: r["stages"][s][k] for k in ("seq_len", "steps", "batch_tokens", "mixture")}
                 for s in self.readers()}
        tokenizer = {"ref": model.tokenizer_path, **tokenizer_fingerprint(model.tokenizer_path, model.revision)}
        return {"data": r["data"], "tokenizer": tokenizer, "needs": needs}

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

    def headline(self, metrics: dict) -> str:
        return (f"{metrics.get('samples', 0)} samples, {metrics.get('tokens', 0):,} tokens in "
                f"{len(metrics.get('streams', {}))} streams")
