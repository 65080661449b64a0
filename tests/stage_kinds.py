"""A stage kind defined outside the library, in one class (and its config), as a user would: it
summarises another stage's manifest into a file. Registered through PROLONG_STAGE_KINDS."""

from __future__ import annotations

from typing import Literal

from prolong.config.base import StageConfig
from prolong.manifest import StageRecorder, read_manifest
from prolong.stages.base import JobNeeds, Stage


class SummaryConfig(StageConfig):
    kind: Literal["summary"] = "summary"
    of: str  # the stage whose outputs it summarises


class ManifestSummary(Stage):
    kind = "summary"
    config = SummaryConfig
    entry = "tests.stage_kinds:write_summary"
    needs = JobNeeds(ranks="one", nodes="one", gpus="none")

    def edges(self) -> dict[str, str]:
        return {"of": self.cfg.of}

    def headline(self, metrics: dict) -> str:
        return f"{metrics['files']} files of {self.cfg.of} summarised"


def write_summary(recipe, store, run, stage) -> None:
    """The job: one JSON file listing the upstream stage's outputs, then the manifest."""
    cfg = recipe.stages[stage]
    rec = StageRecorder(store, run, recipe, stage)
    upstream = read_manifest(store, run, cfg.of)
    rec.write_json("summary.json", {"of": cfg.of, "files": len(upstream.outputs),
                                    "bytes": sum(o["bytes"] for o in upstream.outputs)})
    rec.finish(metrics={"files": len(upstream.outputs)})
