"""``kind: export``: ship a model — HF safetensors in the export dtype and GGUF files for llama.cpp.

``{run}/{stage}/hf/``: sharded safetensors (``model.safetensors.index.json`` above
``max_shard_size``), a config every reader takes θ from (transformers 4 and 5 fields), the
tokenizer, ``generation_config.json`` and a model card generated from the run.
``{run}/{stage}/gguf/``: one file per type of ``gguf`` — f16/bf16/q8_0 by llama.cpp's converter,
k-quants (Q4_K_M, ...) by llama.cpp's quantizer — each read back and checked (θ, context length,
vocabulary) before the stage is done. By default it exports the last model declared before it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import ConfigDict, Field, field_validator

from prolong.config.base import StageConfig
from prolong.errors import ConfigError
from prolong.stages.base import JobNeeds, Stage

# written by llama.cpp's convert_hf_to_gguf.py
CONVERTER_TYPES = ("f32", "f16", "bf16", "q8_0")
# written by llama.cpp's quantizer (llama_model_quantize) from a 16-bit GGUF; names as llama.cpp spells them
QUANTIZER_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_0", "Q4_1", "Q4_K_S", "Q4_K_M", "Q5_0", "Q5_1",
                   "Q5_K_S", "Q5_K_M", "Q6_K", "IQ4_NL", "IQ4_XS")
DTYPE_ORDER = {"bfloat16": 1, "float16": 1, "float32": 2}  # significand bits, coarsely: what a cast can keep


def normalize_gguf_type(name: str) -> str:
    """``q4_k_m`` → ``Q4_K_M``, ``F16`` → ``f16``: the spelling the tools take."""
    if name.lower() in CONVERTER_TYPES:
        return name.lower()
    if name.upper() in QUANTIZER_TYPES:
        return name.upper()
    raise ValueError(f"unknown GGUF type {name!r} (llama.cpp's converter: {', '.join(CONVERTER_TYPES)}; its "
                     f"quantizer: {', '.join(QUANTIZER_TYPES)})")


class ExportConfig(StageConfig):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    kind: Literal["export"] = "export"
    model_from: str | None = Field(default=None, alias="from")  # default: the last model declared before
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    max_shard_size: str = Field(default="5GB", pattern=r"^\d+(KB|MB|GB)$")  # safetensors shards, as HF names them
    gguf: list[str] = ["bf16", "q8_0"]
    # llama.cpp's name of the BPE pre-tokenizer, for tokenizers its converter does not know by their
    # hash; auto: known ones by hash, a plain GPT-2 byte-level one as "gpt-2"
    pre_tokenizer: str = "auto"
    name: str | None = None  # the published model's name (files, model card); default: the recipe's name
    license: str = "other"  # the model card's license field (Llama-3 derivatives: llama3)

    @field_validator("gguf")
    @classmethod
    def _types(cls, types: list[str]) -> list[str]:
        return list(dict.fromkeys(normalize_gguf_type(t) for t in types))


class ExportStage(Stage):
    kind = "export"
    config = ExportConfig
    entry = "prolong.export.main:run_export_stage"
    needs = JobNeeds(ranks="one", nodes="one", gpus="none")
    makes_model = True
    cfg: ExportConfig

    def edges(self) -> dict[str, str]:
        return {"from": self.cfg.model_from}

    def model_source(self) -> str:
        return self.cfg.model_from

    def validate(self, graph) -> None:
        graph.require_model(self.cfg.model_from, f"{self.name}.from")
        saved = self.recipe.model.dtype
        if DTYPE_ORDER[self.cfg.dtype] > DTYPE_ORDER.get(saved, 2):
            raise ValueError(f"{self.name}.dtype: {self.cfg.dtype} cannot be exported from weights saved in {saved} "
                             "(model.dtype); export bfloat16/float16, or train with model.dtype float32")

    def quantized(self) -> list[str]:
        return [t for t in self.cfg.gguf if t in QUANTIZER_TYPES]

    def check(self, ctx, reruns: set[str]) -> None:
        from prolong import checks
        from prolong.export import llama_cpp

        if not self.cfg.gguf:
            return
        root = llama_cpp.converter_dir()
        if root is None:
            raise ConfigError(f"{self.name}.gguf: llama.cpp's converter: {llama_cpp.missing_converter()}")
        config = checks.model_config(self.recipe.model.path, "model.path") or {}
        unknown = [a for a in config.get("architectures") or [] if a not in llama_cpp.converter_architectures(root)]
        if unknown:
            raise ConfigError(f"{self.name}.gguf: llama.cpp's converter cannot convert {unknown[0]} (model.path "
                              f"{self.recipe.model.path}); export HF weights only with gguf: []")
        if self.quantized():
            problem = llama_cpp.library_problem()
            if problem is not None:
                raise ConfigError(f"{self.name}.gguf: {', '.join(self.quantized())} need llama.cpp's quantizer, which "
                                  f"does not load ({problem}); infra/install.sh --llama-cpp builds it")

    def headline(self, metrics: dict) -> str:
        files = metrics.get("gguf", {})
        sizes = ", ".join(f"{t} {b / 1e6:.1f} MB" for t, b in files.items())
        return f"HF {metrics.get('dtype')} {metrics.get('hf_bytes', 0) / 1e6:.1f} MB; GGUF {sizes or 'none'}"
