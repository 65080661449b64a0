"""``kind: train``: one training stage — continued pretraining at a length and θ, or SFT (Table 9).

It reads the streams of its data stage (``data_from``) and starts from the base model or from an
earlier stage's final checkpoint (``init_from``; default: the training stage declared before it).
Runs as a torchrun job with one process per device on every node of the job.
"""

from __future__ import annotations

from prolong import checks
from prolong.config.train import TrainStageConfig
from prolong.errors import ConfigError, DataError, StoreError
from prolong.fingerprint import model_fingerprint
from prolong.integrity import outputs_under, verify_outputs
from prolong.layout import stage_prefix
from prolong.manifest import read_manifest
from prolong.parallel.dims import ParallelDims, job_ranks
from prolong.stages.base import JobNeeds, Stage
from prolong.stages.data import StreamsStage

# model types whose positions are learned or ALiBi: θ cannot extend them
_NO_ROPE = {"gpt2", "gpt_bigcode", "opt", "bloom", "mpt", "bert", "roberta", "t5"}


class TrainStage(Stage):
    kind = "train"
    config = TrainStageConfig
    entry = "prolong.train.main:run_train_stage"
    needs = JobNeeds(ranks="per_device", nodes="all", gpus="all")
    makes_model = True
    cfg: TrainStageConfig

    @classmethod
    def makes_model_with(cls, cfg: TrainStageConfig) -> bool:
        return cfg.lora is None  # a LoRA stage leaves an adapter, which a merge stage turns into weights

    def not_a_model(self) -> str:
        if self.cfg.lora is not None:
            return ("is a LoRA stage: it leaves an adapter, not full weights; add a stage of kind merge "
                    f"(from: {self.name}) and read that")
        return super().not_a_model()

    @property
    def init(self) -> str:
        """Where it takes its weights from: "model", or a stage that makes a model."""
        if self.cfg.init_from:
            return self.cfg.init_from
        declared = list(self.recipe.stages)
        earlier = [s for s in declared[:declared.index(self.name)] if self.recipe.stages[s].kind == "train"]
        return earlier[-1] if earlier else "model"

    def model_source(self) -> str:
        return self.init

    @property
    def is_sft(self) -> bool:
        if self.cfg.objective != "auto":
            return self.cfg.objective == "sft"
        data = self.recipe.graph.nodes.get(self.cfg.data_from)
        return isinstance(data, StreamsStage) and data.sft_mixture(self)

    def edges(self) -> dict[str, str]:
        out = {"data_from": self.cfg.data_from}
        if self.init != "model":
            out["init_from"] = self.init
        return out

    def validate(self, graph) -> None:
        recipe, name, cfg = self.recipe, self.name, self.cfg
        data = graph.nodes[cfg.data_from]
        if not isinstance(data, StreamsStage):
            raise ValueError(f"{name}.data_from: {cfg.data_from!r} is not a data stage")
        data.validate_mixture(self)
        try:
            group = recipe.model.s2_group_size(cfg.seq_len)
        except ValueError as e:
            raise ValueError(f"{name}.seq_len: {e}") from None
        if group is not None and cfg.sequence_parallel > 1:
            raise ValueError(f"{name}.sequence_parallel: S²-Attn (model.attention_pattern: s2) attends within groups "
                             "on one device; use sequence_parallel: 1")
        up = graph.nodes.get(self.init)
        if up is not None and not up.makes_model:
            why = up.not_a_model() if up.kind == self.kind else "is not an earlier stage of this recipe"
            raise ValueError(f"{name}.init_from: {self.init!r} {why}")
        if cfg.keep_optimizer_state and (self.init == "model" or recipe.stages[self.init].kind != "train"):
            raise ValueError(f"{name}.keep_optimizer_state: needs init_from to name an earlier stage")

    def config_slice(self) -> dict:
        r = self.recipe.model_dump(mode="json")
        # graph edges are covered by upstream digests; objective only validates
        out = {"stage": self.cfg.digest_dump(exclude={"data_from", "objective"}),
               "init_from": self.init, "seed": self.recipe.seed, "parallel": r["parallel"]}
        if self.init == "model":
            out["model"] = self.recipe.model.digest_dump()
            out["model_fingerprint"] = model_fingerprint(self.recipe.model.path, self.recipe.model.revision)
        else:
            out["dtype"] = r["model"]["dtype"]
        return out

    def check(self, ctx, reruns: set[str]) -> None:
        recipe, cfg = self.recipe, self.cfg
        dims = ParallelDims.for_stage(recipe, self.name, job_ranks(recipe.jobs, all_nodes=True))
        dims.accumulation(cfg.global_batch_size, cfg.micro_batch_size, f"{self.name}.batch_tokens")
        checks.check_backends(recipe)
        if cfg.lora is not None and cfg.lora.quantize:
            checks.check_quantized_lora(recipe, f"{self.name}.lora.quantize")
        config = checks.model_config(recipe.model.path, "model.path")  # every stage keeps the base architecture
        if config is not None:
            if not any(k in config for k in ("rope_theta", "rope_parameters", "rope_scaling")) and \
                    config.get("model_type") in _NO_ROPE:
                raise ConfigError(f"{self.name}.rope_theta: model {recipe.model.path!r} "
                                         f"({config['model_type']}) has no rotary position embedding; "
                                         "long-context training needs a RoPE model")
            if recipe.model.attention_pattern == "s2" and config.get("num_attention_heads", 2) % 2:
                raise ConfigError(f"model.attention_pattern: S²-Attn shifts half of the heads; {recipe.model.path!r} "
                                  f"has {config['num_attention_heads']}")
            if dims.sp > 1 and "num_attention_heads" in config:
                heads = config["num_attention_heads"]
                dims.kv_expansion(heads, config.get("num_key_value_heads") or heads)
        # what it reads from stages that will not run again must still be as recorded (sizes: cheap)
        reads = [(cfg.data_from, self.recipe.stage(cfg.data_from).stored_streams(self.name))]
        if self.init != "model" and self.init not in reruns:
            reads.append((self.init, "hf"))
            m = read_manifest(ctx.store, ctx.run, self.init)
            if m is not None and m.artifacts.get("checkpoint"):
                reads.append((self.init, m.artifacts["checkpoint"]))
        for up, sub in reads:
            m = read_manifest(ctx.store, ctx.run, up) if up not in reruns else None
            if m is not None:
                verify_outputs(ctx.store, stage_prefix(ctx.run, up), outputs_under(m.outputs, sub), content=False,
                               error=DataError if recipe.stages[up].kind == "data" else StoreError,
                               fix=f"re-run it with --from-stage {up}")

    def headline(self, metrics: dict) -> str:
        first, last = metrics.get("loss_first"), metrics.get("loss_last10")
        if first is None:
            return ""
        return f"{metrics.get('steps')} steps, loss {first:.3f} → {last:.3f}, θ={metrics.get('rope_theta'):g}"
