"""Flow-run heartbeats sent by our thread: the same events as Prefect's, no idle wait at the end."""

from __future__ import annotations

import os
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


@pytest.fixture
def _restore_prefect_settings():
    """Rebuild Prefect's settings from the (restored) environment after the test."""
    from pipeline.workflow.prefect_server import refresh_prefect_settings

    yield
    refresh_prefect_settings()


@pytest.mark.usefixtures("_restore_prefect_settings")
def test_worker_heartbeats_default_to_30_s_unless_set(monkeypatch):
    from pipeline.workflow.heartbeats import WORKER_HEARTBEAT_SECONDS, worker_heartbeats

    for name in ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY"):
        monkeypatch.delenv(name, raising=False)
    assert worker_heartbeats() == WORKER_HEARTBEAT_SECONDS == 30
    assert os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"  # for its flow processes
    monkeypatch.setenv("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "90")
    assert worker_heartbeats() == 90


def test_crash_detection_is_one_automation_watching_deployment_runs(prefect_server_url):
    from prefect.client.orchestration import get_client

    from pipeline.workflow.heartbeats import CRASH_AUTOMATION, ensure_crash_detection

    first = ensure_crash_detection(60)
    try:
        assert ensure_crash_detection(30) == first  # updated, not doubled
        with get_client(sync_client=True) as client:
            (automation,) = client.read_automations_by_name(CRASH_AUTOMATION)
        trigger = automation.trigger
        assert trigger.posture.value == "Proactive" and trigger.after == {HEARTBEAT_EVENT}
        assert trigger.within.total_seconds() == 2 * 30 + 5
        assert "prefect.flow-run.Completed" in trigger.expect
        assert trigger.match_related.root == {"prefect.resource.role": "deployment"}
        assert automation.actions[0].state.value == "CRASHED"
        assert ensure_crash_detection(None) is None  # heartbeats off: nothing to detect
    finally:
        with get_client(sync_client=True) as client:
            client.delete_automation(first)
