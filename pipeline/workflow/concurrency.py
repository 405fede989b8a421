"""The limits that bound how many observations run at once, and the proof from Prefect's records.

Two limits of ``max_concurrent_flows`` hold across every process and host, both kept by
the Prefect server: the ``observation_pipeline`` deployment's concurrency limit (a run
takes a slot when it goes PENDING and gives it back when it ends, so a worker never
starts more) and the global limit ``astr-observation-flows`` that the pipeline flow
holds while it runs (which also bounds pipelines run in-process by ``astr observe``).
:func:`run_times` and :func:`max_overlap` check, from the runs' state histories, that
the limit was never exceeded.
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

__all__ = [
    "FINAL_STATES",
    "OBSERVATION_LIMIT",
    "RunTimes",
    "ensure_limit",
    "holding_slot",
    "max_overlap",
    "observation_slot",
    "run_times",
]

#: Name of the global concurrency limit shared by every observation flow.
OBSERVATION_LIMIT = "astr-observation-flows"

#: Seconds a slot's lease lasts without renewal.
LEASE_SECONDS = 60.0

_holding: contextvars.ContextVar[bool] = contextvars.ContextVar("astr_holding_slot", default=False)


def ensure_limit(limit: int, name: str = OBSERVATION_LIMIT) -> None:
    """Create the global concurrency limit, or set it to ``limit`` (``max_concurrent_flows``).

    Prefect's upsert reads the limit by name and creates it when missing, which is not
    atomic: flows starting together race to create it and the losers get a conflict.
    A conflict means the limit now exists, so the upsert is repeated once (it then
    updates).
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.upsert_global_concurrency_limit_by_name(name, limit)
        except ObjectAlreadyExists:
            client.upsert_global_concurrency_limit_by_name(name, limit)


def holding_slot() -> bool:
    """Whether this context already holds an observation slot (nested flows take none)."""
    return _holding.get()


@contextlib.contextmanager
def observation_slot(limit: int, name: str = OBSERVATION_LIMIT) -> Iterator[None]:
    """Hold one slot of the limit for the duration of the block (re-entrant).

    Waits while ``limit`` observations are running. A block nested in one that holds a
    slot takes no second slot, so a pipeline's steps never wait for their own pipeline.
    """
    if _holding.get():
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_limit(limit, name)
    # A short lease (renewed while the block runs): the slot of a process killed
    # outright comes back within a minute instead of five.
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS):
        token = _holding.set(True)
        try:
            yield
        finally:
            _holding.reset(token)


# -- the proof ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunTimes:
    """When one flow run was created, took its slot, started and ended (server clock).

    Parameters
    ----------
    flow_run_id : str
    state : str
        Its current Prefect state type.
    scheduled : datetime or None
        Its first SCHEDULED state (when it was submitted).
    pending : datetime or None
        Its last PENDING state: when the server gave it a deployment concurrency slot.
    running : datetime or None
        Its first RUNNING state.
    ended : datetime or None
        Its first final state (COMPLETED, FAILED, CANCELLED, CRASHED).
    """

    flow_run_id: str
    state: str
    scheduled: datetime | None
    pending: datetime | None
    running: datetime | None
    ended: datetime | None

    @property
    def queue_wait(self) -> float | None:
        """Seconds from submission to RUNNING."""
        if self.scheduled is None or self.running is None:
            return None
        return (self.running - self.scheduled).total_seconds()


#: Prefect state types after which a run changes no more on its own.
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "CRASHED"})


def times_from_states(flow_run_id: str, state: str, history: Iterable[Any]) -> RunTimes:
    """Read :class:`RunTimes` from a run's state history (objects with ``type``, ``timestamp``)."""
    ordered = sorted(history, key=lambda s: s.timestamp)
    scheduled = pending = running = ended = None
    for item in ordered:
        kind = getattr(item.type, "value", item.type)
        if kind == "SCHEDULED" and scheduled is None:
            scheduled = item.timestamp
        elif kind == "PENDING" and ended is None:
            pending = item.timestamp
        elif kind == "RUNNING" and running is None:
            running = item.timestamp
        elif kind in FINAL_STATES and ended is None:
            ended = item.timestamp
    return RunTimes(flow_run_id, state, scheduled, pending, running, ended)


def run_times(flow_run_ids: Iterable[str | uuid.UUID], client: Any = None) -> list[RunTimes]:
    """The state-history times of the given flow runs, as the Prefect server recorded them.

    Parameters
    ----------
    flow_run_ids : iterable of str or UUID
    client : SyncPrefectClient, optional
        An open synchronous client (default: a new one for this call).
    """
    from prefect.client.orchestration import get_client

    ids = [uuid.UUID(str(r)) for r in flow_run_ids]
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(get_client(sync_client=True))
        times = []
        for run_id in ids:
            run = client.read_flow_run(run_id)
            history = client.read_flow_run_states(run_id)
            state = run.state.type.value if run.state is not None else "SCHEDULED"
            times.append(times_from_states(str(run_id), state, history))
        return times


def max_overlap(intervals: Iterable[tuple[datetime | None, datetime | None]]) -> int:
    """The most intervals open at one instant (an interval ending as another starts: not both).

    Intervals without a start are skipped; one without an end is open to the end.
    """
    events: list[tuple[datetime, int]] = []
    for start, end in intervals:
        if start is None:
            continue
        events.append((start, 1))
        if end is not None:
            events.append((end, -1))
    open_now = most = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):  # ends first at a tie
        open_now += step
        most = max(most, open_now)
    return most
