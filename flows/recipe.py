"""The ``prolong-recipe`` flow: data → stage1 → stage2 → sft → eval, each stage one task.

Trigger it from the Prefect UI (a deployment in prefect.yaml), the CLI (``prolong run``), or
Python. Re-running a run name continues where it stopped: finished stages are skipped by their
manifests, and an interrupted training stage resumes from its newest checkpoint. The flow run holds
the run's lease throughout, and checks every stage that will run before the first one starts.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from prolong.recipe import load_recipe, recipe_to_dict
from prolong.eval.report import side_by_side
from prolong.layout import check_run_name, run_report
from prolong.pipeline import RunContext, publish_recipe, summarize_metrics
from prolong.preflight import check_run
from prolong.store import DEFAULT_STORE, open_store
from flows.runs import holding
from flows.secrets import load_secrets
from tasks.stages import artifact_key, best_effort, stage_task


def _flow_run_name() -> str:
    params = flow_run.parameters
    if params.get("run_name"):
        return params["run_name"]
    try:
        return load_recipe(params["recipe"]).name
    except Exception:  # an invalid recipe fails inside the flow, with its one-line message
        return "prolong-recipe"


@flow(name="prolong-recipe", flow_run_name=_flow_run_name, log_prints=True)
def prolong_recipe(recipe: str = "recipes/tiny.yaml", run_name: str | None = None, store: str = DEFAULT_STORE,
                   stages: list[str] | None = None, from_stage: str | None = None,
                   overrides: list[str] | None = None, secrets: dict[str, str] | None = None) -> dict:
    """Run the recipe's stages in order.

    recipe: path of a recipe YAML; run_name: folder in the store (default: the recipe's name);
    store: artifact store URL (./runs or s3://bucket/prefix); stages: a subset to run;
    from_stage: force this stage and every later one to run again; overrides: ["stage1.steps=10", ...];
    secrets: environment variable → Prefect Secret block name, for credentials (S3, judge API key).
    """
    logger = get_run_logger()
    if names := load_secrets(secrets):
        logger.info("credentials from Secret blocks: %s", ", ".join(names))
    cfg = load_recipe(recipe, overrides or [])
    run = check_run_name(run_name or cfg.name, "run_name")
    chosen = cfg.graph.select(stages, from_stage)
    ctx = RunContext(recipe=cfg, store=open_store(store), run=run)
    forced = cfg.graph.forced_by(chosen, from_stage)
    results: dict[str, dict] = {}
    # every stage that will run, before the first one does, and before the run's lease is written
    todo = check_run(ctx, chosen, forced)
    with holding(ctx) as lease:
        publish_recipe(ctx)
        logger.info("run %s in %s: stages %s (%s to run)", run, ctx.store.uri(run), ", ".join(chosen),
                    ", ".join(todo) or "none")
        raw = recipe_to_dict(cfg)
        for stage in chosen:
            lease.check()
            lease.renew(stage=stage)
            ups = {u: results[u]["digest"] for u in cfg.graph.upstream(stage) if u in results}
            results[stage] = stage_task.with_options(name=stage, task_run_name=f"{stage}")(
                stage, raw, run, ctx.store.url, force=stage in forced, upstream=ups)
    rows = ["| stage | kind | | result |", "|---|---|---|---|"]
    for stage in results:
        r = results[stage]
        rows.append(f"| {stage} | {cfg.stage(stage).kind} | {'skipped' if r['skipped'] else 'ran'} | "
                    f"{summarize_metrics(cfg, stage, r['metrics'])} |")
    evaluations = {s: (cfg.stages[s].model_from, results[s]["metrics"]) for s in cfg.graph.of_kind("eval") if s in results}
    compared = side_by_side(run, evaluations)
    if compared:
        best_effort(ctx.store.write_bytes_atomic, run_report(run), compared.encode())
    best_effort(create_markdown_artifact,
                f"## ProLong run `{run}`\n\nStore: `{ctx.store.uri(run)}`\n\n" + "\n".join(rows) + "\n\n" + compared,
                key=artifact_key(run, "summary"), description=f"{run}: recipe summary")
    return {stage: r["digest"] for stage, r in results.items()}
