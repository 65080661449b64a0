"""A recipe's stages as a graph: nodes are :class:`~prolong.stages.base.Stage` instances, edges what
each reads. Built once per recipe (``recipe.graph``), validated when the recipe is: an unknown
upstream, a cycle, a check of a kind — each one line naming the field, before anything runs.

Run order is topological, ties broken by the order stages are declared in, so the ProLong
five-stage recipe runs data → stage1 → stage2 → sft → eval as written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prolong.errors import ConfigError
from prolong.stages.base import Stage
from prolong.stages.registry import kind_class

if TYPE_CHECKING:
    from prolong.recipe import Recipe


class StageGraph:
    def __init__(self, recipe: "Recipe"):
        self.nodes: dict[str, Stage] = {name: kind_class(cfg.kind, f"{name}.kind")(name, cfg, recipe)
                                        for name, cfg in recipe.stages.items()}
        for name, node in self.nodes.items():
            for field, up in node.edges().items():
                if up not in self.nodes:
                    raise ValueError(f"{name}.{field}: {up!r} is not a stage of this recipe "
                                     f"(stages: {', '.join(self.nodes)})")
        for node in self.nodes.values():  # before the order: "not a model" says more than "a cycle"
            node.validate(self)
        self.order = self._topological()

    def _topological(self) -> list[str]:
        declared = list(self.nodes)
        pending = {name: set(node.upstream()) for name, node in self.nodes.items()}
        order: list[str] = []
        while pending:
            ready = [n for n in declared if n in pending and not pending[n]]
            if not ready:
                raise ValueError(f"stages: {self._cycle(pending)} form a cycle; a stage cannot read its own outputs")
            first = ready[0]
            order.append(first)
            del pending[first]
            for ups in pending.values():
                ups.discard(first)
        return order

    def _cycle(self, pending: dict[str, set[str]]) -> str:
        start = next(iter(pending))
        path, node = [start], start
        while True:
            node = sorted(pending[node])[0]
            if node in path:
                loop = path[path.index(node):] + [node]
                return " → ".join(loop)
            path.append(node)

    def require_model(self, name: str, field: str) -> None:
        """``field`` (``eval.model_from``) names ``name``: it must leave full weights to read."""
        if not self.nodes[name].makes_model:
            raise ValueError(f"{field}: {name!r} {self.nodes[name].not_a_model()}")

    # ------------------------------------------------------------ queries
    def __getitem__(self, name: str) -> Stage:
        try:
            return self.nodes[name]
        except KeyError:
            raise ConfigError(f"stage: this recipe has no stage {name!r} (stages: {', '.join(self.order)})") from None

    def __contains__(self, name: str) -> bool:
        return name in self.nodes

    def upstream(self, name: str) -> list[str]:
        return self[name].upstream()

    def downstream(self, name: str) -> list[str]:
        """Every stage that reads ``name``'s outputs, directly or not, in run order."""
        found = {name}
        for n in self.order:
            if any(u in found for u in self.nodes[n].upstream()):
                found.add(n)
        return [n for n in self.order if n in found and n != name]

    def model_chain(self, stage: str) -> list[str]:
        """The stages the model of ``stage`` went through, ``stage`` first, back to the base model."""
        chain = []
        while stage != "model":
            chain.append(stage)
            stage = self[stage].model_source()
        return chain

    def instruct(self, stage: str) -> bool:
        """The model of ``stage`` was instruction-tuned on the way (HELMET's chat-template rule)."""
        return any(getattr(self[s], "is_sft", False) for s in self.model_chain(stage))

    def trained_length(self, stage: str) -> int:
        """The longest sequence the model of ``stage`` was trained on, by this recipe."""
        return max((getattr(self.nodes[s].cfg, "seq_len", 0) for s in self.model_chain(stage)), default=0)

    def of_kind(self, kind: str) -> list[str]:
        return [n for n in self.order if self.nodes[n].kind == kind]

    def select(self, stages: list[str] | None = None, from_stage: str | None = None) -> list[str]:
        """Validate ``--stages`` and ``--from-stage`` against the graph; the chosen stages in run order."""
        for name in [*(stages or []), *([from_stage] if from_stage else [])]:
            if name not in self.nodes:
                raise ConfigError(f"stages: unknown stage {name!r} (stages: {', '.join(self.order)})")
        chosen = [s for s in self.order if stages is None or s in stages]
        if from_stage and from_stage not in chosen:
            raise ConfigError(f"from_stage: {from_stage!r} is not among the selected stages")
        return chosen

    def forced_by(self, chosen: list[str], from_stage: str | None) -> set[str]:
        """``--from-stage X``: X and every chosen stage downstream of it start afresh."""
        if not from_stage:
            return set()
        return {from_stage} | {s for s in self.downstream(from_stage) if s in chosen}
