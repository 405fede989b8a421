"""Monitoring through Prefect state hooks: metrics of real runs, alerts, reports, exporter."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from alerting_servers import http_receiver
from prefect import flow
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from pipeline.config import get_config
from pipeline.errors import ConfigError
from pipeline.flows.runtime import get_catalogue
from pipeline.store.models import FlowRun
from pipeline.types import FlowState, FlowType
from pipeline.workflow import alerting
from pipeline.workflow.monitoring import (
    create_flow_alerts,
    generate_flow_reports,
    monitor_flow_performance,
    monitoring_hooks,
    prometheus_metrics,
    resolve_flow_types,
)
from pipeline.workflow.prefect_server import PrefectServer

DATA = Path(__file__).resolve().parents[1] / "data" / "decam"


@flow(name="model_rollback", **monitoring_hooks())
def failing_flow(message: str) -> None:
    """Fails with ``message`` (a flow type the routes can select)."""
    raise RuntimeError(message)


@flow(name="score_drift", **monitoring_hooks())
def busy_flow(cpu_seconds: float) -> dict:
    """Burns ``cpu_seconds`` of CPU, then completes."""
    deadline = time.process_time() + cpu_seconds
    total = 0
    while time.process_time() < deadline:
        total += sum(range(1000))
    return {"total": total}


def _prefect_run(run_id: str):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(run_id))


def _run_id(state) -> str:
    return str(state.state_details.flow_run_id)


@pytest.fixture
def alerting_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ASTR_ALERTING_ENABLED", "true")
    get_config.cache_clear()


# -- through Prefect -----------------------------------------------------------------


@pytest.mark.integration
def test_failing_flow_alerts_its_webhook_and_escalates(prefect_server_url, alerting_on):
    with http_receiver() as (url, got):
        create_flow_alerts(
            "model_rollback",
            {
                "name": "team",
                "channels": [{"type": "webhook", "url": f"{url}/team"}],
                "escalate_after": 3,
            },
        )
        create_flow_alerts(
            "model_*", {"name": "oncall", "channels": [{"type": "webhook", "url": f"{url}/oncall"}]}
        )
        states = [failing_flow(f"disk {n} of 3 full", return_state=True) for n in (1, 2)]
        (first,) = got.wait_for(1, path="/team")
        assert got.bodies("/oncall") == []
        states.append(failing_flow("disk 3 of 3 full", return_state=True))
        (escalated,) = got.wait_for(1, path="/oncall")
        receipts = [when for _, _, when in got.requests]
    assert all(state.is_failed() for state in states)
    ids = [_run_id(state) for state in states]
    assert first["flow_run_id"] == ids[0] and first["severity"] == "error"
    assert first["message"] == "RuntimeError: disk 1 of 3 full"
    assert escalated["flow_run_id"] == ids[2] and escalated["count"] == 3
    assert escalated["reason"] == "repeat" and escalated["alert_id"] == first["alert_id"]
    failed_at = datetime.fromisoformat(first["failed_at"])
    assert abs(failed_at - states[0].timestamp) < timedelta(milliseconds=1)
    assert 0 <= receipts[0] - failed_at.timestamp() < 5.0

    catalogue = get_catalogue(get_config())
    record = catalogue.get_flow_run(ids[0])  # the model flows record nothing themselves
    assert record.flow_type == "model_rollback" and record.status == FlowState.FAILED
    assert "disk 1 of 3 full" in record.error_message
    assert record.parameters == {"message": "disk 1 of 3 full"}
    perf = record.metrics["performance"]
    assert perf["state"] == "FAILED" and perf["retries"] == 0 and perf["duration_s"] >= 0


@pytest.mark.integration
def test_completed_run_metrics_add_up(prefect_server_url):
    state = busy_flow(0.4, return_state=True)
    assert state.is_completed()
    run_id = _run_id(state)
    run = _prefect_run(run_id)
    record = get_catalogue(get_config()).get_flow_run(run_id)
    perf = record.metrics["performance"]
    assert record.flow_type == "score_drift" and record.status == FlowState.COMPLETED
    assert perf["duration_s"] == pytest.approx(
        (run.end_time - run.start_time).total_seconds(), abs=0.01
    )
    assert perf["duration_s"] >= 0.4
    assert 0.35 <= perf["cpu_time_s"] <= perf["duration_s"] * 2 + 0.5
    queue = (run.start_time - run.expected_start_time).total_seconds()
    assert perf["queue_wait_s"] == pytest.approx(max(queue, 0.0), abs=0.01)
    assert perf["retries"] == 0 and perf["run_count"] == 1
    assert perf["peak_rss_mb"] > 50
    assert record.started_at is not None and record.ended_at is not None
    again = monitor_flow_performance(run_id)
    assert again["duration_s"] == pytest.approx(perf["duration_s"], abs=1e-3)
    assert again["cpu_time_s"] == perf["cpu_time_s"]  # kept from the run's own measurement


@pytest.mark.integration
def test_failed_observation_flow_alerts_and_pipeline_steps_are_timed(
    prefect_server_url, alerting_on, tmp_path
):
    from pipeline.flows.observations import observation_ingestion_flow, observation_pipeline_flow

    lines = tmp_path / "alerts.jsonl"
    create_flow_alerts("observation_*", {"channels": [{"type": "jsonl", "path": str(lines)}]})
    missing = {
        "science_path": str(tmp_path / "nope.fits"),
        "reference_path": str(DATA / "Stack-DEC-OBS18.fits"),
    }
    state = observation_ingestion_flow(missing, return_state=True)
    assert state.is_failed()
    (notice,) = [json.loads(line) for line in lines.read_text().splitlines()]
    assert notice["flow_type"] == "observation_ingestion" and notice["flow_run_id"] == _run_id(
        state
    )
    assert notice["error_type"] == "ImageNotFoundError"

    pair = {
        "science_path": str(DATA / "DEC-OBS04a.mini.fits"),
        "reference_path": str(DATA / "Stack-DEC-OBS18.fits"),
    }
    state = observation_pipeline_flow(pair, return_state=True)
    assert state.is_completed(), state.message
    record = get_catalogue(get_config()).get_flow_run(_run_id(state))
    perf = record.metrics["performance"]
    steps = perf["step_durations_s"]
    assert set(steps) == {"ingestion", "preprocessing", "differencing", "detection", "validation"}
    assert all(value > 0 for value in steps.values())
    assert sum(steps.values()) <= perf["duration_s"] + 0.01
    assert perf["notebook_attempts"] >= 5
    assert record.metrics["candidates"]  # the flow's own metrics are kept beside
    assert len(lines.read_text().splitlines()) == 1  # the successful run alerted nothing


# -- reports and the exporter ---------------------------------------------------------


def _record(catalogue, flow_type, status, created, duration, error=None):
    run_id = uuid.uuid4()
    catalogue.record_flow_run(run_id, FlowType(flow_type), status=FlowState(status))
    changes = {"error_message": error} if error else {}
    if duration is not None:
        changes.update(started_at=created, ended_at=created + timedelta(seconds=duration))
    catalogue.update_flow_run(run_id, **changes)
    with catalogue.session() as session:
        session.get(FlowRun, run_id).created_at = created
    return run_id


@pytest.fixture
def known_runs():
    """20 completed pipelines lasting 1..20 s, 4 failed, 1 cancelled, 2 others, in 4 hours."""
    catalogue = get_catalogue(get_config())
    since = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=4)
    for i in range(20):
        created = since + timedelta(minutes=10 * i)
        _record(catalogue, "observation_pipeline", "COMPLETED", created, float(i + 1))
    for i, error in enumerate(
        ["no WCS in 7.fits", "no WCS in 9.fits", "kernel died", "no WCS in 1.fits"]
    ):
        _record(
            catalogue,
            "observation_pipeline",
            "FAILED",
            since + timedelta(minutes=5 + i),
            2.0,
            error,
        )
    _record(catalogue, "observation_pipeline", "CANCELLED", since + timedelta(minutes=50), 1.0)
    _record(catalogue, "model_training", "COMPLETED", since + timedelta(minutes=1), 100.0)
    _record(catalogue, "model_training", "FAILED", since + timedelta(minutes=2), 3.0, "oom")
    _record(catalogue, "observation_pipeline", "COMPLETED", since - timedelta(hours=1), 999.0)
    return catalogue, since, since + timedelta(hours=4)


def test_report_figures_add_up(known_runs):
    _, since, until = known_runs
    report = generate_flow_reports("observation_pipeline", (since, until))
    durations = np.arange(1, 21, dtype=float)
    assert report["runs"] == 25
    assert report["by_status"] == {"CANCELLED": 1, "COMPLETED": 20, "FAILED": 4}
    assert report["success_rate"] == pytest.approx(20 / 24)
    assert report["duration_p50_s"] == pytest.approx(10.5)
    assert report["duration_p95_s"] == pytest.approx(19.05)
    assert report["duration_p95_s"] == pytest.approx(np.percentile(durations, 95))
    assert report["failures_by_cause"] == {"no WCS in <n>.fits": 3, "kernel died": 1}
    assert report["throughput_per_hour"] == pytest.approx(20 / 4)
    page = Path(report["html_path"]).read_text()
    assert page.count("data:image/png;base64,") == 1 and "83.3%" in page
    assert Path(report["html_path"]).parent == get_config().home / "reports" / "flows"

    everything = generate_flow_reports("all", (since.isoformat(), until.isoformat()))
    assert everything["runs"] == 27 and everything["success_rate"] == pytest.approx(21 / 26)
    assert everything["by_flow_type"]["model_training"]["duration_p50_s"] == 100.0
    assert everything["by_flow_type"]["observation_pipeline"]["runs"] == 25
    models = generate_flow_reports("model_*", (since, until))
    assert models["runs"] == 2 and models["failures_by_cause"] == {"oom": 1}


def test_report_rejects_bad_selections(known_runs):
    _, since, until = known_runs
    with pytest.raises(ConfigError, match="selects no flow"):
        generate_flow_reports("pipelines", (since, until))
    with pytest.raises(ValueError, match="not before"):
        generate_flow_reports("all", (until, since))
    with pytest.raises(ValueError, match="not a time"):
        generate_flow_reports("all", ("yesterday", "now"))
    assert resolve_flow_types("observation_p*") == [
        "observation_preprocessing",
        "observation_pipeline",
    ]


def test_prometheus_export_counts_the_catalogue(known_runs, alerting_on):
    catalogue, _, _ = known_runs
    config = get_config()
    alerting.raise_alert(catalogue, config, flow_type="model_training", error=ValueError("x"))
    families = {
        f.name: f for f in text_string_to_metric_families(prometheus_metrics(catalogue).decode())
    }
    runs = {
        (s.labels["flow_type"], s.labels["status"]): s.value
        for s in families["astr_flow_runs"].samples
    }
    assert runs[("observation_pipeline", "COMPLETED")] == 21
    assert runs[("observation_pipeline", "FAILED")] == 4
    summary = {
        (s.name, s.labels["flow_type"]): s.value
        for s in families["astr_flow_run_duration_seconds"].samples
    }
    # every run ended within the last 24 hours
    assert summary[("astr_flow_run_duration_seconds_count", "model_training")] == 2
    assert summary[("astr_flow_run_duration_seconds_sum", "model_training")] == pytest.approx(103)
    (open_alert,) = families["astr_alerts_open"].samples
    assert open_alert.labels == {"flow_type": "model_training", "severity": "error", "level": "0"}
    assert open_alert.value == 1


# -- set-up and the command line -------------------------------------------------------


def test_setup_monitoring_validates_and_stores_routes(alerting_on):
    server = PrefectServer(get_config())
    with pytest.raises(ConfigError, match=r"monitoring_config\.routes\[0\]\.channels\[0\]\.url"):
        server.setup_monitoring(
            {"routes": [{"name": "a", "channels": [{"type": "webhook", "url": "nowhere"}]}]}
        )
    with pytest.raises(ConfigError, match=r"unknown key.*automations"):
        server.setup_monitoring({"automations": True})
    route = {"name": "obs", "flow_types": ["observation_*"], "channels": [{"type": "log"}]}
    result = server.setup_monitoring({"routes": [route]})
    assert result["routes"] == ["obs"] and result["alerting_enabled"] is True
    assert "prometheus_metrics" in result["metrics"]["exporter"]
    create_flow_alerts("model_training", {"name": "models", "channels": [{"type": "log"}]})
    assert server.setup_monitoring({"routes": [route]})["routes"] == ["obs", "models"]
    assert server.setup_monitoring({"routes": [route], "replace_routes": True})["routes"] == ["obs"]


def test_cli_report_and_alerts(known_runs, alerting_on):
    from pipeline.cli import app

    catalogue, since, until = known_runs
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "report",
            "--since",
            since.isoformat(),
            "--until",
            until.isoformat(),
            "--flow-type",
            "observation_pipeline",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["runs"] == 25
    result = runner.invoke(app, ["report", "--since", "5h"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output and "no WCS in <n>.fits" in result.output

    outcome = alerting.raise_alert(
        catalogue, get_config(), flow_type="model_training", error=ValueError("x")
    )
    listed = json.loads(runner.invoke(app, ["alerts", "list", "--json"]).output)
    assert [a["alert_id"] for a in listed] == [outcome.alert_id]
    result = runner.invoke(app, ["alerts", "ack", outcome.alert_id, "--by", "ana", "--json"])
    assert json.loads(result.output)["status"] == "acknowledged"
    assert json.loads(runner.invoke(app, ["alerts", "list", "--json"]).output) == []
    result = runner.invoke(app, ["alerts", "check"])
    assert result.exit_code == 0 and result.output == ""


def test_the_overdue_watch_escalates_an_unacknowledged_alert(alerting_on):
    from pipeline.workflow.monitoring import alert_on_failure, watch_overdue

    with http_receiver() as (url, got):
        for name in ("team", "oncall"):
            create_flow_alerts(
                "observation_*",
                {
                    "name": name,
                    "ack_timeout_s": 1,
                    "channels": [{"type": "webhook", "url": f"{url}/{name}"}],
                },
            )
        alert_on_failure(
            str(uuid.uuid4()), ValueError("bad header"), flow_type="observation_pipeline"
        )
        (first,) = got.wait_for(1, path="/team")
        assert first["flow_type"] == "observation_pipeline"
        assert not got.wait_for(0, path="/oncall")
        stop = watch_overdue(0.2)
        try:
            (escalated,) = got.wait_for(1, path="/oncall", timeout=15)
        finally:
            stop.set()
        assert escalated["reason"] == "unacknowledged"
