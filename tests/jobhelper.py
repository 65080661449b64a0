"""A stand-in *workload* for job-backend tests (the backend and torchrun are real): prints, fails,
or sleeps with a grandchild process, recording pids so tests can check nothing is left behind."""

import os
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
else:
    time.sleep(300)
