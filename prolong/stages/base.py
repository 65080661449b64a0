"""The Stage interface: what a stage *kind* declares, once, for every part of the service.

A recipe is a graph of named stages (prolong.recipe); each stage is an instance of a kind
(``data``, ``train``, ``eval`` ...). A kind is one subclass of :class:`Stage` that declares:

* ``kind`` and ``config`` — its name in recipes (``stages.NAME.kind``) and its config class;
* :meth:`upstream` — the stages whose outputs it reads (the graph's edges, from its config);
* :meth:`config_slice` — the recipe fields that determine its outputs (its config digest);
* ``needs`` — the job it runs as: one process or one per device, one node or all, GPUs or not;
* ``entry`` — the job-side function, ``"module:function"``, called in the job as
  ``function(recipe, store, run, stage, *extra)``; the orchestrator never imports it;
* :meth:`parts` — optionally, the parts its work splits into, run as parallel jobs and merged;
* :meth:`check` — what can be checked before the run starts (prolong.preflight);
* :meth:`headline` — one line of its headline metrics for tables and logs.

The pipeline, the CLI, the Prefect flow, the job entry point and snapshot evaluation all go through
these; none of them names a stage. Torch-free. A stage's *input key* — its config digest, its
upstream manifests' digests and the code version — decides whether it is done (prolong.manifest).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from prolong import __version__
from prolong.config.base import StageConfig

if TYPE_CHECKING:
    from prolong.recipe import Recipe


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(obj: Any) -> str:
    return hashlib.sha256(obj if isinstance(obj, bytes) else canonical_json(obj)).hexdigest()


def code_version() -> str:
    """Part of every input key. Bumped with releases; a developer forces re-runs with --from-stage."""
    return __version__


def input_key(config_digest_: str, upstream_digests: dict[str, str], code: str | None = None) -> str:
    return digest({"config": config_digest_, "upstream": upstream_digests, "code": code or code_version()})


@dataclass(frozen=True)
class JobNeeds:
    """The job a stage runs as."""

    ranks: Literal["one", "per_device"] = "one"  # processes per node: 1, or jobs.nproc_per_node
    nodes: Literal["one", "all"] = "one"  # on a cluster: one node, or jobs.slurm.nodes
    gpus: Literal["none", "one", "all"] = "none"  # per node, of jobs.slurm.gpus_per_node


class Stage:
    """One stage of a recipe: a kind's behaviour bound to its name and config."""

    kind: ClassVar[str]
    config: ClassVar[type[StageConfig]]
    entry: ClassVar[str]  # "module:function", imported by the job only
    needs: ClassVar[JobNeeds] = JobNeeds()
    makes_model: ClassVar[bool] = False  # its manifest's artifacts name an "hf_model" others can read

    def __init__(self, name: str, cfg: StageConfig, recipe: "Recipe"):
        self.name, self.cfg, self.recipe = name, cfg, recipe
        self.makes_model = type(self).makes_model_with(cfg)

    @classmethod
    def makes_model_with(cls, cfg: StageConfig) -> bool:
        """Whether a stage of this kind configured by ``cfg`` leaves full HF weights (``makes_model``
        unless the config says otherwise: a LoRA training stage leaves an adapter)."""
        return cls.makes_model

    def not_a_model(self) -> str:
        """Why this stage's outputs are not a model others can read, for their validation errors."""
        return "is not a stage that makes a model (train, merge, export)"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    # ------------------------------------------------------------ the graph
    def edges(self) -> dict[str, str]:
        """Config field → the stage it names (``{"init_from": "stage1"}``): this stage's upstream,
        named in errors by the field that made the edge."""
        return {}

    def upstream(self) -> list[str]:
        return list(dict.fromkeys(self.edges().values()))

    def model_source(self) -> str:
        """For a stage that makes a model: the stage (or "model", the base) whose model it starts from."""
        return "model"

    def validate(self, graph) -> None:
        """Checks against the rest of the recipe once every edge resolves (``graph``: the
        StageGraph being built); raise ValueError with a message that starts with the field
        (``"sft.mixture.books: ..."``)."""

    # ------------------------------------------------------------ what makes its outputs
    def config_slice(self) -> dict:
        """The recipe fields its outputs depend on (graph edges are covered by upstream digests)."""
        return {"stage": self.cfg.digest_dump()}

    def config_digest(self) -> str:
        return digest(self.config_slice())

    # ------------------------------------------------------------ around its job
    def parts(self) -> list[str]:
        """Names of the jobs its work splits into, run side by side before a merge job (its entry
        called with ``part NAME``, then ``merge``); none: one job."""
        return []

    def check(self, ctx, reruns: set[str]) -> None:
        """Everything that can be checked before the run starts (``reruns``: the stages that run
        in this run, whose outputs cannot be checked yet); raise a one-line ProlongError."""

    def headline(self, metrics: dict) -> str:
        return ""
