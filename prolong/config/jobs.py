"""How stages run: the training engine (``parallel:``) and the job backend (``jobs:``, Slurm)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from prolong.config.base import _Config

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


class StreamCacheConfig(_Config):
    """Where training jobs cache the shards they stream (mosaicml-streaming's ``local``), and how much."""

    dir: str | None = None  # None: the node's temporary folder; set a fast local disk for real runs
    # e.g. "200gb": shards beyond it are evicted (streaming's cache_limit); None: keep every shard fetched
    limit: str | None = Field(default=None, pattern=r"^\d+(\.\d+)?\s*[kmgt]?b$")


class JobsConfig(_Config):
    backend: Literal["local", "slurm"] = "local"
    nproc_per_node: int = Field(default=1, gt=0)
    time_limit_minutes: float | None = Field(default=None, gt=0)
    env: dict[str, str] = {}
    # dense bf16 peak per device for MFU; known GPUs are looked up by name, CPUs have none
    peak_tflops: float | None = Field(default=None, gt=0)
    slurm: SlurmConfig = SlurmConfig()
    stream_cache: StreamCacheConfig = StreamCacheConfig()
    # at most this many jobs of one stage's parts at once (a data stage split by domain); 0: the local
    # machine's cores, or all parts at once on Slurm
    max_parallel_parts: int = Field(default=0, ge=0)

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
