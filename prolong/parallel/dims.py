"""The arithmetic of a training job's ranks, torch-free (torchtitan's ParallelDims, without the mesh).

A stage's job has ``world`` ranks (``jobs.nproc_per_node`` × nodes); groups of ``sp`` consecutive
ranks share one sequence (Ulysses sequence parallelism), so ``dp = world / sp`` groups read
different sequences. Everything that follows from these numbers — does SP divide the ranks, how
many micro-batches make one optimizer step, how key/value heads travel between the ranks — is
computed here once, from the recipe, both by the orchestrator before a run starts (prolong.preflight)
and by the job (which builds its device mesh from the same value).
"""

from __future__ import annotations

from dataclasses import dataclass

from prolong.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    world: int
    sp: int = 1
    field: str = "sequence_parallel"  # the recipe field errors name, e.g. "stage2.sequence_parallel"

    def __post_init__(self):
        if self.world % self.sp:
            raise ConfigError(f"{self.field}: {self.sp} does not divide the {self.world} ranks of the job")

    @property
    def dp(self) -> int:
        return self.world // self.sp

    @classmethod
    def for_stage(cls, recipe, stage: str, world: int) -> "ParallelDims":
        return cls(world=world, sp=recipe.train_stage(stage).sequence_parallel, field=f"{stage}.sequence_parallel")

    def accumulation(self, global_batch: int, micro_batch: int, field: str) -> int:
        """Micro-batches per optimizer step on each rank: global batch / (micro-batch × dp)."""
        per_pass = micro_batch * self.dp
        if global_batch % per_pass:
            raise ConfigError(f"{field}: {global_batch} sequences per step do not divide into micro-batches of "
                              f"{micro_batch} on {self.dp} data-parallel ranks")
        return global_batch // per_pass

    def kv_expansion(self, num_heads: int, num_kv_heads: int) -> int:
        """How many times each KV head is repeated before the all-to-all (1: sent unexpanded)."""
        return kv_expansion(num_heads, num_kv_heads, self.sp, self.field)


def kv_expansion(num_heads: int, num_kv_heads: int, sp: int, field: str = "sequence_parallel") -> int:
    """How many times each KV head is repeated before Ulysses' all-to-all (1: sent unexpanded)."""
    if num_heads % sp:
        raise ConfigError(f"{field}: {sp} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % sp == 0:
        return 1
    if sp % num_kv_heads == 0:
        return sp // num_kv_heads
    raise ConfigError(f"{field}: {sp} and the model's {num_kv_heads} key/value heads do not divide one another")


def job_ranks(jobs, *, all_nodes: bool) -> int:
    """Ranks of a job: processes per node × nodes (only training spans nodes on a cluster)."""
    nodes = jobs.slurm.nodes if jobs.backend == "slurm" and all_nodes else 1
    return jobs.nproc_per_node * nodes
