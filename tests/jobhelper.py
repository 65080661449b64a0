"""A stand-in *workload* for job-backend tests (the backend and torchrun are real): prints, fails,
or sleeps with a grandchild process, recording pids so tests can check nothing is left behind.

Modes: ok, fail, sleep; preemptible (on SIGUSR1/SIGTERM write PIDFILE.signal and exit 75 like a
trainer that checkpointed, succeed once SLURM_RESTART_COUNT > 0); secret (write the value of
PROLONG_TEST_SECRET to PIDFILE.secret, so a test can check the job saw it without it being logged)."""

import os
import signal
import subprocess
import sys
import time

mode, pidfile = sys.argv[1], sys.argv[2]
rank = os.environ.get("RANK", "0")
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
with open(pidfile, "a") as f:
    f.write(f"{os.getpid()}\n{child.pid}\n")
print(f"rank {rank} started", flush=True)
if mode == "ok":
    child.kill()
    print(f"rank {rank} done", flush=True)
elif mode == "fail":
    child.kill()
    print("error: data.domains.books: the source yielded no documents", file=sys.stderr, flush=True)
    sys.exit(4)
elif mode == "secret":
    child.kill()
    with open(pidfile + ".secret", "w") as f:
        f.write(os.environ.get("PROLONG_TEST_SECRET", ""))
    print(f"rank {rank} done", flush=True)
elif mode == "preemptible":
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts > 0:
        child.kill()
        print(f"rank {rank} resumed (restart {restarts}) and done", flush=True)
        sys.exit(0)

    def checkpoint_and_exit(signum, _frame):
        with open(pidfile + ".signal", "a") as f:
            f.write(f"{signal.Signals(signum).name}\n")
        print(f"rank {rank}: {signal.Signals(signum).name}: checkpoint saved, exiting 75", flush=True)
        child.kill()
        sys.exit(75)

    signal.signal(signal.SIGUSR1, checkpoint_and_exit)
    signal.signal(signal.SIGTERM, checkpoint_and_exit)
    with open(pidfile + ".ready", "a") as f:  # handlers are in place: the test may signal now
        f.write(f"{rank}\n")
    time.sleep(300)
else:
    time.sleep(300)
