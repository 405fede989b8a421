"""Flow-run heartbeats sent by our thread: the same events as Prefect's, no idle wait at the end."""

from __future__ import annotations

import time

import pytest
from prefect import flow

from pipeline.workflow.heartbeats import HEARTBEAT_EVENT, flow_heartbeats, prompt_heartbeats

pytestmark = pytest.mark.integration


@flow(name="astr-heartbeat-probe")
def _probe() -> dict:
    from prefect.runtime import flow_run
    from prefect.settings import get_current_settings

    with flow_heartbeats():
        return {
            "id": str(flow_run.id),
            "prefect_interval": get_current_settings().flows.heartbeat_frequency,
        }


def _heartbeats(run_id: str, timeout: float = 30.0) -> list:
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    query = EventFilter(
        event=EventNameFilter(name=[HEARTBEAT_EVENT]),
        resource=EventResourceFilter(id=[f"prefect.flow-run.{run_id}"]),
    )
    deadline = time.monotonic() + timeout
    while True:  # the server persists events in batches
        with get_client(sync_client=True) as client:
            found = client.read_events(filter=query, limit=50).events
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_prompt_heartbeats_replace_prefects_thread(prefect_server_url):
    from prefect.events.worker import EventsWorker

    began = time.perf_counter()
    with prompt_heartbeats():
        result = _probe()
    elapsed = time.perf_counter() - began
    assert result["prefect_interval"] is None  # Prefect's own thread was off
    EventsWorker.drain_all(timeout=30)
    (beat,) = _heartbeats(result["id"])
    assert beat.resource.id == f"prefect.flow-run.{result['id']}"
    assert {r.role for r in beat.related} >= {"flow"}
    # Prefect's thread would hold the run's end for up to a second; ours stops at once.
    assert elapsed < 30  # sanity only: timing is measured by benchmarks/orchestration.py


def test_without_prompt_heartbeats_prefect_keeps_its_own(prefect_server_url):
    result = _probe()
    assert result["prefect_interval"] is not None
