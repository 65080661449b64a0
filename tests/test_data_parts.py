"""A data stage split into parts (`parts: domain`): one job per domain side by side, then a merge job.

The merged stage holds the same bytes as the one-job path; a failed part is re-run alone on retry;
on the real single-node Slurm, three parts run at once and one of them is killed and retried.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from prolong.manifest import read_manifest
from prolong.store import Store
from tests.conftest import prolong_cli
from tests.test_slurm import slurm_cluster  # noqa: F401 (fixture)

PARTS = ["--set", "stages.data.parts=domain"]
DOMAINS = ["books", "chat", "code_repos", "shortmix"]


def data_run(store: Store, run: str, *extra: str, env: dict, check: bool = True):
    return prolong_cli("run", "recipes/tiny.yaml", "--store", store.url, "--run-name", run, "--stages", "data",
                       *extra, env=env, check=check)


def stream_files(store: Store, run: str) -> dict[str, str]:
    m = read_manifest(store, run, "data")
    return {o["path"]: o["sha256"] for o in m.outputs}


def test_parts_by_domain_write_the_bytes_one_job_writes(tmp_path, prefect_env):
    one, parted = Store(str(tmp_path / "one")), Store(str(tmp_path / "parted"))  # one run name: the report names it
    data_run(one, "r", env=prefect_env)
    data_run(parted, "r", *PARTS, env=prefect_env)
    files = stream_files(one, "r")
    assert stream_files(parted, "r") == files and any(p.startswith("streams/") for p in files)  # + report, histogram
    assert read_manifest(parted, "r", "data").metrics == read_manifest(one, "r", "data").metrics
    assert not parted.exists("r/.parts")  # merged, then tidied
    for domain in DOMAINS:  # each part's job log stays with the stage
        assert list(parted.local_path(f"r/data/logs/{domain}").glob("*.log")), domain
    data_run(one, "r", *PARTS, env=prefect_env)  # how it runs is not what it makes: nothing to do
    assert len(list(one.local_path("r/data/logs").glob("*.log"))) == 1 and not one.exists("r/.parts")


def _squeue() -> list[tuple[str, str, str]]:
    out = subprocess.run(["squeue", "-h", "-o", "%i %.200j %T"], capture_output=True, text=True).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


@pytest.mark.slow
def test_on_slurm_three_parts_run_at_once_and_a_killed_one_is_rerun_alone(slurm_cluster, tmp_path,  # noqa: F811
                                                                          prefect_env):
    store = Store(str(tmp_path / "runs"))
    env = {**prefect_env, "SLURM_CONF": os.environ["SLURM_CONF"]}
    args = [*PARTS, "--set", "jobs.backend=slurm", "--set", "jobs.max_parallel_parts=3"]
    seen_running: list[int] = []
    killed: list[str] = []
    stop = threading.Event()

    def watch():  # the most part jobs running together; with three at once, kill the `code_repos` part
        while not stop.is_set():
            jobs = [j for j in _squeue() if j[1].startswith("slurm-parts-data-") and j[2] == "RUNNING"]
            seen_running.append(len(jobs))
            victim = next((j for j in jobs if j[1] == "slurm-parts-data-code_repos"), None)
            if victim and not killed and len(jobs) >= 3:
                subprocess.run(["scancel", victim[0]], check=True)
                killed.append(victim[0])
            time.sleep(0.3)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        failed = data_run(store, "slurm-parts", *args, env=env, check=False)
    finally:
        stop.set()
        watcher.join()
    assert killed and max(seen_running) >= 3, (killed, max(seen_running, default=0))
    assert failed.returncode != 0 and "data[code_repos]" in failed.stderr.strip().splitlines()[-1]
    done_before = {d: store.local_path(f"slurm-parts/.parts/data/{d}/manifest.json").stat().st_mtime_ns
                   for d in DOMAINS if d != "code_repos" and store.exists(f"slurm-parts/.parts/data/{d}/manifest.json")}
    assert len(done_before) == 3  # the other parts ran to their end

    data_run(store, "slurm-parts", *args, env=env)
    logs = {d: sorted(store.local_path(f"slurm-parts/data/logs/{d}").glob("*.log")) for d in DOMAINS}
    assert len(logs["code_repos"]) == 2 and all(len(logs[d]) == 1 for d in done_before)
    assert any("as slurm job" in p.read_text() for p in logs["code_repos"])
    assert read_manifest(store, "slurm-parts", "data").metrics["samples"] > 0
