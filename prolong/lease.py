"""One run at a time per run folder: a lease on ``{store}/{run}/`` (``lease.json``).

Two orchestrators running one run name at once would train one stage into one checkpoint folder.
So a run first takes the run's lease, a small record::

    {"token", "owner", "flow_run_id", "host", "pid", "pid_start", "started_at", "heartbeat_at",
     "ttl_s", "stage", "job_id"}

written with a conditional create (S3 ``If-None-Match: *``; locally an exclusive link), renewed by a
heartbeat thread with compare-and-swap writes, and deleted at the end. A second run finds it and is
refused with one line naming the owner (:class:`RunBusyError`, exit 6). A lease whose owner is gone
— its process no longer exists on this host, or its heartbeat is older than ``ttl_s`` (another
host) — is *stale*: the next run takes it over with a compare-and-swap, so of two runs racing for
it exactly one wins. The record of the owner it replaced is handed back, so the orchestrator can
mark that owner's flow run as crashed.

``PROLONG_LEASE_TTL_S`` sets the time-to-live (default 120 s; the heartbeat runs every ttl/4). It
must outlast any outage of the store itself: a heartbeat that cannot be written for a whole ttl
lets another run take the lease. Torch-free and Prefect-free.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import threading
import uuid

from prolong.errors import RunBusyError, StoreError
from prolong.store import Store

log = logging.getLogger(__name__)
DEFAULT_TTL_S = 120.0


def ttl_s() -> float:
    return float(os.environ.get("PROLONG_LEASE_TTL_S", DEFAULT_TTL_S))


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live owner from a later process with its pid)."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[19]


def owner_alive(record: dict) -> bool | None:
    """True/False when the owner ran on this host (its process is checked); None for another host."""
    if record.get("host") != socket.gethostname():
        return None
    start = _process_start(int(record.get("pid", -1)))
    return start is not None and start == record.get("pid_start")


def heartbeat_age_s(record: dict, now: _dt.datetime | None = None) -> float:
    try:
        beat = _dt.datetime.fromisoformat(record["heartbeat_at"])
    except (KeyError, TypeError, ValueError):
        return float("inf")
    return ((now or _now()) - beat).total_seconds()


def is_live(record: dict | None) -> bool:
    """Whether a lease record still holds the run: its owner runs, or (another host) beats in time."""
    if not record:
        return False
    alive = owner_alive(record)
    if alive is not None:
        return alive
    return heartbeat_age_s(record) <= float(record.get("ttl_s", DEFAULT_TTL_S))


def describe(record: dict) -> str:
    who = record.get("owner") or "a run"
    where = f"pid {record.get('pid')} on {record.get('host')}"
    age = heartbeat_age_s(record)
    beat = f"last heartbeat {age:.0f} s ago" if age != float("inf") else "no heartbeat"
    doing = f", in stage {record['stage']}" if record.get("stage") else ""
    return f"{who} ({where}, since {record.get('started_at')}{doing}, {beat})"


def read_lease(store: Store, rel: str) -> dict | None:
    found = store.read_versioned(rel)
    if found is None:
        return None
    try:
        record = json.loads(found[0])
        return record if isinstance(record, dict) else {}
    except ValueError:
        return {}  # half-written by a store without atomic writes: treated as held by nobody known


class Lease:
    """``with Lease(store, rel, owner="flow run x") as lease:`` holds the run while the body runs."""

    def __init__(self, store: Store, rel: str, *, owner: str, flow_run_id: str | None = None,
                 ttl: float | None = None):
        self.store, self.rel = store, rel
        self.ttl = ttl if ttl is not None else ttl_s()
        self.record = {"token": uuid.uuid4().hex, "owner": owner, "flow_run_id": flow_run_id,
                       "host": socket.gethostname(), "pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                       "started_at": _now().isoformat(timespec="seconds"), "ttl_s": self.ttl,
                       "stage": None, "job_id": None}
        self.version: str | None = None
        self.replaced: dict | None = None  # the stale owner this lease took over from
        self.lost: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ taking and giving back
    def _payload(self) -> bytes:
        return json.dumps({**self.record, "heartbeat_at": _now().isoformat(timespec="seconds")},
                          indent=2, sort_keys=True).encode()

    def acquire(self) -> dict | None:
        """Take the lease or raise RunBusyError; returns the stale record taken over, if any."""
        for _ in range(20):  # each round loses only to another taker that won
            if self.store.create_exclusive(self.rel, payload := self._payload()):
                self.version = self.store.read_versioned(self.rel)[1]
                self._check_ours(payload)
                return None
            found = self.store.read_versioned(self.rel)
            if found is None:
                continue  # released in between
            data, version = found
            try:
                current = json.loads(data)
            except ValueError:
                current = {}
            if current and is_live(current):
                raise RunBusyError(f"{self.store.uri(self.rel)}: this run is in use by {describe(current)}; "
                                   "wait for it to finish, cancel it, or choose another run name")
            if self.store.replace_if(self.rel, payload := self._payload(), version):
                self.version = self.store.read_versioned(self.rel)[1]
                self._check_ours(payload)
                self.replaced = current or None
                log.warning("took over the lease of %s: its owner is gone", describe(current) if current else "nobody")
                return self.replaced
        raise RunBusyError(f"{self.store.uri(self.rel)}: could not take the run's lease (contended)")

    def _check_ours(self, payload: bytes) -> None:
        # the version read after our write must be of our write (another writer could have replaced it)
        found = self.store.read_versioned(self.rel)
        if found is None or json.loads(found[0]).get("token") != self.record["token"]:
            raise RunBusyError(f"{self.store.uri(self.rel)}: another run took the lease at the same moment")
        self.version = found[1]

    def renew(self, **fields) -> None:
        """Write the heartbeat (and ``stage``/``job_id``); marks the lease lost if another run holds it."""
        with self._lock:
            self.record.update(fields)
            if self.version is None or self.lost:
                return
            payload = self._payload()
            try:
                if self.store.replace_if(self.rel, payload, self.version):
                    self.version = self.store.read_versioned(self.rel)[1]
                    return
            except StoreError as e:  # the store is unreachable for now: try again at the next beat
                log.warning("lease heartbeat failed (%s); retrying", e)
                return
            current = read_lease(self.store, self.rel)
            self.lost = f"the lease is now held by {describe(current)}" if current else "the lease was removed"
            log.error("run lease lost: %s", self.lost)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            if self.version is not None and not self.lost:
                try:
                    self.store.replace_if(self.rel, None, self.version)
                except StoreError as e:
                    log.warning("could not release the run lease (%s); it goes stale in %.0f s", e, self.ttl)
            self.version = None

    def check(self) -> None:
        """Raise if the lease was lost (before starting the next stage)."""
        if self.lost:
            raise RunBusyError(f"{self.store.uri(self.rel)}: {self.lost}; stopping before the next stage")

    # ------------------------------------------------------------ heartbeat
    def _beat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            self.renew()

    def __enter__(self) -> "Lease":
        self.acquire()
        self._thread = threading.Thread(target=self._beat, name="prolong-lease", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

