"""Checks before a run starts: whatever would fail a job for a reason that is known already.

A typo in a data path, a model folder that does not exist, ``sequence_parallel`` that does not
divide the ranks, ``attention: flash`` with no GPU — found now, in one line, before any stage runs
or any earlier output is set aside, and for *every* stage that will run (stage 2's SP is checked
before data preparation and stage 1 spend hours). What to check is each stage kind's own
(:meth:`prolong.stages.base.Stage.check`).

Torch-free.
"""

from __future__ import annotations

from prolong.manifest import DamagedManifest, read_manifest, stage_state


def stages_to_run(ctx, chosen: list[str], forced: set[str]) -> list[str]:
    """The chosen stages that will run: forced, not done, or downstream of one that runs."""
    out: list[str] = []
    for stage in chosen:
        state, _ = stage_state(ctx.store, ctx.run, ctx.recipe, stage)
        if stage in forced or state != "done" or any(u in out for u in ctx.recipe.graph.upstream(stage)):
            out.append(stage)
    return out


def check_run(ctx, chosen: list[str], forced: set[str]) -> list[str]:
    """Check everything the stages about to run need; returns those stages. Raises a one-line
    ProlongError naming the field or file."""
    for stage in chosen:
        if stage not in forced:
            try:
                read_manifest(ctx.store, ctx.run, stage)
            except DamagedManifest as e:  # days of work may hang on it: rebuilding is the user's call
                raise DamagedManifest(f"{e}; `prolong doctor {ctx.run}` checks the whole run") from None
    todo = stages_to_run(ctx, chosen, forced)
    for stage in todo:
        ctx.recipe.graph[stage].check(ctx, reruns=set(todo))
    ctx.store.check_writable(ctx.run)  # last: a run refused for its input leaves nothing behind
    return todo
