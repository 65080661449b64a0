"""``prolong``: run a recipe, show a run's status, validate a recipe.

    prolong run RECIPE [--store URL] [--run-name NAME] [--stages a,b] [--from-stage NAME] [--set k.path=v ...]
    prolong evaluate RUN [--store URL] [--recipe RECIPE] [--set k.path=v ...]
    prolong status RUN [--store URL]
    prolong validate RECIPE [--set k.path=v ...]

Errors print one line (``error: ...``) and exit non-zero (2 config, 3 store, 4 data, 5 stage/job).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from prolong.errors import ProlongError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prolong", description="The ProLong long-context recipe as a resumable service.")
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a recipe (the prolong-recipe Prefect flow)")
    run.add_argument("recipe", help="recipe YAML, e.g. recipes/tiny.yaml")
    run.add_argument("--store", default=None, help="artifact store URL (default: $PROLONG_STORE or ./runs)")
    run.add_argument("--run-name", default=None, help="run folder in the store (default: the recipe's name)")
    run.add_argument("--stages", default=None, help="comma-separated subset, e.g. data,stage1")
    run.add_argument("--from-stage", default=None, help="re-run this stage and every later one")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. --set stage1.steps=10 (repeatable)")
    run.add_argument("--secret", dest="secrets", action="append", default=[], metavar="ENV=BLOCK",
                     help="set environment variable ENV from the Prefect Secret block BLOCK (repeatable)")

    ev = sub.add_parser("evaluate", help="evaluate a run's newest checkpoint (the prolong-eval Prefect flow)")
    ev.add_argument("run")
    ev.add_argument("--store", default=None)
    ev.add_argument("--recipe", default=None, help="take the eval settings from this recipe, not the run's own")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ev.add_argument("--secret", dest="secrets", action="append", default=[], metavar="ENV=BLOCK")

    status = sub.add_parser("status", help="show which stages of a run are done")
    status.add_argument("run")
    status.add_argument("--store", default=None)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    val = sub.add_parser("validate", help="check a recipe file")
    val.add_argument("recipe")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _cmd_validate(args) -> int:
    from prolong.config import load_recipe
    from prolong.stages import config_digest, present_stages

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid recipe {recipe.name!r}")
    for stage in present_stages(recipe):
        print(f"  {stage:7s} config {config_digest(recipe, stage)[:12]}")
    return 0


def _cmd_status(args) -> int:
    from prolong.config import recipe_from_dict
    from prolong.pipeline import read_run_recipe, status_table, summarize_metrics
    from prolong.progress import progress_line
    from prolong.store import open_store

    store = open_store(args.store)
    rows = status_table(store, args.run, recipe_from_dict(read_run_recipe(store, args.run)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"run {args.run} in {store.uri(args.run)}")
    for r in rows:
        detail = summarize_metrics(r["stage"], r["metrics"]) if r["state"] == "done" else ""
        if r["progress"]:
            detail = f"{progress_line(r['progress'])} ({r['progress'].get('updated_at')})"
        print(f"  {r['stage']:7s} {r['state']:8s} {r['finished_at'] or '':26s} {detail}")
    return 0


def _cmd_run(args) -> int:
    from prolong.config import load_recipe
    from prolong.stages import select_stages

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    recipe = load_recipe(args.recipe, args.overrides)  # fail fast, before starting Prefect
    select_stages(recipe, stages, args.from_stage)

    _check_prefect_api()
    from flows.recipe import prolong_recipe

    prolong_recipe(recipe=args.recipe, run_name=args.run_name, store=args.store or _default_store(),
                   stages=stages, from_stage=args.from_stage, overrides=args.overrides,
                   secrets=_secrets(args.secrets))
    print(f"run {args.run_name or recipe.name}: finished; `prolong status {args.run_name or recipe.name}` lists its stages")
    return 0


def _cmd_evaluate(args) -> int:
    _check_prefect_api()
    from flows.evaluate import prolong_eval

    result = prolong_eval(run_name=args.run, store=args.store or _default_store(), recipe=args.recipe,
                          overrides=args.overrides, secrets=_secrets(args.secrets))
    print(f"run {args.run}: {result['snapshot']} {'was already evaluated' if result['skipped'] else 'evaluated'}")
    return 0


def _secrets(pairs: list[str]) -> dict[str, str] | None:
    from prolong.errors import ConfigError

    out = {}
    for pair in pairs:
        var, sep, block = pair.partition("=")
        if not sep or not var or not block:
            raise ConfigError(f"--secret: expected ENV=BLOCK, got {pair!r}")
        out[var] = block
    return out or None


def _check_prefect_api() -> None:
    """Fail in one line, before Prefect's own retries, when PREFECT_API_URL points at nothing."""
    import os
    import urllib.error
    import urllib.request

    from prolong.errors import ConfigError

    url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
    if not url:
        return  # Prefect starts a temporary local server itself
    try:
        urllib.request.urlopen(f"{url}/health", timeout=10)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise ConfigError(f"PREFECT_API_URL: no Prefect server answers at {url} ({reason}); start one with "
                          "infra/prefect-server.sh start, or unset PREFECT_API_URL for a temporary one") from None


def _default_store() -> str:
    import os

    from prolong.store import DEFAULT_STORE

    return os.environ.get("PROLONG_STORE") or DEFAULT_STORE


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return {"run": _cmd_run, "evaluate": _cmd_evaluate, "status": _cmd_status,
                "validate": _cmd_validate}[args.command](args)
    except ProlongError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
