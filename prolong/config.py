"""Recipe schema: YAML → typed, validated, immutable configs.

A recipe composes one config per concern (model, data, each training stage, eval, jobs), in the
spirit of OLMo-core's experiment configs. Validation happens once, here; a bad field fails with one
line naming its dotted path (``stage2.mixture: proportions sum to 0.97, not 1``).

Token counts accept integers or binary-suffixed strings: ``64K`` = 65,536, ``4M`` = 4,194,304.
"""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from prolong.errors import ConfigError

TRAIN_STAGES = ("stage1", "stage2", "sft")
_SUFFIX = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_tokens(value: Any) -> int:
    """``65536``, ``"64K"`` and ``"0.5M"`` → token counts (binary suffixes, as ML papers use them)."""
    if isinstance(value, bool):
        raise ValueError("expected a token count, got a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KkMmGg]?)\s*", str(value))
    if not m:
        raise ValueError(f"expected a token count like 65536 or 64K, got {value!r}")
    n = float(m.group(1)) * _SUFFIX[m.group(2).upper()]
    if not n.is_integer():
        raise ValueError(f"{value!r} is not a whole number of tokens")
    return int(n)


def format_tokens(n: int) -> str:
    """Inverse of :func:`parse_tokens` for display and stream names: 65536 → ``64K``."""
    for suffix in ("G", "M", "K"):
        if n >= _SUFFIX[suffix] and n % _SUFFIX[suffix] == 0:
            return f"{n // _SUFFIX[suffix]}{suffix}"
    return str(n)


Tokens = Annotated[int, BeforeValidator(parse_tokens), Field(gt=0)]


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---------------------------------------------------------------- model


class ModelConfig(_Config):
    """The model to continue training: an HF hub id, a local directory, or ``builtin:NAME``."""

    path: str
    tokenizer: str | None = None  # defaults to `path`
    revision: str | None = None
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    # auto: flash-attn varlen if installed on a GPU, else FlexAttention on a GPU, else SDPA.
    attention: Literal["auto", "sdpa", "flex", "flash"] = "auto"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.path


# ---------------------------------------------------------------- data sources


class RepoSource(_Config):
    """A folder whose sub-folders are code repositories: one document per repository."""

    type: Literal["repos"]
    path: str
    files: list[str] = ["*"]  # globs of files to keep inside each repository
    exclude: list[str] = []  # globs of repository names to skip


class _RowSource(_Config):
    text_field: str = "text"
    messages_field: str = "messages"  # chats; in long/short domains they are rendered as plain text
    # keep rows whose (dotted) fields equal these values, e.g. {meta.redpajama_set_name: RedPajamaBook}
    where: dict[str, Any] = {}
    # one document per distinct value of this field (a repository, a book, a subject) ...
    group_by: str | None = None
    # ... with its parts sorted by this field (chapters of a book); unset: a seeded random order
    # (the files of a repository, as the paper does: not dependency order)
    order_by: str | None = None


class FileSource(_RowSource):
    """Local or remote files (jsonl, json, txt, parquet); a path may be a file, folder or glob."""

    type: Literal["files"]
    path: str
    format: Literal["auto", "jsonl", "txt", "parquet"] = "auto"


class HFSource(_RowSource):
    """A Hugging Face dataset by name (``datasets.load_dataset``), streamed by default."""

    type: Literal["hf"]
    name: str
    subset: str | None = None
    split: str = "train"
    data_dir: str | None = None
    data_files: str | list[str] | None = None
    revision: str | None = None
    streaming: bool = True


Source = Annotated[Union[RepoSource, FileSource, HFSource], Field(discriminator="type")]


class DomainConfig(_Config):
    """A named data domain. ``long``: cut into single-document samples of the stream length;
    ``short``: packed with the truncated remainder carried over; ``sft``: chat data, packed with
    the remainder discarded and a loss mask on assistant tokens (paper §A.2)."""

    kind: Literal["long", "short", "sft"]
    source: Source
    max_documents: int | None = Field(default=None, gt=0)


class DataConfig(_Config):
    seed: int = 42
    num_workers: int = Field(default=0, ge=0)  # 0: all cores
    domains: dict[str, DomainConfig]
    compression: str | None = "zstd"
    # Extra samples written beyond what the stage mixtures consume, so a stream is not repeated.
    oversample: float = Field(default=1.0, ge=1.0)
    # The report's "share of documents longer than" columns (the paper's Table 14 uses 4K-32K).
    report_thresholds: list[Tokens] = [4096, 8192, 16384, 32768]

    @model_validator(mode="after")
    def _names(self):
        for name in self.domains:
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                raise ValueError(f"domains.{name}: domain names use letters, digits, '_' and '-' only")
        return self


# ---------------------------------------------------------------- training stages


class OptimConfig(_Config):
    """AdamW as in Table 9."""

    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    grad_clip: float = Field(default=1.0, gt=0)


class MixtureComponent(_Config):
    """One stream of a stage: a domain, and for long domains the document length it is cut to."""

    domain: str
    doc_len: int | None  # None: packed to the stage's sequence length
    proportion: float


class TrainStageConfig(_Config):
    seq_len: Tokens
    rope_theta: float = Field(gt=0)
    steps: int = Field(gt=0)
    batch_tokens: Tokens  # global batch; accumulation = batch_tokens / (seq_len · micro_batch · dp)
    micro_batch_size: int = Field(default=1, gt=0)
    lr: float = Field(gt=0)
    warmup_ratio: float = Field(default=0.1, ge=0, lt=1)
    min_lr_ratio: float = Field(default=0.1, ge=0, le=1)
    optim: OptimConfig = OptimConfig()
    # "domain" or "domain@LEN" (long domains cut to LEN-token documents) → proportion of samples.
    mixture: dict[str, float]
    init_from: str | None = None  # "model" or an earlier stage; default: the stage before
    keep_optimizer_state: bool = False  # carry Adam moments from init_from (ProLong stage 2)
    sequence_parallel: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=0, ge=0)  # 0: only the final checkpoint
    loss_chunk_size: int = Field(default=8192, gt=0)
    reorder_minibatches: bool = True
    activation_checkpointing: bool = True
    compile: bool = False
    seed: int | None = None

    @property
    def global_batch_size(self) -> int:
        return self.batch_tokens // self.seq_len

    def components(self) -> list[MixtureComponent]:
        out = []
        for key, proportion in self.mixture.items():
            domain, _, length = key.partition("@")
            out.append(MixtureComponent(domain=domain, doc_len=parse_tokens(length) if length else None,
                                        proportion=proportion))
        return out

    @model_validator(mode="after")
    def _shape(self):
        if self.batch_tokens % self.seq_len:
            raise ValueError(f"batch_tokens: {self.batch_tokens} is not a multiple of seq_len {self.seq_len}")
        if self.seq_len % self.sequence_parallel:
            raise ValueError(f"sequence_parallel: {self.sequence_parallel} does not divide seq_len {self.seq_len}")
        if self.sequence_parallel > 1 and self.micro_batch_size != 1:
            raise ValueError(f"micro_batch_size: must be 1 with sequence_parallel {self.sequence_parallel} "
                             "(a sequence-parallel group shares one sequence)")
        total = sum(self.mixture.values())
        if not self.mixture or not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"mixture: proportions sum to {total:.6g}, not 1")
        for key, p in self.mixture.items():
            if p <= 0:
                raise ValueError(f"mixture.{key}: proportion must be > 0, got {p}")
            _, _, length = key.partition("@")
            if length:
                try:
                    n = parse_tokens(length)
                except ValueError as e:
                    raise ValueError(f"mixture.{key}: {e}") from None
                if n > self.seq_len or self.seq_len % n:
                    raise ValueError(f"mixture.{key}: document length {n} must divide seq_len {self.seq_len}")
        return self


# ---------------------------------------------------------------- evaluation


class JsonKVConfig(_Config):
    """Recall: HELMET's JSON KV, generated offline for the recipe's tokenizer."""

    lengths: list[Tokens] | None = None  # default: eval.lengths
    depths: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    samples_per_depth: int = Field(default=2, gt=0)
    max_new_tokens: int = Field(default=100, gt=0)
    seed: int = 0


HELMET_DATASETS = ("nq", "triviaqa", "hotpotqa", "popqa", "msmarco", "trec_coarse", "trec_fine", "banking77",
                   "clinc150", "nlu", "narrativeqa", "multi_lexsum")
# the ProLong paper's subset of HELMET (TriviaQA, in HELMET's RAG average, is available but not run by default)
HELMET_DEFAULT_DATASETS = [d for d in HELMET_DATASETS if d != "triviaqa"]
HELMET_HF_DATASETS = ("trec_coarse", "trec_fine", "banking77", "clinc150", "nlu", "narrativeqa", "multi_lexsum")


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


class PasskeyConfig(_Config):
    lengths: list[Tokens] | None = None
    depths: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 0.25, 0.5, 0.75, 1.0]
    samples_per_depth: int = Field(default=2, gt=0)
    max_new_tokens: int = Field(default=10, gt=0)
    seed: int = 0


class NeedleConfig(_Config):
    haystack: str  # a text/jsonl file of prose (Kamradt used Paul Graham's essays)
    lengths: list[Tokens] | None = None
    depths: list[Annotated[float, Field(ge=0, le=1)]] = [0.0, 0.25, 0.5, 0.75, 1.0]
    max_new_tokens: int = Field(default=32, gt=0)


class PerplexityConfig(_Config):
    """The paper's PG19 view: loss on the last ``last`` tokens of ``length``-token documents."""

    source: Source
    length: Tokens = 65536
    last: Tokens = 32768
    max_docs: int = Field(default=16, gt=0)

    @model_validator(mode="after")
    def _last(self):
        if not 0 < self.last < self.length:
            raise ValueError(f"last: {self.last} must be below length {self.length}")
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


class EvalConfig(_Config):
    model_from: str = "sft"
    lengths: list[Tokens] = Field(default=[32768, 65536, 131072], min_length=1)  # HELMET's 32K/64K/128K
    json_kv: JsonKVConfig | None = None
    helmet: HelmetConfig | None = None
    judge: JudgeConfig | None = None  # without it, QA and summaries report automatic metrics only
    passkey: PasskeyConfig | None = None
    needle: NeedleConfig | None = None
    perplexity: PerplexityConfig | None = None
    lm_eval: LmEvalConfig | None = None

    def lengths_of(self, task) -> list[int]:
        return list(task.lengths or self.lengths)


# ---------------------------------------------------------------- parallelism


class ParallelConfig(_Config):
    """How training shards the model: FSDP2 (default) or DeepSpeed ZeRO."""

    engine: Literal["fsdp", "deepspeed"] = "fsdp"
    zero_stage: Literal[2, 3] = 3  # DeepSpeed only


# ---------------------------------------------------------------- jobs


class SlurmConfig(_Config):
    """What a job asks Slurm for (``jobs.backend: slurm``); unset fields leave the cluster's defaults."""

    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    nodes: int = Field(default=1, gt=0)  # training stages; data and eval jobs always take one node
    gpus_per_node: int = Field(default=0, ge=0)  # 0: ask for none (CPU clusters)
    cpus_per_task: int | None = Field(default=None, gt=0)  # one task per node; None: one per process
    mem: str | None = Field(default=None, pattern=r"^\d+[KMGT]?$")  # per node, as --mem ("0": all of it)
    time_limit_minutes: float | None = Field(default=None, gt=0)  # jobs.time_limit_minutes wins if set
    # further sbatch options, one per entry, e.g. "--constraint=h100" or "--exclusive"
    extra_directives: list[str] = []
    # Slurm sends SIGUSR1 this long before the time limit: ranks checkpoint and the job requeues itself
    signal_grace_s: int = Field(default=120, gt=0, le=65535)
    requeue: bool = True  # requeue after a checkpoint-and-exit (75); also lets preemption requeue the job
    rdzv_port: int | None = Field(default=None, ge=1024, le=65535)  # None: 20000 + job id % 20000

    @model_validator(mode="after")
    def _directives(self):
        for d in self.extra_directives:
            if not d.startswith("-") or "\n" in d:
                raise ValueError(f"extra_directives: {d!r} is not one sbatch option like '--constraint=h100'")
        return self


class JobsConfig(_Config):
    backend: Literal["local", "slurm"] = "local"
    nproc_per_node: int = Field(default=1, gt=0)
    time_limit_minutes: float | None = Field(default=None, gt=0)
    env: dict[str, str] = {}
    # dense bf16 peak per device for MFU; known GPUs are looked up by name, CPUs have none
    peak_tflops: float | None = Field(default=None, gt=0)
    slurm: SlurmConfig = SlurmConfig()

    @field_validator("env")
    @classmethod
    def _no_credentials(cls, env: dict[str, str]) -> dict[str, str]:
        # a recipe is stored with every run (recipe.json, manifests): credentials never belong in it
        for key in env:
            if re.search(r"SECRET|TOKEN|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIAL", key.upper()):
                raise ValueError(f"{key}: looks like a credential; set it in the environment or pass a Prefect "
                                 "Secret block (--secret ENV=BLOCK), never in a recipe")
        return env

    @model_validator(mode="after")
    def _fits_the_node(self):
        gpus = self.slurm.gpus_per_node
        if self.backend == "slurm" and gpus and self.nproc_per_node > gpus:
            raise ValueError(f"nproc_per_node: {self.nproc_per_node} processes per node but "
                             f"jobs.slurm.gpus_per_node is {gpus}")
        return self


# ---------------------------------------------------------------- recipe


class Recipe(_Config):
    name: str  # also the default run name: one safe path segment (prolong.layout)
    seed: int = 42
    model: ModelConfig
    data: DataConfig
    stage1: TrainStageConfig
    stage2: TrainStageConfig | None = None
    sft: TrainStageConfig | None = None
    eval: EvalConfig | None = None
    parallel: ParallelConfig = ParallelConfig()
    jobs: JobsConfig = JobsConfig()

    def train_stage(self, name: str) -> TrainStageConfig:
        cfg = getattr(self, name)
        if cfg is None:
            raise ConfigError(f"{name}: this recipe has no {name} section")
        return cfg

    def stage_seed(self, name: str) -> int:
        seed = self.train_stage(name).seed
        return self.seed if seed is None else seed

    def present_train_stages(self) -> list[str]:
        return [s for s in TRAIN_STAGES if getattr(self, s) is not None]

    def init_source(self, stage: str) -> str:
        """Where a training stage takes its weights from: "model" or an earlier stage."""
        explicit = self.train_stage(stage).init_from
        if explicit:
            return explicit
        earlier = [s for s in self.present_train_stages() if TRAIN_STAGES.index(s) < TRAIN_STAGES.index(stage)]
        return earlier[-1] if earlier else "model"

    @field_validator("name")
    @classmethod
    def _safe_name(cls, name: str) -> str:
        from prolong.layout import NAME_RULE, check_name

        try:
            return check_name(name, "name")
        except ConfigError:
            raise ValueError(f"{name!r} is not a valid run name ({NAME_RULE})") from None

    @model_validator(mode="after")
    def _cross_fields(self):
        present = self.present_train_stages()
        for stage in present:
            cfg = getattr(self, stage)
            for comp in cfg.components():
                domain = self.data.domains.get(comp.domain)
                where = f"{stage}.mixture.{comp.domain}"
                if domain is None:
                    raise ValueError(f"{where}: no such domain in data.domains")
                if (stage == "sft") != (domain.kind == "sft"):
                    want = "sft" if stage == "sft" else "long or short"
                    raise ValueError(f"{where}: {stage} needs {want} domains, {comp.domain} is {domain.kind}")
                if comp.doc_len is not None and domain.kind != "long":
                    raise ValueError(f"{where}: a document length (@) applies to long domains only")
            init = self.init_source(stage)
            if init != "model" and (init not in present or TRAIN_STAGES.index(init) >= TRAIN_STAGES.index(stage)):
                raise ValueError(f"{stage}.init_from: {init!r} is not an earlier stage of this recipe")
            if cfg.keep_optimizer_state and init == "model":
                raise ValueError(f"{stage}.keep_optimizer_state: needs init_from to name an earlier stage")
        if self.eval is not None and self.eval.model_from not in present:
            raise ValueError(f"eval.model_from: {self.eval.model_from!r} is not a training stage of this recipe")
        return self


# ---------------------------------------------------------------- loading


def _format_validation_error(err: ValidationError) -> str:
    """First error as ``dotted.path: reason``, the path being the one a user writes in YAML."""
    first = err.errors()[0]
    parts = [str(p) for p in first["loc"] if not str(p).startswith("function-")]
    # a discriminated union adds its tag after `source`; the YAML path has no such level
    parts = [p for i, p in enumerate(parts) if not (i and parts[i - 1] == "source" and p in ("repos", "files", "hf"))]
    loc = ".".join(parts)
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "value_error" and re.match(r"^[\w@.\-]+: ", msg):
        # a model validator's message names the field relative to the model it validates
        return f"{loc}.{msg}" if loc else msg
    return f"{loc}: {msg}" if loc else msg


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """``["stage1.steps=10", "jobs.nproc_per_node=2"]`` → a new dict; values parse as YAML."""
    out = copy.deepcopy(raw)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key.path=value")
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {} if node.get(part) is None else node[part]
                if not isinstance(node[part], dict):
                    raise ConfigError(f"--set {key}: {part} is not a section")
            node = node[part]
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key.strip()}: {value!r} is not a valid YAML value "
                              f"({getattr(e, 'problem', None) or type(e).__name__})") from None
    return out


def recipe_from_dict(raw: dict) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e)) from None


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe is a YAML mapping")
    return recipe_from_dict(apply_overrides(raw, overrides))


def recipe_to_dict(recipe: Recipe) -> dict:
    return recipe.model_dump(mode="json")
