"""Entry point of every job: ``python -m prolong.jobs.entry JOB STORE_URL RUN_NAME [EXTRA ...]``.

JOB is a stage of the run's recipe — its kind's ``entry`` runs as ``entry(recipe, store, run,
stage, *EXTRA)`` (an eval stage takes an optional ``SNAPSHOT_PREFIX``: evaluate the model a
prolong.snapshots request names, into that folder) — or a job of the registry's ``JOBS``
(``export-checkpoint STAGE STEP OUT_PREFIX``: a training checkpoint to HF weights).

(Positional arguments: torchrun parses the options of the command it launches for abbreviations
of its own, and ``--run`` would be taken for its ``--run-path``.)

Reads the run's resolved recipe from ``{store}/{run}/recipe.json`` (written by the orchestrator),
runs the stage, and ends every failure with one ``error: ...`` line, the last the orchestrator
reports: a ProlongError with its exit code; a machine error (a full disk, a lost mount) naming the
file, exit 3; anything else, a bug, after its traceback, exit 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, stream=sys.stdout,
                        format=f"%(asctime)s [rank{rank}] %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("urllib3", "botocore", "s3fs", "fsspec", "filelock", "datasets", "httpx", "streaming"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    # single-process DCP saves/loads warn that no process group exists: that is the intent
    warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    from prolong.errors import ProlongError

    parser = argparse.ArgumentParser(prog="python -m prolong.jobs.entry")
    parser.add_argument("job", help="a stage of the run's recipe, or one of prolong.stages.registry.JOBS")
    parser.add_argument("store")
    parser.add_argument("run")
    parser.add_argument("extra", nargs="*")
    args = parser.parse_args(argv)
    args.stage = args.job  # named in error lines
    if "LOCAL_RANK" in os.environ:  # a rank of torchrun: never outlive it
        from prolong.jobs.supervise import die_with_parent

        die_with_parent()
    _setup_logging()
    try:
        from prolong.recipe import read_run_recipe, recipe_from_dict
        from prolong.stages.registry import JOBS, load
        from prolong.store import open_store

        store = open_store(args.store)
        recipe = recipe_from_dict(read_run_recipe(store, args.run))
        if args.job in JOBS:
            load(JOBS[args.job])(recipe, store, args.run, *args.extra)
        else:
            stage = recipe.stage(args.job)  # a one-line error for a stage the recipe does not have
            load(stage.entry)(recipe, store, args.run, args.job, *args.extra)
    except ProlongError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    except OSError as e:  # the machine, not the recipe
        import traceback

        from prolong.errors import StoreError
        from prolong.store import describe_os_error

        traceback.print_exc()
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{describe_os_error(e)} (in the {args.stage} job)", file=sys.stderr, flush=True)
        return StoreError.exit_code
    except Exception as e:
        import traceback

        traceback.print_exc()
        text = str(e).strip().splitlines()
        print(f"error: {type(e).__name__}: {text[-1] if text else ''} (an internal error of the {args.stage} job; "
              "the traceback is above in this log)", file=sys.stderr, flush=True)
        return 1
    finally:
        from prolong.parallel.world import shutdown

        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
