"""``kind: eval``: evaluate one model of the recipe — HELMET's categories, synthetic recall, long-
document loss (by token position too) and lm-eval — as a single-process job on one GPU.

A recipe may hold several (one per training stage, say): each reads the model of its
``model_from``, and the run's report puts them side by side (prolong.eval.report).
"""

from __future__ import annotations

from prolong import checks
from prolong.config.data import FileSource, RepoSource
from prolong.config.eval import EvalConfig
from prolong.errors import ConfigError
from prolong.stages.base import JobNeeds, Stage

TASKS = ("json_kv", "helmet", "passkey", "needle", "perplexity", "position_loss", "lm_eval")


class EvalStage(Stage):
    kind = "eval"
    config = EvalConfig
    entry = "prolong.eval.main:run_eval_stage"
    needs = JobNeeds(ranks="one", nodes="one", gpus="one")
    cfg: EvalConfig

    def edges(self) -> dict[str, str]:
        return {"model_from": self.cfg.model_from}

    def validate(self, graph) -> None:
        model_from = self.cfg.model_from
        if not graph.nodes[model_from].makes_model:
            raise ValueError(f"{self.name}.model_from: {model_from!r} is not a training stage of this recipe")
        if not any(getattr(self.cfg, t, None) is not None for t in TASKS):
            raise ValueError(f"{self.name}: enable at least one of {', '.join(TASKS)}")

    def config_slice(self) -> dict:
        return {"eval": self.cfg.digest_dump()}

    def check(self, ctx, reruns: set[str]) -> None:
        cfg, name = self.cfg, self.name
        if cfg.helmet is not None and cfg.helmet.data_dir is not None:
            checks.check_path(cfg.helmet.data_dir, f"{name}.helmet.data_dir")
        if cfg.needle is not None:
            checks.check_path(cfg.needle.haystack, f"{name}.needle.haystack")
        for task in ("perplexity", "position_loss"):
            part = getattr(cfg, task, None)
            if part is not None and isinstance(part.source, (FileSource, RepoSource)):
                checks.check_path(part.source.path, f"{name}.{task}.source.path")
        if cfg.lm_eval is not None and cfg.lm_eval.include_path:
            checks.check_path(cfg.lm_eval.include_path, f"{name}.lm_eval.include_path", folder=True)
        # the longest prompt must fit the evaluated model: its base length, raised by every stage on the way
        config = checks.model_config(self.recipe.model.path, "model.path") or {}
        limit = max(config.get("max_position_embeddings") or 0, self.recipe.graph.trained_length(cfg.model_from))
        tasks = [t for t in (cfg.json_kv, cfg.helmet, cfg.passkey, cfg.needle) if t is not None]
        longest = max((length for t in tasks for length in cfg.lengths_of(t)), default=0)
        if limit and longest > limit:
            raise ConfigError(f"{name}.lengths: {longest} tokens is beyond the {limit} positions of the evaluated "
                              f"model ({cfg.model_from})")

    def headline(self, metrics: dict) -> str:
        parts = [f"{cat} {c['mean']:.0f}" for cat, c in metrics.get("categories", {}).items()
                 if c.get("mean") is not None]
        if "perplexity" in metrics:
            parts.append(f"ppl {metrics['perplexity']['perplexity']:.1f}")
        if "position_loss" in metrics:
            pl = metrics["position_loss"]
            parts.append(f"loss {pl['first']:.2f} → {pl['last']:.2f} by position")
        for task, m in metrics.get("lm_eval", {}).items():
            acc = next((v for k, v in m.items() if k.startswith("acc") and "stderr" not in k), None)
            if acc is not None:
                parts.append(f"{task} acc {acc:.3f}")
        return "; ".join(parts)
