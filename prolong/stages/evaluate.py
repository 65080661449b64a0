"""``kind: eval``: evaluate one model of the recipe — HELMET's categories, synthetic recall, long-
document loss (by token position too) and lm-eval — as a single-process job on one GPU.

A recipe may hold several (one per training stage, say): each reads the model of its
``model_from``, and the run's report puts them side by side (prolong.eval.report).
"""

from __future__ import annotations

import importlib.util

from prolong import checks
from prolong.config.base import format_tokens
from prolong.config.data import FileSource, RepoSource
from prolong.config.eval import EvalConfig
from prolong.errors import ConfigError
from prolong.stages.base import JobNeeds, Stage
from prolong.stages.export import normalize_gguf_type

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
        graph.require_model(model_from, f"{self.name}.model_from")
        if not any(getattr(self.cfg, t, None) is not None for t in TASKS):
            raise ValueError(f"{self.name}: enable at least one of {', '.join(TASKS)}")
        cfg = self.cfg
        if cfg.backend == "openai":
            if (cfg.base_url is None) == (cfg.serve is None):
                raise ValueError(f"{self.name}.backend: openai needs either base_url (a running server) or serve "
                                 "(one the job starts), not both")
            for task in ("perplexity", "position_loss"):
                if getattr(cfg, task) is not None:
                    raise ValueError(f"{self.name}.{task}: needs the prompt's token log-probabilities; run it with "
                                     "backend: hf (a served model is scored on generations)")
            if cfg.lm_eval is not None and cfg.serve is not None and cfg.serve.engine == "llama_cpp":
                # measured: echo returns the prompt's log-probabilities but not the scored token's, and
                # lm-eval's local-completions drops the last entry as that token, so each answer loses its
                # last token's log-probability (or all of it, for a one-token answer)
                raise ValueError(f"{self.name}.lm_eval: llama-cpp-python's server does not return the "
                                 "log-probabilities lm-eval's local-completions scores with; run lm_eval in an eval "
                                 "stage with backend: hf on the same export (vLLM's server supports it)")
        elif cfg.serve is not None or cfg.base_url is not None:
            raise ValueError(f"{self.name}.backend: base_url and serve apply to backend: openai")
        source = graph.nodes[model_from]
        if source.kind == "export":  # its config's max_position_embeddings is the trained length
            longest = max((L for t in (cfg.json_kv, cfg.helmet, cfg.passkey, cfg.needle) if t is not None
                           for L in cfg.lengths_of(t)), default=0)
            if longest > (trained := graph.trained_length(model_from)):
                raise ValueError(f"{self.name}.lengths: {longest} tokens is beyond the {trained} that {model_from} "
                                 "exports as the model's context length (the longest it was trained on)")
        if cfg.serve is not None and cfg.serve.engine == "llama_cpp" and cfg.serve.file is None:
            if source.kind != "export":
                raise ValueError(f"{self.name}.serve: llama_cpp serves a GGUF: model_from must be an export stage "
                                 f"(or give serve.file), {model_from!r} is {source.kind}")
            wanted = cfg.serve.gguf or (source.cfg.gguf[0] if source.cfg.gguf else None)
            if wanted is None or normalize_gguf_type(wanted) not in source.cfg.gguf:
                raise ValueError(f"{self.name}.serve.gguf: {wanted!r} is not among {model_from}'s GGUF types "
                                 f"({', '.join(source.cfg.gguf) or 'none'})")

    def config_slice(self) -> dict:
        return {"eval": self.cfg.digest_dump()}

    def check(self, ctx, reruns: set[str]) -> None:
        cfg, name = self.cfg, self.name
        if cfg.serve is not None and cfg.serve.engine == "llama_cpp":
            from prolong.export.llama_cpp import library_problem

            if (problem := library_problem("llama_cpp.server.app")) is not None:
                raise ConfigError(f"{name}.serve: llama.cpp's server (llama-cpp-python[server]) does not load "
                                  f"({problem}); infra/install.sh --llama-cpp builds it")
        if cfg.serve is not None and cfg.serve.engine == "vllm" and importlib.util.find_spec("vllm") is None:
            raise ConfigError(f"{name}.serve: vllm is not installed here (pip install vllm, on a GPU machine)")
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
        # LongLoRA's README: --seq_len should not be larger than --context_size (the trained length)
        seq_lens = cfg.perplexity.seq_lens if cfg.perplexity is not None else None
        if limit and seq_lens and max(seq_lens) > limit:
            raise ConfigError(f"{name}.perplexity.seq_lens: {max(seq_lens)} tokens is beyond the {limit} positions of "
                              f"the evaluated model ({cfg.model_from})")

    def headline(self, metrics: dict) -> str:
        parts = [f"{cat} {c['mean']:.0f}" for cat, c in metrics.get("categories", {}).items()
                 if c.get("mean") is not None]
        if "by_length" in metrics.get("perplexity", {}):
            by_length = metrics["perplexity"]["by_length"]
            parts.append("ppl " + ", ".join(f"{format_tokens(int(L))} {v['perplexity']:.1f}"
                                            for L, v in sorted(by_length.items(), key=lambda kv: int(kv[0]))))
        elif "perplexity" in metrics:
            parts.append(f"ppl {metrics['perplexity']['perplexity']:.1f}")
        if (acc := metrics.get("passkey_longlora", {}).get("mean_accuracy")) is not None:
            parts.append(f"passkey (LongLoRA) {acc:.2f}")
        if "position_loss" in metrics:
            pl = metrics["position_loss"]
            parts.append(f"loss {pl['first']:.2f} → {pl['last']:.2f} by position")
        for task, m in metrics.get("lm_eval", {}).items():
            acc = next((v for k, v in m.items() if k.startswith("acc") and "stderr" not in k), None)
            if acc is not None:
                parts.append(f"{task} acc {acc:.3f}")
        return "; ".join(parts)
