"""``prolong doctor RUN``: check everything a run recorded, and say what to re-run.

For each stage: its manifest (valid JSON, matching its seal), every output it lists (size and
sha256), and — for a stage still training — each complete checkpoint against its ``COMPLETE``
record. Also the run's lease (who holds it, or that it is stale) and earlier outputs set aside by
an attempt that did not finish. Nothing is changed: the report names each damaged file and the
``--from-stage`` that rebuilds it.

Torch-free (it only reads the store).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prolong import layout
from prolong.recipe import Recipe
from prolong.integrity import checkpoint_damage, find_damage
from prolong.lease import describe, is_live, read_lease
from prolong.manifest import DamagedManifest, read_manifest
from prolong.store import Store


@dataclass
class StageHealth:
    stage: str
    state: str  # ok | damaged | not run | unfinished
    files: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def fix(self) -> str | None:
        return f"--from-stage {self.stage}" if self.state == "damaged" else None


@dataclass
class RunHealth:
    run: str
    stages: list[StageHealth]
    lease: str

    @property
    def healthy(self) -> bool:
        return all(s.state != "damaged" for s in self.stages)

    def to_json(self) -> dict:
        return {"run": self.run, "healthy": self.healthy, "lease": self.lease,
                "stages": [{**s.__dict__, "fix": s.fix} for s in self.stages]}


def diagnose(store: Store, run: str, recipe: Recipe, *, content: bool = True) -> RunHealth:
    stages = []
    for stage in recipe.graph.order:
        prefix = layout.stage_prefix(run, stage)
        health = StageHealth(stage, "not run")
        try:
            m = read_manifest(store, run, stage)
        except DamagedManifest as e:
            health.state, health.problems = "damaged", [str(e)]
            stages.append(health)
            continue
        if m is not None:
            health.files = len(m.outputs)
            damage = find_damage(store, prefix, m.outputs, content=content)
            health.state = "damaged" if damage else "ok"
            health.problems = [f"{store.uri(prefix)}/{d}" for d in damage]
        else:
            steps = layout.complete_steps(store, prefix)
            if steps:
                health.state = "unfinished"
            for step in steps:
                problem = checkpoint_damage(store, prefix, step)
                if problem:  # not fatal: resuming falls back to the checkpoint before it
                    health.notes.append(f"checkpoint step {step} is damaged ({problem}); resuming skips it")
        aside = layout.previous_prefix(run, stage)
        if store.exists(aside):
            health.notes.append(f"earlier outputs kept aside in {store.uri(aside)} until a new attempt succeeds")
        stages.append(health)
    holder = read_lease(store, layout.lease(run))
    lease = "free" if not holder else (f"held by {describe(holder)}" if is_live(holder)
                                       else f"stale (left by {describe(holder)}); the next run takes it over")
    return RunHealth(run, stages, lease)


def report(health: RunHealth) -> str:
    lines = [f"run {health.run}: {'healthy' if health.healthy else 'DAMAGED'}; lease {health.lease}"]
    width = max([7, *(len(s.stage) for s in health.stages)])
    for s in health.stages:
        detail = f"{s.files} files verified" if s.state == "ok" else ""
        lines.append(f"  {s.stage:{width}s} {s.state:10s} {detail}".rstrip())
        lines += [f"          damaged: {p}" for p in s.problems[:10]]
        if len(s.problems) > 10:
            lines.append(f"          ... and {len(s.problems) - 10} more")
        lines += [f"          note: {n}" for n in s.notes]
        if s.fix:
            lines.append(f"          fix: prolong run RECIPE --run-name {health.run} {s.fix}")
    return "\n".join(lines)
