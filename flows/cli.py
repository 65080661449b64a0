"""``prolong``: run a recipe, show a run's status, check a run's files, validate a recipe.

    prolong run RECIPE [--store URL] [--run-name NAME] [--stages a,b] [--from-stage NAME] [--set k.path=v ...]
    prolong evaluate RUN [--store URL] [--recipe RECIPE] [--set k.path=v ...] [--export]
    prolong status RUN [--store URL] [--json]
    prolong doctor RUN [--store URL] [--json] [--sizes-only]
    prolong validate RECIPE [--set k.path=v ...]

Errors print one line (``error: ...``) and exit non-zero (2 config, 3 store, 4 data, 5 stage/job,
6 the run is in use by another run); tracebacks, ours and Prefect's, go to the log file named in
that line, never to the terminal.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
from pathlib import Path

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
    ev.add_argument("--export", action="store_true",
                    help="also export the snapshot (HF + GGUF, the recipe's export settings) into its evals/ folder")

    status = sub.add_parser("status", help="show which stages of a run are done")
    status.add_argument("run")
    status.add_argument("--store", default=None)
    status.add_argument("--json", action="store_true", help="machine-readable output")

    doctor = sub.add_parser("doctor", help="check every file a run recorded (sizes and sha256) and say what to re-run")
    doctor.add_argument("run")
    doctor.add_argument("--store", default=None)
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--sizes-only", action="store_true", help="check sizes, not contents (fast on object stores)")

    val = sub.add_parser("validate", help="check a recipe file")
    val.add_argument("recipe")
    val.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    return p


def _cmd_validate(args) -> int:
    from prolong.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    print(f"{args.recipe}: valid recipe {recipe.name!r}")
    width = max(len(s) for s in recipe.graph.order)
    for stage in recipe.graph.order:
        node = recipe.graph[stage]
        after = ", ".join(node.upstream()) or "-"
        print(f"  {stage:{width}s} {node.kind:6s} config {node.config_digest()[:12]}  after {after}")
    return 0


def _run_recipe(args):
    from prolong.recipe import recipe_from_dict
    from prolong.layout import check_run_name
    from prolong.recipe import read_run_recipe
    from prolong.store import open_store

    check_run_name(args.run, "RUN")
    store = open_store(args.store)
    return store, recipe_from_dict(read_run_recipe(store, args.run))


def _cmd_status(args) -> int:
    from prolong.pipeline import status_table, summarize_metrics
    from prolong.progress import progress_line

    store, recipe = _run_recipe(args)
    rows = status_table(store, args.run, recipe)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"run {args.run} in {store.uri(args.run)}")
    width = max([7, *(len(r["stage"]) for r in rows)])
    for r in rows:
        detail = summarize_metrics(recipe, r["stage"], r["metrics"]) if r["state"] == "done" else ""
        if r["progress"]:
            detail = f"{progress_line(r['progress'])} ({r['progress'].get('updated_at')})"
            if r["state"] == "interrupted":
                detail = f"stopped at {detail}; no run holds the run now: `prolong run` resumes it"
        print(f"  {r['stage']:{width}s} {r['state']:11s} {r['finished_at'] or '':26s} {detail}")
    return 0


def _cmd_doctor(args) -> int:
    from prolong.doctor import diagnose, report
    from prolong.errors import StoreError

    store, recipe = _run_recipe(args)
    health = diagnose(store, args.run, recipe, content=not args.sizes_only)
    print(json.dumps(health.to_json(), indent=2) if args.json else report(health))
    return 0 if health.healthy else StoreError.exit_code


def _cmd_run(args) -> int:
    from prolong.recipe import load_recipe
    from prolong.layout import check_run_name

    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    recipe = load_recipe(args.recipe, args.overrides)  # fail fast, before starting Prefect
    if args.run_name is not None:
        check_run_name(args.run_name, "--run-name")
    recipe.graph.select(stages, args.from_stage)

    _check_prefect_api()
    from flows.recipe import prolong_recipe

    prolong_recipe(recipe=args.recipe, run_name=args.run_name, store=args.store or _default_store(),
                   stages=stages, from_stage=args.from_stage, overrides=args.overrides,
                   secrets=_secrets(args.secrets))
    print(f"run {args.run_name or recipe.name}: finished; `prolong status {args.run_name or recipe.name}` lists its stages")
    return 0


def _cmd_evaluate(args) -> int:
    from prolong.layout import check_run_name

    check_run_name(args.run, "RUN")
    _check_prefect_api()
    from flows.evaluate import prolong_eval

    result = prolong_eval(run_name=args.run, store=args.store or _default_store(), recipe=args.recipe,
                          overrides=args.overrides, secrets=_secrets(args.secrets), export=args.export)
    print(f"run {args.run}: {result['snapshot']} {'was already evaluated' if result['skipped'] else 'evaluated'}"
          + (f"; exported to {result['export']}" if result.get("export") else ""))
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


def _log_file() -> Path:
    base = Path(os.environ.get("PROLONG_LOG_DIR", ".cache/prolong/logs"))
    return base / f"prolong-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.log"


class _NoTraceback(logging.Formatter):
    """For the terminal: the message, never the traceback (that goes to the log file and the
    Prefect UI, whose handlers see the record unchanged)."""

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return super().format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


def _quiet_terminal(log_file: Path) -> None:
    """Every handler that writes to the terminal (ours and Prefect's) drops tracebacks; a file
    handler keeps everything, tracebacks included."""
    for name in (None, "prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.engine"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler) and \
                    getattr(handler, "stream", None) in (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__):
                fmt = handler.formatter
                handler.setFormatter(_NoTraceback(fmt._fmt if fmt else None, fmt.datefmt if fmt else None))
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        to_file = logging.FileHandler(log_file)
    except OSError:
        return
    to_file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in (None, "prefect"):
        logging.getLogger(name).addHandler(to_file)


def _one_line(e: BaseException) -> str | None:
    """Failures of the orchestrator's surroundings, said in one line (None: a bug, keep it loud)."""
    kind = type(e).__module__.split(".")[0]
    if kind in ("httpx", "httpcore") or type(e).__name__ in ("PrefectHTTPStatusError", "ConnectError"):
        url = os.environ.get("PREFECT_API_URL", "the Prefect API")
        return (f"PREFECT_API_URL: lost the Prefect server at {url} ({type(e).__name__}: {e}); the stage's job "
                "keeps its checkpoints: run the same command again to resume")
    return None


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # outlast a Prefect server restart (its client's retries back off 2, 4, 8 ... s); users may set their own
    os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "8")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("EventsWorker").setLevel(logging.ERROR)  # "still processing items" at exit, after our error
    log_file = _log_file()
    if args.command in ("run", "evaluate"):
        import prefect  # noqa: F401  (sets up Prefect's logging first, so it can be quietened)
        import prefect.logging.configuration as prefect_logging

        prefect_logging.setup_logging()
        _quiet_terminal(log_file)
    try:
        return {"run": _cmd_run, "evaluate": _cmd_evaluate, "status": _cmd_status, "doctor": _cmd_doctor,
                "validate": _cmd_validate}[args.command](args)
    except ProlongError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = _one_line(e)
        if line is None:
            raise
        logging.getLogger("flows.cli").debug("failure", exc_info=True)
        print(f"error: {line} [log: {log_file}]", file=sys.stderr)
        return 5


if __name__ == "__main__":
    sys.exit(main())
