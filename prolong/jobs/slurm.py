"""The slurm backend: each stage is one ``sbatch`` job running torchrun on every node it was given.

The batch script (kept beside the job's log as ``<log>.sbatch``) runs one ``srun`` task per node,
and each task starts ``python -m prolong.jobs.slurm`` (:func:`main`: ``prolong.jobs.launch``, i.e.
torchrun that keeps the ranks' exit code, with Slurm's signals sorted out) with a c10d rendezvous on
the job's first node. The job's output file *is* the stage log, so the handle streams it directly.

Secrets (S3 keys, the judge's API key) arrive in ``spec.env``. They travel in sbatch's own process
environment with ``--export=ALL`` and are never written to the script or the log.

Stopping early, the contract with the trainer (``prolong.train.preemption``): ranks that get SIGTERM or
SIGUSR1 save a checkpoint at the next step boundary and exit with 75.

* Time limit: ``--signal=B:USR1@signal_grace_s`` sends USR1 to the batch shell only; the script passes
  it to the job's steps (``scancel --signal=USR1``). torchrun runs with USR1 ignored (its default action
  would kill it); the ranks install their own handler. When srun comes back with 75 the script
  requeues the job: same job id, PENDING again, ``SLURM_RESTART_COUNT`` one higher, and the re-run
  resumes from the checkpoint.
* Preemption (``PreemptMode=REQUEUE``): Slurm sends SIGTERM to the steps and requeues the job. Slurm
  signals every process of a step, torchrun included; torchrun's own SIGTERM handling would stop the
  ranks itself and exit 1, losing their 75, so :func:`main` has torchrun leave SIGTERM to the ranks.
* :meth:`SlurmJob.cancel`: SIGTERM to the batch shell, which then never requeues, and to the steps,
  whose ranks checkpoint; srun is left out (it kills its step on SIGTERM). Slurm's own ``scancel``
  follows after ``stop_grace_s``.

The handle follows a job through requeues. Its state comes from ``scontrol show job`` while Slurm
remembers the job (``MinJobAge``), then from ``sacct`` (clusters with slurmdbd) or the
``jobcomp/filetxt`` file.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from prolong.errors import ConfigError, JobError
from prolong.jobs.base import REQUEUE_EXIT_CODE, JobBackend, JobHandle, JobSpec, JobState
# at import, not in the signal handler, which may run in the middle of another import
from prolong.jobs.supervise import descendants

log = logging.getLogger(__name__)

# Slurm job states (squeue/scontrol/sacct names) → ours. PREEMPTED is final only with PreemptMode=CANCEL;
# with REQUEUE the job shows REQUEUED/PENDING instead.
_STATES = {
    **dict.fromkeys(("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD",
                     "SPECIAL_EXIT", "POWER_UP_NODE"), JobState.PENDING),
    # COMPLETING: the job ended but its processes are still being cleaned up; not finished for us yet
    **dict.fromkeys(("RUNNING", "COMPLETING", "SIGNALING", "STAGE_OUT", "SUSPENDED", "STOPPED", "RESIZING",
                     "UPDATE_DB"), JobState.RUNNING),
    "COMPLETED": JobState.SUCCEEDED,
    **dict.fromkeys(("FAILED", "NODE_FAIL", "BOOT_FAIL", "OUT_OF_MEMORY", "DEADLINE", "REVOKED"), JobState.FAILED),
    **dict.fromkeys(("CANCELLED", "PREEMPTED"), JobState.CANCELLED),
    "TIMEOUT": JobState.TIMED_OUT,
}

POLL_MIN_S = 1.0  # scontrol calls load the controller: at most one per second per job
LOST_AFTER_S = 600.0  # the controller may restart; only a long silence counts as losing the job


def _slurm_cmd(*args: str, timeout: float = 60, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=env)


def _field(record: str, key: str) -> str | None:
    m = re.search(rf"(?:^|\s){key}=(\S*)", record)
    return m.group(1) if m else None


def _exit_code(value: str | None) -> int | None:
    """Slurm's ``CODE:SIGNAL`` → a shell-style code (128 + signal for a job killed by one)."""
    if not value or ":" not in value:
        return None
    code, sig = value.split(":", 1)
    try:
        return 128 + int(sig) if int(sig) else int(code)
    except ValueError:
        return None


def _quote_directive(value: str) -> str:
    # sbatch reads #SBATCH lines with its own tokenizer, which takes double quotes but not shell escapes
    if re.search(r'[\s"]', value):
        if '"' in value or "\n" in value:
            raise ConfigError(f"jobs.slurm: {value!r} cannot be written as an sbatch directive")
        return f'"{value}"'
    return value


def time_limit_minutes(spec: JobSpec, cfg) -> int | None:
    if spec.time_limit_s is not None:
        return max(1, math.ceil(spec.time_limit_s / 60))
    if cfg.time_limit_minutes is not None:
        return max(1, math.ceil(cfg.time_limit_minutes))
    return None


def render_script(spec: JobSpec, cfg, *, python: str = sys.executable, cwd: str | None = None) -> str:
    """The sbatch script for ``spec``. It holds no value of ``spec.env``: those reach the job through
    sbatch's environment (``--export=ALL``)."""
    cwd = cwd or os.getcwd()
    gpus = cfg.gpus_per_node if spec.gpus_per_node is None else spec.gpus_per_node
    cpus = cfg.cpus_per_task or spec.nproc_per_node
    minutes = time_limit_minutes(spec, cfg)
    if minutes is not None and cfg.signal_grace_s >= minutes * 60:
        raise ConfigError(f"jobs.slurm.signal_grace_s: {cfg.signal_grace_s} s leaves no time to train within "
                          f"the {minutes} min time limit")
    name = re.sub(r"[^A-Za-z0-9_.\-]", "_", spec.name)
    directives = [f"--job-name={name}", f"--output={_quote_directive(str(spec.log_path))}", "--open-mode=append",
                  f"--chdir={_quote_directive(cwd)}", f"--nodes={spec.nnodes}", "--ntasks-per-node=1",
                  f"--cpus-per-task={cpus}"]
    if gpus:
        directives.append(f"--gpus-per-node={gpus}")
    if cfg.mem is not None:
        directives.append(f"--mem={cfg.mem}")
    if minutes is not None:
        directives.append(f"--time={minutes}")
    for opt in ("partition", "account", "qos"):
        if getattr(cfg, opt):
            directives.append(f"--{opt}={_quote_directive(getattr(cfg, opt))}")
    directives.append(f"--signal=B:USR1@{cfg.signal_grace_s}")
    directives.append("--requeue" if cfg.requeue else "--no-requeue")
    directives += cfg.extra_directives

    port = str(cfg.rdzv_port) if cfg.rdzv_port else "$((20000 + SLURM_JOB_ID % 20000))"
    # the script's own variables stay unquoted; the spec's words are quoted literally
    launch_sh = " ".join([shlex.quote(python), "-m prolong.jobs.slurm --nnodes=$SLURM_JOB_NUM_NODES",
                          f"--nproc_per_node={spec.nproc_per_node} --rdzv_backend=c10d",
                          '--rdzv_endpoint="$endpoint" --rdzv_id=$SLURM_JOB_ID -m',
                          *map(shlex.quote, [spec.module, *spec.args])])
    requeue = "1" if cfg.requeue else "0"
    lines = ["#!/bin/bash",
             f"# prolong job {name}: rendered by prolong.jobs.slurm; credentials reach the job",
             "# through sbatch's environment (--export=ALL), never through this file.",
             *(f"#SBATCH {d}" for d in directives), "", _BODY.format(
                 cpus=cpus, port=port, launch=launch_sh, requeue=requeue, code=REQUEUE_EXIT_CODE)]
    return "\n".join(lines)


# Bash body of every batch script. srun runs in the background so that traps run while it works
# (bash defers traps until a foreground command returns).
_BODY = r"""set -u
requeue={requeue}  # jobs.slurm.requeue
echo "prolong: slurm job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, run $((${{SLURM_RESTART_COUNT:-0}} + 1))"
got_term=0
on_usr1() {{
    echo "prolong: SIGUSR1 (time limit near): asking the ranks to checkpoint and exit"
    scancel --signal=USR1 "$SLURM_JOB_ID"  # the job's steps, not this shell
}}
trap on_usr1 USR1
# scancel, the time limit: the steps got SIGTERM too; this shell waits for them and never requeues
trap 'got_term=1' TERM

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
endpoint="$head_node:{port}"
# torchrun ignores USR1 (its default action kills it) from its first instant; the ranks inherit that
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 --cpus-per-task={cpus} --kill-on-bad-exit=1 \
    bash -c 'trap "" USR1; exec "$@"' torchrun \
    {launch} &
srun_pid=$!
while kill -0 "$srun_pid" 2>/dev/null; do
    wait "$srun_pid"
done
wait "$srun_pid"
rc=$?

if [ "$rc" -eq {code} ]; then
    if [ "$got_term" = 1 ]; then
        :  # cancelled or timed out: not ours to requeue (preemption requeues by itself)
    elif [ "$requeue" = 1 ]; then
        # a job being cancelled can still be requeued: only a running one is
        if scontrol show job -o "$SLURM_JOB_ID" | grep -q " JobState=RUNNING "; then
            echo "prolong: the ranks saved a checkpoint and exited {code}: requeueing job $SLURM_JOB_ID"
            if ! scontrol requeue "$SLURM_JOB_ID"; then
                echo "error: scontrol requeue $SLURM_JOB_ID failed after a checkpoint (exit {code}): run the stage again to resume" >&2
            fi
        fi
    else
        echo "error: the ranks saved a checkpoint and exited {code} (requeue me) but jobs.slurm.requeue is off: run the stage again to resume from it" >&2
    fi
fi
exit "$rc"
"""


def _sbatch_env(spec: JobSpec) -> dict[str, str]:
    env = {**os.environ, **spec.env, "PYTHONUNBUFFERED": "1"}
    # a submitter that itself runs inside a Slurm job must not pass its allocation's SLURM_* to this one
    for key in [k for k in env if k.startswith("SLURM_") and k != "SLURM_CONF"]:
        del env[key]
    return env


class SlurmJob(JobHandle):
    def __init__(self, spec: JobSpec, job_id: str, script_path: Path):
        self.spec = spec
        self.job_id = job_id
        self.script_path = script_path
        self.reason: str | None = None  # Slurm's Reason while pending (Resources, BeginTime, ...)
        self.restarts = 0
        self._state = JobState.PENDING
        self._exit: int | None = None
        self._last_poll = 0.0
        self._failing_since: float | None = None
        self._reader = None
        self._partial = b""

    # ------------------------------------------------------------ state

    def _scontrol(self) -> tuple[str | None, str]:
        """(the job's one-line record, or None when Slurm no longer knows the job; error text)."""
        try:
            r = _slurm_cmd("scontrol", "show", "job", "-o", self.job_id)
        except (OSError, subprocess.TimeoutExpired) as e:
            return "", str(e)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip().splitlines()[0], ""
        if "Invalid job id" in r.stderr:
            return None, ""
        return "", (r.stderr or r.stdout).strip()

    def _history(self) -> tuple[str, str | None] | None:
        """(Slurm state, CODE:SIGNAL) of a job Slurm has forgotten: sacct, else the jobcomp file."""
        try:
            r = _slurm_cmd("sacct", "-j", self.job_id, "-X", "-n", "-P", "-o", "State,ExitCode")
            rows = [ln.split("|") for ln in r.stdout.splitlines() if ln.strip()] if r.returncode == 0 else []
            if rows and len(rows[-1]) == 2:
                return rows[-1][0].split()[0], rows[-1][1]
        except (OSError, subprocess.TimeoutExpired):
            pass
        path = _jobcomp_file()
        if path is not None:
            try:
                records = [ln for ln in path.read_text(errors="replace").splitlines()
                           if ln.startswith(f"JobId={self.job_id} ")]
            except OSError:
                records = []
            if records:  # one record per run of a requeued job: the last is the newest
                return _field(records[-1], "JobState") or "", _field(records[-1], "ExitCode")
        return None

    def _apply(self, slurm_state: str, exit_value: str | None) -> None:
        state = _STATES.get(slurm_state.rstrip("+"))
        if state is None:
            log.warning("slurm job %s: unknown state %r, taken as running", self.job_id, slurm_state)
            state = JobState.RUNNING
        if state.finished:
            self._exit = _exit_code(exit_value)
            if state == JobState.SUCCEEDED and self._exit not in (None, 0):
                state = JobState.FAILED
        self._state = state

    def poll(self) -> JobState:
        if self._state.finished or time.monotonic() - self._last_poll < POLL_MIN_S:
            return self._state
        return self._refresh()

    def _refresh(self) -> JobState:
        self._last_poll = time.monotonic()
        record, error = self._scontrol()
        if record:
            self._failing_since = None
            self.reason = _field(record, "Reason")
            restarts = int(_field(record, "Restarts") or 0)
            if restarts > self.restarts:
                log.info("slurm job %s was requeued (restart %d): following it", self.job_id, restarts)
                self.restarts = restarts
            self._apply(_field(record, "JobState") or "", _field(record, "ExitCode"))
        elif record is None:
            found = self._history()
            if found is None:
                self._lose(f"Slurm no longer knows job {self.job_id} and keeps no history of it (no sacct, no "
                           f"jobcomp/filetxt): its outcome is unknown")
            else:
                self._apply(*found)
        else:
            now = time.monotonic()
            self._failing_since = self._failing_since or now
            log.warning("slurm job %s: scontrol failed (%s); retrying", self.job_id, error)
            if now - self._failing_since > LOST_AFTER_S:
                self._lose(f"lost track of slurm job {self.job_id}: scontrol failing for "
                           f"{LOST_AFTER_S:.0f} s ({error})")
        return self._state

    def _lose(self, message: str) -> None:
        """End the handle as FAILED with ``message`` as the log's last ``error:`` line."""
        self._state = JobState.FAILED
        try:
            with open(self.spec.log_path, "a") as f:
                f.write(f"error: {message}\n")
        except OSError:
            log.error(message)

    @property
    def exit_code(self) -> int | None:
        return self._exit

    # ------------------------------------------------------------ log

    def read_new_lines(self) -> list[str]:
        if self._reader is None:
            try:
                self._reader = open(self.spec.log_path, "rb")
            except FileNotFoundError:
                return []  # the job has not started writing yet
        data = self._partial + self._reader.read()
        lines = data.split(b"\n")
        self._partial = lines.pop()
        return [ln.decode(errors="replace") for ln in lines]

    # ------------------------------------------------------------ cancel

    def _active(self) -> bool:
        return not self._refresh().finished

    def _wait_inactive(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._active():
                return True
            time.sleep(0.5)
        return not self._active()

    def cancel(self, grace_s: float | None = None) -> None:
        if self._state.finished:
            return
        grace = self.spec.stop_grace_s if grace_s is None else grace_s
        if self._refresh() == JobState.RUNNING and grace > 0:
            # SIGTERM to the batch shell alone first (it notes that it must not requeue), then to the
            # job's steps: the ranks checkpoint and exit. Never to srun itself (``--full``), which
            # answers SIGTERM by killing its step outright.
            _slurm_cmd("scancel", "--batch", "--signal=TERM", self.job_id)
            _slurm_cmd("scancel", "--signal=TERM", self.job_id)
            self._wait_inactive(grace)
        if not self._state.finished:
            # Slurm's own kill: SIGTERM, then SIGKILL after the cluster's KillWait
            r = _slurm_cmd("scancel", self.job_id)
            if r.returncode != 0 and "Invalid job id" not in r.stderr:
                log.warning("scancel %s: %s", self.job_id, r.stderr.strip())
            if not self._wait_inactive(_kill_wait_s() + 60):
                # not raised: cancel often runs while another exception (Ctrl-C, Prefect cancellation) unwinds
                log.error("slurm job %s is still there after scancel; see scontrol show job %s", self.job_id, self.job_id)
        if self._state != JobState.SUCCEEDED:
            self._state = JobState.CANCELLED


_config_cache: dict[str | None, dict[str, str]] = {}


def _slurm_config() -> dict[str, str]:
    """``scontrol show config`` as a dict, once per cluster (per SLURM_CONF) and process."""
    key = os.environ.get("SLURM_CONF")
    if key not in _config_cache:
        try:
            r = _slurm_cmd("scontrol", "show", "config")
        except (OSError, subprocess.TimeoutExpired):
            return {}
        if r.returncode != 0:
            return {}
        conf = {}
        for line in r.stdout.splitlines():
            name, sep, value = line.partition("=")
            if sep:
                conf[name.strip()] = value.strip()
        _config_cache[key] = conf
    return _config_cache[key]


def _jobcomp_file() -> Path | None:
    conf = _slurm_config()
    if conf.get("JobCompType", "").endswith("filetxt") and conf.get("JobCompLoc", "").startswith("/"):
        return Path(conf["JobCompLoc"])
    return None


def _kill_wait_s() -> float:
    m = re.match(r"(\d+)", _slurm_config().get("KillWait", ""))
    return float(m.group(1)) if m else 30.0


class SlurmBackend(JobBackend):
    name = "slurm"

    def __init__(self, config=None):
        if shutil.which("sbatch") is None:
            raise ConfigError("jobs.backend: slurm needs Slurm's sbatch on PATH, and it is not there")
        self.config = config

    def submit(self, spec: JobSpec) -> SlurmJob:
        from prolong.config import SlurmConfig

        cfg = spec.slurm or self.config or SlurmConfig()
        spec.log_path.parent.mkdir(parents=True, exist_ok=True)
        script_path = spec.log_path.with_suffix(".sbatch")
        script_path.write_text(render_script(spec, cfg))
        r = _slurm_cmd("sbatch", "--parsable", "--export=ALL", str(script_path), timeout=120, env=_sbatch_env(spec))
        # sbatch reads the env values, never echoes them; its errors name options, so they are safe to show
        if r.returncode != 0:
            detail = (r.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("sbatch: error: ")
            raise JobError(f"jobs.slurm: sbatch refused {spec.name}: {detail} (script {script_path})")
        job_id = r.stdout.strip().split(";")[0]
        with open(spec.log_path, "a") as f:
            f.write(f"prolong: submitted {script_path} as slurm job {job_id}\n")
        return SlurmJob(spec, job_id, script_path)

    def attach(self, spec: JobSpec, job_id: str) -> SlurmJob:
        """A Slurm job outlives its submitter (a worker that was killed, a lost node): follow it by id."""
        return SlurmJob(spec, job_id, spec.log_path.with_suffix(".sbatch"))


def _on_term(_signum, _frame) -> None:
    if descendants(os.getpid()):
        # Slurm sent SIGTERM to the ranks as well: they checkpoint and exit, torchrun then reports their code
        os.write(2, b"torchrun: SIGTERM: waiting for the ranks to checkpoint and exit\n")
        return
    # no rank started yet (torchrun still setting up): none would ever see this signal, and there is
    # nothing to checkpoint, so stop now, as the signal's default action would
    os.write(2, b"torchrun: SIGTERM before any rank started: stopping\n")
    os._exit(128 + signal.SIGTERM)


def main(argv: list[str]) -> int:
    """``python -m prolong.jobs.slurm [torchrun options] -m MODULE ARGS``: torchrun in a Slurm step.

    SIGUSR1 is ignored, and the ranks inherit that until they install their handler (a rank
    still loading must not die of the time-limit warning). SIGTERM gets a Python handler instead of
    torchrun's: handlers, unlike ignored signals, do not pass to the ranks, which keep SIGTERM's
    default or their own.
    """
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_term)
    from prolong.jobs.launch import main as launch

    return launch(["--signals_to_handle=SIGINT,SIGHUP,SIGQUIT", *argv])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
