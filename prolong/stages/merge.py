"""``kind: merge``: a LoRA stage's adapter merged into its base — full HF weights that evaluation,
export and later training stages read like any other model (LongLoRA's
merge_lora_weights_and_save_hf_model.py as a stage).

``{run}/{stage}/hf/``: the base the LoRA stage adapted (the recipe's model, or the upstream stage's
weights) with the fully trained parameters (embeddings, norms) put in and peft's
``merge_and_unload`` applied, saved in the model's dtype with the LoRA stage's θ and RoPE scaling.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field

from prolong.config.base import StageConfig
from prolong.stages.base import JobNeeds, Stage


class MergeConfig(StageConfig):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["merge"] = "merge"
    model_from: str = Field(alias="from")  # the LoRA training stage


class MergeStage(Stage):
    kind = "merge"
    config = MergeConfig
    entry = "prolong.train.merge:run_merge_stage"
    needs = JobNeeds(ranks="one", nodes="one", gpus="one")
    makes_model = True
    cfg: MergeConfig

    def edges(self) -> dict[str, str]:
        return {"from": self.cfg.model_from}

    def model_source(self) -> str:
        return self.cfg.model_from

    def validate(self, graph) -> None:
        source = graph.nodes[self.cfg.model_from]
        if source.kind != "train" or source.cfg.lora is None:
            raise ValueError(f"{self.name}.from: {self.cfg.model_from!r} is not a LoRA training stage "
                             "(a train stage with lora: ...); only an adapter needs merging")

    def config_slice(self) -> dict:
        # the weights are the adapter's (its digest is upstream) put into the base in the model's dtype
        return {"stage": self.cfg.digest_dump(exclude={"model_from"}), "dtype": self.recipe.model.dtype}

    def headline(self, metrics: dict) -> str:
        return f"{metrics.get('merged_modules')} LoRA modules merged, {metrics.get('params', 0) / 1e6:.1f}M parameters"
