"""An evaluation stage (kind ``eval``): HELMET's categories, synthetic recall, perplexity, lm-eval."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from prolong.config.base import StageConfig, Tokens, _Config
from prolong.config.data import Source
from prolong.eval.helmet.datasets import HELMET_DATASETS, HELMET_DEFAULT_DATASETS, HELMET_HF_DATASETS

class JsonKVConfig(_Config):
    """Recall: HELMET's JSON KV, generated offline for the recipe's tokenizer."""

    lengths: list[Tokens] | None = None  # default: eval.lengths
    depths: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    samples_per_depth: int = Field(default=2, gt=0)
    max_new_tokens: int = Field(default=100, gt=0)
    seed: int = 0


class HelmetHFConfig(_Config):
    """One HELMET dataset read through Hugging Face ``datasets``, as HELMET itself reads it."""

    # a hub id, a save_to_disk folder, a folder of data files, or "json"/"parquet" with data_files;
    # None: HELMET's hub id (and its subset: multi_lexsum v20230518, clinc150 plus)
    name: str | None = None
    subset: str | None = None
    revision: str | None = None  # e.g. refs/convert/parquet for hub datasets that only ship a loading script
    data_files: str | list[str] | dict[str, str | list[str]] | None = None


class HelmetConfig(_Config):
    """RAG, re-rank, ICL, long-document QA and summarisation from HELMET's released data files."""

    # HELMET's `data/` folder (our per-length names or HELMET's own k-named files): a local path,
    # store-relative path or fsspec URL (s3://...); not needed when every dataset comes from `hf`
    data_dir: str | None = None
    datasets: list[Literal[HELMET_DATASETS]] = HELMET_DEFAULT_DATASETS  # type: ignore[valid-type]
    # ICL, NarrativeQA and Multi-LexSum through `datasets` instead of data_dir's JSONL exports
    hf: dict[Literal[HELMET_HF_DATASETS], HelmetHFConfig] = {}  # type: ignore[valid-type]
    lengths: list[Tokens] | None = None  # default: eval.lengths
    max_items: int = Field(default=100, gt=0)  # per dataset and length (HELMET: 100)
    # per ICL dataset and length; None: 5 × max_items (HELMET: 500 against 100)
    icl_max_items: int | None = Field(default=None, gt=0)
    shots: int = Field(default=2, ge=0)  # demonstrations for RAG, re-rank, QA and Summ (HELMET: 2)
    # generation budgets by task kind (rag, rerank, icl, narrativeqa, multi_lexsum); default HELMET's
    max_new_tokens: dict[Literal["rag", "rerank", "icl", "narrativeqa", "multi_lexsum"], int] = {}
    seed: int = 42
    # chat template: None follows HELMET's configs (on for QA and Summ when evaluating the SFT stage,
    # off for RAG, re-rank and ICL); true/false forces it for every task
    use_chat_template: bool | None = None
    # HELMET cuts books and case files with Llama-2's tokenizer (meta-llama/Llama-2-7b-hf) before the
    # model's own cut; None: the evaluated model's tokenizer
    truncation_tokenizer: str | None = None
    # HELMET keeps NarrativeQA stories over 128K and Multi-LexSum cases of 64K+ tokens; applied when
    # reading the raw sets (hf, or HELMET's multi_lexsum_val.jsonl), not to our own JSONL exports
    min_context_tokens: dict[Literal["narrativeqa", "multi_lexsum"], int] = {"narrativeqa": 131073,
                                                                             "multi_lexsum": 65536}
    # Multi-LexSum key points: HELMET's multi_lexsum_val.jsonl (id, summary/short_keypoints), a path
    # or URL, relative paths under data_dir; default: data_dir's multi_lexsum/multi_lexsum_val.jsonl
    # when present; items without key points get them from the judge
    key_points: str | None = None

    @model_validator(mode="after")
    def _sources(self):
        from_files = [d for d in self.datasets if d not in self.hf]
        if self.data_dir is None and from_files:
            raise ValueError(f"data_dir: needed for {', '.join(from_files)} (or list them under hf)")
        return self


def _changed(cfg: _Config, names) -> list[str]:
    """Those of ``names`` not at their defaults: a field of the view a config does not use. (Not
    "set": a stored recipe is read back with every field written out.)"""
    return [n for n in names if getattr(cfg, n) != type(cfg).model_fields[n].default]


class PasskeyConfig(_Config):
    """Passkey retrieval. ``style: prolong``: the key at ``depths`` of filler cut to exact token
    ``lengths``. ``style: longlora``: LongLoRA's passkey_retrivial.py — test points every
    ``interval`` up to ``max_tokens``, filler sized in characters (3.75 a token), the key at a
    random position, ``num_tests`` keys per point, scored on the key's tokens."""

    ADDED_LATER = frozenset({"style", "interval", "max_tokens", "num_tests"})
    style: Literal["prolong", "longlora"] = "prolong"
    lengths: list[Tokens] | None = None
    depths: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 0.25, 0.5, 0.75, 1.0]
    samples_per_depth: int = Field(default=2, gt=0)
    max_new_tokens: int = Field(default=10, gt=0)
    # the script's defaults (--interval 1000, --max_tokens 32000, --num_tests 10)
    interval: Tokens = 1000
    max_tokens: Tokens = 32000
    num_tests: int = Field(default=10, gt=0)
    seed: int = 0  # longlora: the first test's seed (the script's: 0)

    @model_validator(mode="after")
    def _style(self):
        own = {"prolong": ("lengths", "depths", "samples_per_depth", "max_new_tokens"),
               "longlora": ("interval", "max_tokens", "num_tests")}
        for style, names in own.items():
            if style != self.style and (wrong := _changed(self, names)):
                raise ValueError(f"{wrong[0]}: applies to style {style}, not {self.style}")
        if self.style == "longlora":
            from prolong.eval.synthetic.passkey import LONGLORA_FILLER, longlora_filler_chars

            if self.interval > self.max_tokens:
                raise ValueError(f"interval: {self.interval} is above max_tokens {self.max_tokens}")
            if longlora_filler_chars(self.interval) == 0:
                raise ValueError(f"interval: {self.interval} tokens gets no filler in LongLoRA's sizing "
                                 "(3.75 characters a token, in whole 1024s): use 274 or more")
            if longlora_filler_chars(self.max_tokens // self.interval * self.interval) > len(LONGLORA_FILLER):
                raise ValueError(f"max_tokens: {self.max_tokens} needs more filler than LongLoRA's "
                                 f"{len(LONGLORA_FILLER)} characters")
        return self

    def test_lengths(self) -> list[int] | None:
        """longlora: the script's test points; prolong: None (``lengths`` or the stage's)."""
        if self.style != "longlora":
            return None
        from prolong.eval.synthetic.passkey import longlora_lengths

        return longlora_lengths(self.interval, self.max_tokens)


class NeedleConfig(_Config):
    haystack: str  # a text/jsonl file of prose (Kamradt used Paul Graham's essays)
    lengths: list[Tokens] | None = None
    depths: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 0.25, 0.5, 0.75, 1.0]
    max_new_tokens: int = Field(default=32, gt=0)


class PerplexityConfig(_Config):
    """Long-document perplexity, in one of two views. Without ``seq_lens``, the paper's PG19 view:
    loss on the last ``last`` tokens of ``length``-token documents. With ``seq_lens``, LongLoRA's
    (eval.py, its Table 1): the documents as one token stream cut into ``seq_len``-token windows
    every ``sliding_window`` tokens, each window's whole loss, a perplexity per ``seq_len``."""

    ADDED_LATER = frozenset({"seq_lens", "sliding_window", "batch_size"})
    source: Source
    length: Tokens = 65536
    last: Tokens = 32768
    max_docs: int = Field(default=16, gt=0)
    seq_lens: list[Tokens] | None = Field(default=None, min_length=1)
    sliding_window: Tokens = 256  # eval.py calls evaluate(..., sliding_window=256)
    # windows per forward pass; the mean is over batches of window means, as eval.py averages
    # (its README's commands: --batch_size 1)
    batch_size: int = Field(default=1, gt=0)

    @model_validator(mode="after")
    def _view(self):
        if self.seq_lens is None:
            if wrong := _changed(self, ("sliding_window", "batch_size")):
                raise ValueError(f"{wrong[0]}: applies with seq_lens (LongLoRA's sliding-window perplexity)")
            if not 0 < self.last < self.length:
                raise ValueError(f"last: {self.last} must be below length {self.length}")
            return self
        if wrong := _changed(self, ("length", "last")):
            raise ValueError(f"{wrong[0]}: applies without seq_lens; with seq_lens every window's whole loss counts")
        for i, seq_len in enumerate(self.seq_lens):
            if seq_len in self.seq_lens[:i]:
                raise ValueError(f"seq_lens: {seq_len} is listed twice")
            if self.sliding_window > seq_len:
                raise ValueError(f"sliding_window: {self.sliding_window} is above seq_len {seq_len} (LongLoRA's "
                                 "eval needs seq_len >= sliding_window)")
        return self

    def parts(self) -> list[int]:
        """The lengths evaluated: ``seq_lens``, or the one ``length``."""
        return list(self.seq_lens or [self.length])


class PositionLossConfig(_Config):
    """Loss by token position on long documents, the standard long-context diagnostic: a model that
    uses its context predicts later tokens better, so its loss falls with position. ``buckets``
    equal spans of positions, each the mean token loss over ``max_docs`` documents."""

    source: Source
    length: Tokens = 65536
    buckets: int = Field(default=8, gt=1)
    max_docs: int = Field(default=16, gt=0)

    @model_validator(mode="after")
    def _fits(self):
        if self.length % self.buckets:
            raise ValueError(f"buckets: {self.buckets} does not divide length {self.length}")
        return self


class JudgeConfig(_Config):
    """An OpenAI-compatible chat endpoint scoring QA and summaries with the model card's rubrics."""

    base_url: str | None = None  # or PROLONG_JUDGE_BASE_URL / OPENAI_BASE_URL
    model: str = "gpt-4o-2024-05-13"  # the judge the ProLong paper used
    api_key_env: str = "OPENAI_API_KEY"  # the *name* of the variable holding the key
    retries: int = Field(default=3, ge=0)
    timeout_s: float = Field(default=120, gt=0)
    backoff_s: float = Field(default=2.0, ge=0)
    # HELMET's judge calls (scripts/eval_gpt4_*.py): temperature 0.1, top_p 0.9, seed 42, up to 4096 tokens
    temperature: float = Field(default=0.1, ge=0)
    top_p: float = Field(default=0.9, gt=0, le=1)
    seed: int | None = 42
    max_tokens: int = Field(default=4096, gt=0)
    # "card": the ProLong model card's QA and summary-fluency rubrics; "helmet": HELMET's scripts' wording
    rubrics: Literal["card", "helmet"] = "card"


class LmEvalConfig(_Config):
    tasks: list[str] = Field(min_length=1)
    num_fewshot: int | dict[str, int] = 0  # one lm-eval call per distinct shot count
    include_path: str | None = None  # folder of local task YAMLs
    limit: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=1, gt=0)
    max_length: Tokens | None = None  # default: the evaluated stage's seq_len

    def shots(self, task: str) -> int:
        return self.num_fewshot if isinstance(self.num_fewshot, int) else self.num_fewshot.get(task, 0)


class ServeConfig(_Config):
    """A server the eval job starts for the evaluated model, on 127.0.0.1, and stops at the end."""

    engine: Literal["llama_cpp", "vllm"] = "llama_cpp"
    # llama_cpp: which GGUF of the export stage to serve, by type (f16, q8_0, Q4_K_M ...; default its
    # first), or ``file``: a GGUF (llama_cpp) or HF folder (vllm) by path
    gguf: str | None = None
    file: str | None = None
    args: list[str] = []  # more arguments for the server's command line
    startup_timeout_s: float = Field(default=600, gt=0)


class EvalConfig(StageConfig):
    """``kind: eval``: the evaluation of one model of the recipe (``model_from``, a training stage;
    default: the last one declared before it)."""

    kind: Literal["eval"] = "eval"
    ADDED_LATER = frozenset({"position_loss", "backend", "base_url", "serve", "served_model", "request_timeout_s"})
    model_from: str | None = None
    # hf: the model in this process through transformers' generate; openai: prompts sent to an
    # OpenAI-compatible completions server (vLLM, SGLang, llama.cpp's) — ``base_url``, or one ``serve`` starts
    backend: Literal["hf", "openai"] = "hf"
    base_url: str | None = None  # e.g. http://127.0.0.1:8000/v1
    serve: ServeConfig | None = None
    served_model: str | None = None  # the "model" field of requests; default: the server's first model
    request_timeout_s: float = Field(default=600, gt=0)
    lengths: list[Tokens] = Field(default=[32768, 65536, 131072], min_length=1)  # HELMET's 32K/64K/128K
    json_kv: JsonKVConfig | None = None
    helmet: HelmetConfig | None = None
    judge: JudgeConfig | None = None  # without it, QA and summaries report automatic metrics only
    passkey: PasskeyConfig | None = None
    needle: NeedleConfig | None = None
    perplexity: PerplexityConfig | None = None
    position_loss: PositionLossConfig | None = None
    lm_eval: LmEvalConfig | None = None

    def lengths_of(self, task) -> list[int]:
        own = task.test_lengths() if isinstance(task, PasskeyConfig) else None
        return own or list(task.lengths or self.lengths)
