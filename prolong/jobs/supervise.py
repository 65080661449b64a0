"""Leader of a local job's process group: ``python -m prolong.jobs.supervise PARENT_PID -- CMD ...``.

It runs the job command inside its own process group and exits with its exit code. If the process
that submitted the job disappears without cancelling it (a worker killed with SIGKILL, a crashed
flow run), the job becomes an orphan: the supervisor notices within a second and terminates the
whole group — torchrun, every rank, and anything the ranks started — instead of leaving it to run
on unobserved. SIGTERM/SIGINT sent to the supervisor are passed to the group the same way.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

GRACE_S = 10.0


def _live_members(pgid: int) -> list[int]:
    """Processes of the group other than us that have not exited (zombies do not count)."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            stat = open(f"/proc/{name}/stat").read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(name))
    return out


def _terminate_group(grace_s: float = GRACE_S) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the group signal must not stop us half-way
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if not _live_members(os.getpgrp()):
            return
    os.killpg(os.getpgrp(), signal.SIGKILL)


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m prolong.jobs.supervise PARENT_PID -- CMD ...", file=sys.stderr)
        return 2
    parent = int(argv[0])
    child = subprocess.Popen(argv[2:])

    def on_signal(signum, _frame):
        _terminate_group()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while True:
        try:
            code = child.wait(timeout=1.0)
            return code if code >= 0 else 128 - code
        except subprocess.TimeoutExpired:
            pass
        if os.getppid() != parent:  # re-parented: whoever submitted us is gone
            print("supervisor: the process that submitted this job is gone; stopping the job", flush=True)
            _terminate_group()
            return 143


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
