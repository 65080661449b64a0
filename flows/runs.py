"""Holding a run from a flow: its lease (prolong.lease), and the flow run of a dead predecessor.

A flow run whose process was killed outright (SIGKILL, a lost machine) never reports its end, so
Prefect shows it Running forever. The lease it held names it: the next flow run of the same run
name finds that lease stale, takes it over, and marks that flow run Crashed.
"""

from __future__ import annotations

import contextlib
import logging

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.runtime import flow_run
from prefect.states import Crashed


log = logging.getLogger(__name__)


def mark_crashed(record: dict, taken_by: str) -> None:
    """Set the flow run of a stale lease Crashed if Prefect still shows it live (best effort)."""
    run_id = record.get("flow_run_id")
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run_id).state
            if state is not None and state.type in (StateType.RUNNING, StateType.PENDING, StateType.CANCELLING):
                client.set_flow_run_state(run_id, Crashed(message=f"its orchestrator is gone: the run's lease went "
                                                                  f"stale and {taken_by} took it over"), force=True)
                log.warning("flow run %s was still shown as %s: marked Crashed", run_id, state.type.value)
    except Exception as e:  # an old or foreign flow run id: nothing to correct
        log.warning("could not check flow run %s of the previous lease holder (%s)", run_id, e)


@contextlib.contextmanager
def holding(ctx, scope: str = ""):
    """``with holding(ctx) as lease:`` — the run's lease (``scope``: of a sub-folder, e.g. ``evals``)
    for this flow run, RunBusyError if it is live elsewhere; a predecessor that died holding it has
    its flow run marked Crashed."""
    me = f"flow run {flow_run.get_name() or '?'} ({flow_run.get_id() or 'no id'})"
    with ctx.hold(owner=me, flow_run_id=flow_run.get_id(), scope=scope) as lease:
        if lease.replaced:
            mark_crashed(lease.replaced, me)
        yield lease
