"""The ``prolong-eval`` flow: evaluate the newest model of a run — the ``nightly`` deployment.

The newest snapshot is the last training stage's final weights, or, while that stage still runs,
its newest complete checkpoint (exported to HF weights first). Each snapshot is evaluated once into
``{run}/evals/{stage}-step{N}/``; a scheduled run that finds nothing new finishes in seconds.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from prolong.recipe import apply_overrides, load_recipe, read_run_recipe, recipe_from_dict, recipe_to_dict
from prolong.layout import EVALS, check_run_name
from prolong.pipeline import RunContext
from prolong.store import DEFAULT_STORE, open_store
from flows.runs import holding
from flows.secrets import load_secrets
from tasks.evaluate import evaluate_snapshot_task


def _flow_run_name() -> str:
    return f"eval-{flow_run.parameters.get('run_name') or 'run'}"


@flow(name="prolong-eval", flow_run_name=_flow_run_name, log_prints=True)
def prolong_eval(run_name: str, store: str = DEFAULT_STORE, recipe: str | None = None,
                 overrides: list[str] | None = None, secrets: dict[str, str] | None = None,
                 export: bool = False) -> dict:
    """Evaluate the newest snapshot of run `run_name` in `store`.

    recipe: a recipe YAML whose eval section to use (default: the recipe the run was trained with,
    from {store}/{run_name}/recipe.json); overrides: ["eval.helmet.max_items=50", ...];
    secrets: environment variable → Prefect Secret block name (S3 keys, the judge's API key);
    export: also export the snapshot (HF + GGUF, the recipe's export stage settings) beside its results.
    """
    logger = get_run_logger()
    if names := load_secrets(secrets):
        logger.info("credentials from Secret blocks: %s", ", ".join(names))
    run_name = check_run_name(run_name, "run_name")
    st = open_store(store)
    if recipe:
        cfg = load_recipe(recipe, overrides or [])
    else:
        cfg = recipe_from_dict(apply_overrides(read_run_recipe(st, run_name), overrides or []))
    # evaluations have a lease of their own: they run beside the run's training, never beside each other
    with holding(RunContext(recipe=cfg, store=st, run=run_name), scope=EVALS):
        result = evaluate_snapshot_task(recipe_to_dict(cfg), run_name, st.url, export=export)
    logger.info("%s: %s", result["snapshot"], "already evaluated" if result["skipped"] else "evaluated")
    return result
