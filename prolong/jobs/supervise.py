"""Leader of a local job's process group: ``python -m prolong.jobs.supervise PARENT_PID GRACE_S -- CMD ...``.

It runs the job command and exits with its exit code. It is the one place that knows every process
of the job: torchrun starts each rank in a session of its own, outside our process group, so the
supervisor makes itself a *child subreaper* — processes of the job whose parent dies are re-parented
to it instead of to init — and stops the job by walking its descendant tree.

Stopping is SIGTERM to every descendant (ranks save a checkpoint and exit, see
``prolong.train.preemption``), then SIGKILL to whatever is left after ``GRACE_S``. It happens when
the supervisor gets SIGTERM/SIGINT (cancel, wall-clock limit) and when the process that submitted
the job disappears without cancelling it (a worker killed with SIGKILL, a crashed flow run), so a
job is never left running unobserved.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux: the process-group fallback below still applies
        return False


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux; a no-op elsewhere).

    A rank whose torchrun vanished without stopping it (SIGKILL, OOM killer) must not keep training
    and writing checkpoints beside the re-run that replaces it.
    """
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, int(sig))
    if os.getppid() != parent:  # the parent died before the request took effect
        os.kill(os.getpid(), sig)


def _process_table() -> dict[int, tuple[int, int, str]]:
    """pid → (ppid, pgid, state) of every process, read from /proc."""
    table = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            stat = open(f"/proc/{name}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        table[int(name)] = (int(fields[1]), int(fields[2]), fields[0])
    return table


def descendants(root: int) -> list[int]:
    """Live (non-zombie) descendants of ``root``, plus members of its process group."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found |= {pid for pid, (_, pgid, _) in table.items() if pgid == root and pid != root}
    return sorted(pid for pid in found if table.get(pid, (0, 0, "Z"))[2] != "Z")


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _reap() -> None:
    """Collect exited re-parented orphans so they do not linger as zombies."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def stop_tree(grace_s: float) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not stop us half-way
    me = os.getpid()
    _signal_all(descendants(me), signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        _reap()
        if not descendants(me):
            return
    _signal_all(descendants(me), signal.SIGKILL)
    time.sleep(0.1)
    _reap()


def main(argv: list[str]) -> int:
    if len(argv) < 4 or argv[2] != "--":
        print("usage: python -m prolong.jobs.supervise PARENT_PID GRACE_S -- CMD ...", file=sys.stderr)
        return 2
    parent, grace_s = int(argv[0]), float(argv[1])
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    child = subprocess.Popen(argv[3:])

    def on_signal(signum, _frame):
        stop_tree(grace_s)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        try:
            code = child.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            _reap_orphans_only(child.pid)
            if os.getppid() != parent:  # re-parented: whoever submitted us is gone
                print("supervisor: the process that submitted this job is gone; stopping the job", flush=True)
                stop_tree(grace_s)
                return 143
            continue
        if descendants(os.getpid()):  # torchrun exited but left ranks behind
            stop_tree(grace_s)
        return code if code >= 0 else 128 - code


def _reap_orphans_only(keep: int) -> None:
    """Reap exited re-parented processes without taking the job command's own exit status."""
    for pid, (ppid, _, state) in _process_table().items():
        if ppid == os.getpid() and state == "Z" and pid != keep:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
