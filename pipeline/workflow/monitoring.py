"""Monitoring of flow runs: metrics of every run, alerts on failures, reports, Prometheus.

Every pipeline flow carries the state hooks of :func:`monitoring_hooks`. When a run
starts, :func:`setup_flow_monitoring` makes sure the catalogue has its record and
notes the queue wait and a resource baseline; when it ends (completed, failed,
crashed or cancelled) its performance is stored in ``FlowRun.metrics["performance"]``
(see :func:`monitor_flow_performance`), and a failed or crashed top-level run goes to
:func:`alert_on_failure`. A step flow run inside the pipeline is measured but not
alerted: its pipeline fails with the same error and alerts once. Hooks never fail a
flow: whatever goes wrong in them is logged.

What ``flow_id`` means:

- :func:`setup_flow_monitoring`, :func:`monitor_flow_performance`,
  :func:`alert_on_failure`: a Prefect flow run id (UUID string).
- :func:`create_flow_alerts`: a flow type (``"observation_pipeline"``), a glob of flow
  types (``"observation_*"``), ``"*"`` or ``"all"``, or a flow run id (its flow type).
- :func:`generate_flow_reports`: the same selectors; a flow run id reports that run
  and its step runs.

The hooks record nothing while ``monitoring_enabled`` is false; alerts go out only
while ``alerting_enabled`` is true (see ``pipeline.workflow.alerting``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import resource
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.config import WorkflowConfig, get_config
from pipeline.errors import ConfigError, NotFoundError
from pipeline.store import Catalogue
from pipeline.types import FlowState, FlowType
from pipeline.workflow import alerting

__all__ = [
    "MonitoringCollector",
    "acknowledge_alert",
    "alert_on_failure",
    "check_overdue",
    "configure_monitoring",
    "create_flow_alerts",
    "generate_flow_reports",
    "monitor_flow_performance",
    "monitoring_hooks",
    "prometheus_metrics",
    "resolve_flow_types",
    "setup_flow_monitoring",
]

log = logging.getLogger(__name__)

#: Keys of ``PrefectServer.setup_monitoring``'s configuration.
MONITORING_KEYS = ("routes", "replace_routes")


# -- resources of this process -------------------------------------------------------


@dataclass(frozen=True)
class _Baseline:
    """What this process had used when a run started."""

    cpu_s: float
    children_cpu_s: dict[int, float]


_BASELINES: dict[str, _Baseline] = {}
_LOCK = threading.Lock()


def _cpu_usage() -> tuple[float, dict[int, float], float]:
    """(own + reaped children CPU seconds, live descendants' CPU seconds, their RSS MB)."""
    import psutil

    process = psutil.Process()
    times = process.cpu_times()
    own = times.user + times.system + times.children_user + times.children_system
    live: dict[int, float] = {}
    rss = 0.0
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            child_times = child.cpu_times()
            live[child.pid] = child_times.user + child_times.system
            rss += child.memory_info().rss / 2**20
    return own, live, rss


def _resources(baseline: _Baseline | None) -> dict[str, float]:
    """CPU time since ``baseline`` and peak memory of this process and its children.

    The CPU time counts this process, children it has reaped, and live descendants
    (notebook kernels) since the baseline. ``peak_rss_mb`` is the process's lifetime
    high-water mark: exact for a run served by the worker (one process per run), an
    upper bound for a run started in a longer-lived process.
    """
    own, live, children_rss = _cpu_usage()
    usage = {
        "peak_rss_mb": round(
            max(
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
            )
            / 1024,
            1,
        ),
        "children_rss_mb": round(children_rss, 1),
    }
    if baseline is not None:
        children = sum(cpu - baseline.children_cpu_s.get(pid, 0.0) for pid, cpu in live.items())
        usage["cpu_time_s"] = round(max(own - baseline.cpu_s, 0.0) + max(children, 0.0), 3)
    return usage


# -- per-run monitoring ----------------------------------------------------------------


def setup_flow_monitoring(flow_id: str) -> None:
    """Start monitoring flow run ``flow_id``: its record, queue wait and resource baseline.

    Creates the catalogue record when there is none (flow type from Prefect's flow
    name), marks it RUNNING with its start time once Prefect says it runs, stores the
    queue wait, and takes this process's CPU baseline for the run's CPU time. The
    ``on_running`` hook of every pipeline flow calls it; calling it again is harmless.

    Parameters
    ----------
    flow_id : str
        Prefect flow run id.

    Raises
    ------
    NotFoundError
        If Prefect has no such flow run.
    """
    config = get_config()
    if not config.monitoring_enabled:
        return
    run, flow_name = _read_prefect_run(flow_id)
    _start(config, run, flow_name)


def monitor_flow_performance(flow_id: str) -> dict[str, Any]:
    """Performance of flow run ``flow_id``, stored in its record and returned.

    Parameters
    ----------
    flow_id : str
        Prefect flow run id.

    Returns
    -------
    dict
        ``state``, ``duration_s`` (end - start; so far, while running),
        ``queue_wait_s`` (start - expected start), ``step_durations_s`` (per step run,
        for a pipeline), ``notebook_durations_s`` (for a step run: wall, kernel,
        overhead...), ``retries`` (Prefect reruns of the flow), ``notebook_attempts``
        (the runner's attempts, summed over steps), and, when measured by the run's
        own process, ``cpu_time_s``, ``peak_rss_mb`` and ``children_rss_mb``.

    Raises
    ------
    NotFoundError
        If Prefect has no such flow run.
    """
    config = get_config()
    run, flow_name = _read_prefect_run(flow_id)
    return _measure(config, run, flow_name, resources=None)


def alert_on_failure(
    flow_id: str,
    error: BaseException,
    *,
    flow_type: str | None = None,
    severity: str = "error",
    failed_at: datetime | None = None,
) -> None:
    """Raise an alert for failed flow run ``flow_id``; never raises itself.

    The flows' ``on_failure`` and ``on_crashed`` hooks call it. Routing, dedup,
    throttling and escalation are ``pipeline.workflow.alerting``'s; overdue alerts
    are checked at the same time. Does nothing unless ``alerting_enabled``.

    Parameters
    ----------
    flow_id : str
        Prefect flow run id.
    error : Exception
        Why it failed.
    flow_type : str, optional
        Default: from the catalogue record, else Prefect's flow name.
    severity : str
        ``warning``, ``error`` (a failure) or ``critical`` (a crash).
    failed_at : datetime, optional
        When it failed (its state's timestamp), carried in the notification.
    """
    try:
        _alert(get_config(), flow_id, error, flow_type, severity, failed_at)
    except Exception as exc:  # an alert lost is logged, never a second failure
        log.error("alert for flow run %s not raised: %s: %s", flow_id, type(exc).__name__, exc)


def _alert(
    config: WorkflowConfig,
    flow_id: str,
    error: BaseException,
    flow_type: str | None,
    severity: str,
    failed_at: datetime | None,
) -> alerting.AlertOutcome | None:
    if not config.alerting_enabled:
        log.debug("alerting disabled: no alert for flow run %s (%s)", flow_id, error)
        return None
    catalogue = _catalogue(config)
    flow_type = flow_type or _flow_type_of_run(catalogue, flow_id)
    routes = alerting.active_routes(config, catalogue)
    outcome = alerting.raise_alert(
        catalogue,
        config,
        flow_type=flow_type,
        error=error,
        flow_run_id=str(flow_id),
        severity=severity,
        failed_at=failed_at,
        routes=routes,
    )
    alerting.check_overdue_alerts(catalogue, config, routes=routes)
    return outcome


def create_flow_alerts(flow_id: str, alert_config: dict) -> None:
    """Store an alert route for some flow types (kept in the catalogue database).

    Parameters
    ----------
    flow_id : str
        Flow type, glob of flow types, ``"*"``/``"all"``, or a flow run id (its type).
    alert_config : dict
        A route table: ``channels`` (required), and optionally ``name`` (default
        ``alerts-<flow_id>``; a route of the same name is replaced), ``min_severity``,
        ``dedup_window_s``, ``throttle_max``, ``throttle_period_s``, ``escalate_after``,
        ``escalate_window_s``, ``ack_timeout_s``, ``timeout_s``. Keys left out take the
        ``[alerting]`` defaults of the settings when an alert is evaluated.

    Raises
    ------
    ConfigError
        Naming the bad key, or the unknown flow type.
    """
    config = get_config()
    catalogue = _catalogue(config)
    if not isinstance(alert_config, Mapping):
        raise ConfigError("alert_config must be a table/dict with channels")
    if "flow_types" in alert_config:
        raise ConfigError(
            "alert_config must not hold flow_types: the flow_id argument selects them"
        )
    table = {
        **alert_config,
        "name": alert_config.get("name") or f"alerts-{flow_id}",
        "flow_types": resolve_flow_types(flow_id, catalogue),
    }
    route = alerting.parse_route(table, f"alert route {table['name']!r}", _route_defaults(config))
    try:
        alerting.check_secrets([route], config.alert_secrets)
    except ConfigError as exc:  # the worker's environment may hold it; say so now
        log.warning("%s (needed where the flows run)", exc)
    from pipeline.store.alerts import AlertStore

    AlertStore(catalogue).save_route(route.name, table)


def acknowledge_alert(alert_id: str, by: str | None = None) -> dict[str, Any]:
    """Acknowledge alert ``alert_id`` so that it escalates no further.

    Returns
    -------
    dict
        The alert (see :func:`alert_dict`).

    Raises
    ------
    NotFoundError
        If there is no such alert.
    """
    catalogue = _catalogue(get_config())
    return alert_dict(alerting.acknowledge_alert(catalogue, alert_id, by))


def check_overdue() -> list[dict[str, Any]]:
    """Escalate alerts left unacknowledged too long; what was escalated (``astr alerts check``)."""
    config = get_config()
    outcomes = alerting.check_overdue_alerts(_catalogue(config), config)
    return [
        {"alert_id": o.alert_id, "level": o.level, "deliveries": list(o.deliveries)}
        for o in outcomes
    ]


def watch_overdue(interval: float = 60.0) -> threading.Event:
    """Run :func:`check_overdue` every ``interval`` seconds in a daemon thread.

    ``astr worker`` starts it when alerting is enabled, so an alert nobody acknowledges
    escalates even on a night with no further failures. Set the returned event to stop.
    """
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(interval):
            try:
                check_overdue()
            except Exception as exc:  # a database hiccup must not end the watch
                log.warning("checking for overdue alerts failed: %s: %s", type(exc).__name__, exc)

    threading.Thread(target=loop, name="astr-overdue-alerts", daemon=True).start()
    return stop


def alert_dict(alert: Any) -> dict[str, Any]:
    """An alert record as JSON-ready data."""

    def iso(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "alert_id": str(alert.id),
        "flow_type": alert.flow_type,
        "severity": alert.severity,
        "status": alert.status,
        "title": alert.title,
        "message": alert.message,
        "count": alert.count,
        "level": alert.level,
        "flow_run_ids": list(alert.flow_run_ids or []),
        "first_seen": iso(alert.first_seen),
        "last_seen": iso(alert.last_seen),
        "notified_at": iso(alert.notified_at),
        "escalated_at": iso(alert.escalated_at),
        "acknowledged_at": iso(alert.acknowledged_at),
        "acknowledged_by": alert.acknowledged_by,
    }


def generate_flow_reports(flow_id: str, time_range: tuple) -> dict:
    """Success rate, p50/p95 durations, failures by cause and throughput over a time range.

    Parameters
    ----------
    flow_id : str
        Flow type, glob of flow types, ``"*"``/``"all"``, or a flow run id (that run
        and its step runs).
    time_range : tuple
        ``(since, until)``: datetimes (naive ones are UTC) or ISO 8601 strings. Runs
        created in [since, until) count.

    Returns
    -------
    dict
        See ``pipeline.workflow.flow_reports.summarize_runs``; ``html_path`` is the
        HTML page with the plots, under ``<home>/reports/flows/``.
    """
    from pipeline.store.flow_stats import runs_between
    from pipeline.workflow import flow_reports

    since, until = flow_reports.parse_time_range(time_range)
    config = get_config()
    catalogue = _catalogue(config)
    run_id = _as_uuid(flow_id)
    if run_id is not None:
        records = [catalogue.get_flow_run(run_id), *catalogue.child_flow_runs(run_id)]
        records = [r for r in records if since <= r.created_at < until]
    else:
        records = runs_between(catalogue, since, until, resolve_flow_types(flow_id, catalogue))
        records = [r for r in records if _selected(r.flow_type, flow_id)]
    runs = [flow_reports.run_facts(record) for record in records]
    summary = flow_reports.summarize_runs(runs, since, until)
    summary["flow_id"] = flow_id
    directory = Path(config.home) / "reports" / "flows"
    summary["html_path"] = str(flow_reports.write_report(summary, runs, directory))
    return summary


def resolve_flow_types(flow_id: str, catalogue: Catalogue | None = None) -> list[str]:
    """The flow types ``flow_id`` selects (see the module docstring).

    Raises
    ------
    ConfigError
        If it is neither a flow type, a glob matching one, ``*``/``all``, nor a known run.
    """
    known = [t.value for t in FlowType]
    if flow_id in ("*", "all"):
        return known
    if flow_id in known:
        return [flow_id]
    if any(ch in flow_id for ch in "*?["):
        chosen = [t for t in known if fnmatch.fnmatchcase(t, flow_id)]
        if chosen:
            return chosen
    elif _as_uuid(flow_id) is not None:
        return [_flow_type_of_run(catalogue or _catalogue(get_config()), flow_id)]
    raise ConfigError(
        f"{flow_id!r} selects no flow: give a flow run id, 'all', a glob such as "
        f"'observation_*', or one of: {', '.join(known)}"
    )


# -- Prometheus ----------------------------------------------------------------------


def prometheus_metrics(catalogue: Catalogue, *, window_s: float = 86400.0) -> bytes:
    """The catalogue's flow-run and alert metrics in Prometheus text format.

    Serve it at ``GET /metrics`` with content type
    ``prometheus_client.CONTENT_TYPE_LATEST``. Families:

    - ``astr_flow_runs{flow_type,status}``: records of every state (all time);
    - ``astr_flow_run_duration_seconds{flow_type}``: a summary (p50, p95, count, sum)
      of the runs finished in the last ``window_s`` seconds;
    - ``astr_flow_run_queue_wait_seconds{flow_type}``: mean queue wait there;
    - ``astr_alerts_open{flow_type,severity,level}``: unacknowledged alerts;
    - ``astr_alert_deliveries{route,status}``: notifications sent, failed, throttled.
    """
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(MonitoringCollector(catalogue, window_s=window_s))
    return generate_latest(registry)


class MonitoringCollector:
    """A prometheus_client collector of the catalogue's flow-run and alert metrics.

    Register it in an application's registry (``registry.register(MonitoringCollector(
    catalogue, run_counts=False))`` where ``astr_flow_runs`` is exported already); the
    catalogue is read at each scrape.

    Parameters
    ----------
    catalogue : Catalogue
    window_s : float
        Durations and queue waits are of runs finished this many seconds back.
    run_counts : bool
        Also export ``astr_flow_runs{flow_type,status}``.
    """

    def __init__(
        self, catalogue: Catalogue, *, window_s: float = 86400.0, run_counts: bool = True
    ) -> None:
        self.catalogue = catalogue
        self.window_s = window_s
        self.run_counts = run_counts

    def describe(self) -> Iterator[Any]:
        """The families' names, without reading the catalogue (for registration)."""
        from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily

        names = [*(["astr_flow_runs"] if self.run_counts else []), *_GAUGES]
        for name in names:
            yield GaugeMetricFamily(name, name)
        yield SummaryMetricFamily("astr_flow_run_duration_seconds", "durations")

    def collect(self) -> Iterator[Any]:
        """Yield the metric families (see :func:`prometheus_metrics`)."""
        from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily

        from pipeline.workflow.flow_reports import recent_run_figures

        figures = recent_run_figures(self.catalogue, self.window_s)
        if self.run_counts:
            runs = GaugeMetricFamily(
                "astr_flow_runs",
                "Flow run records by type and state",
                labels=["flow_type", "status"],
            )
            for (flow_type, status), count in sorted(figures["counts"].items()):
                runs.add_metric([flow_type, status], count)
            yield runs
        durations = SummaryMetricFamily(
            "astr_flow_run_duration_seconds",
            f"Durations of flow runs finished in the last {self.window_s:g} s",
            labels=["flow_type"],
        )
        waits = GaugeMetricFamily(
            "astr_flow_run_queue_wait_seconds",
            f"Mean queue wait of flow runs finished in the last {self.window_s:g} s",
            labels=["flow_type"],
        )
        for flow_type, data in sorted(figures["durations"].items()):
            durations.add_metric([flow_type], count_value=data["count"], sum_value=data["sum"])
            if data["queue_wait_mean"] is not None:
                waits.add_metric([flow_type], data["queue_wait_mean"])
        yield durations
        quantiles = GaugeMetricFamily(
            "astr_flow_run_duration_quantile_seconds",
            "p50 and p95 of those durations",
            labels=["flow_type", "quantile"],
        )
        for flow_type, data in sorted(figures["durations"].items()):
            for q in ("0.5", "0.95"):
                quantiles.add_metric([flow_type, q], data[q])
        yield quantiles
        yield waits
        yield from _alert_families(self.catalogue)


def _alert_families(catalogue: Catalogue) -> Iterator[Any]:
    from prometheus_client.core import GaugeMetricFamily

    from pipeline.store.alerts import AlertStore

    summary = AlertStore(catalogue).summary()
    open_alerts = GaugeMetricFamily(
        "astr_alerts_open",
        "Unacknowledged alerts",
        labels=["flow_type", "severity", "level"],
    )
    for flow_type, severity, level, count in summary["open"]:
        open_alerts.add_metric([flow_type, severity, str(level)], count)
    yield open_alerts
    deliveries = GaugeMetricFamily(
        "astr_alert_deliveries",
        "Alert notifications by route and outcome",
        labels=["route", "status"],
    )
    for route, status, count in summary["deliveries"]:
        deliveries.add_metric([route, status], count)
    yield deliveries


_GAUGES = (
    "astr_flow_run_duration_quantile_seconds",
    "astr_flow_run_queue_wait_seconds",
    "astr_alerts_open",
    "astr_alert_deliveries",
)


# -- set-up (PrefectServer.setup_monitoring) -----------------------------------------


def configure_monitoring(
    config: WorkflowConfig, monitoring_config: Mapping[str, Any]
) -> dict[str, Any]:
    """Validate and store alert routes; describe the metrics exporter and the hooks.

    Parameters
    ----------
    config : WorkflowConfig
    monitoring_config : mapping
        ``routes``: list of route tables, each with ``flow_types`` (default all) besides
        the keys :func:`create_flow_alerts` takes; ``replace_routes`` (bool, default
        False): forget stored routes not in the list.

    Returns
    -------
    dict
        ``routes`` (names of the routes alerts can take now, settings' first),
        ``metrics`` (how to export them), ``hooks`` (what reports failures),
        ``monitoring_enabled``, ``alerting_enabled``.
    """
    from pipeline.store.alerts import AlertStore

    if not isinstance(monitoring_config, Mapping):
        raise ConfigError("monitoring_config must be a dict with routes and replace_routes")
    unknown = set(monitoring_config) - set(MONITORING_KEYS)
    if unknown:
        raise ConfigError(
            f"monitoring_config: unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(MONITORING_KEYS)}"
        )
    replace = monitoring_config.get("replace_routes", False)
    if not isinstance(replace, bool):
        raise ConfigError("monitoring_config.replace_routes must be true or false")
    tables = monitoring_config.get("routes", [])
    routes = alerting.parse_alerting(
        {"routes": tables, **_route_defaults(config)}, "monitoring_config"
    )
    catalogue = _catalogue(config)
    store = AlertStore(catalogue)
    for table, route in zip(tables, routes, strict=True):
        store.save_route(route.name, {**table, "flow_types": list(route.flow_types)})
    if replace:
        keep = {route.name for route in routes}
        for stored in store.routes():
            if stored["name"] not in keep:
                store.delete_route(stored["name"])
    active = alerting.active_routes(config, catalogue) if config.alerting_enabled else []
    with contextlib.suppress(ConfigError):
        alerting.check_secrets(active, config.alert_secrets)
    return {
        "monitoring_enabled": config.monitoring_enabled,
        "alerting_enabled": config.alerting_enabled,
        "routes": [route.name for route in active],
        "metrics": {
            "format": "prometheus text 0.0.4",
            "exporter": "pipeline.workflow.monitoring.prometheus_metrics(catalogue)",
        },
        "hooks": "on_running, on_completion, on_failure, on_crashed, on_cancellation "
        "of every pipeline flow",
    }


# -- state hooks -----------------------------------------------------------------------


def monitoring_hooks() -> dict[str, list[Callable[..., None]]]:
    """The ``@flow`` keyword arguments that attach monitoring to a flow (fresh lists)."""
    return {
        "on_running": [_on_running],
        "on_completion": [_on_final],
        "on_failure": [_on_final],
        "on_crashed": [_on_final],
        "on_cancellation": [_on_final],
    }


def _on_running(flow: Any, flow_run: Any, state: Any) -> None:
    try:
        config = get_config()
        if config.monitoring_enabled:
            _start(config, flow_run, flow.name, started=state.timestamp)
    except Exception as exc:  # monitoring must never fail a flow
        log.warning("flow run %s: monitoring not started: %s", flow_run.id, exc)


def _on_final(flow: Any, flow_run: Any, state: Any) -> None:
    run_id = str(flow_run.id)
    try:
        config = get_config()
        failed = state.is_failed() or state.is_crashed()
        if failed and getattr(flow_run, "parent_task_run_id", None) is None:
            alert_on_failure(
                run_id,
                _state_error(state),
                flow_type=_flow_type_value(flow.name),
                severity="critical" if state.is_crashed() else "error",
                failed_at=state.timestamp,
            )
        if config.monitoring_enabled:
            with _LOCK:
                baseline = _BASELINES.pop(run_id, None)
            resources = _resources(baseline) if baseline is not None else None
            _measure(config, flow_run, flow.name, resources=resources, final_state=state)
    except Exception as exc:  # monitoring must never fail a flow
        log.warning("flow run %s: metrics not recorded: %s: %s", run_id, type(exc).__name__, exc)


def _state_error(state: Any) -> BaseException:
    """The exception a failed state holds, else one made of its message."""
    if state.is_failed():
        try:
            result = state.result(raise_on_failure=False)
        except Exception as exc:
            result = exc
        if isinstance(result, BaseException):
            return result
        with contextlib.suppress(Exception):
            result.close()  # an unawaited coroutine from an async context
    return RuntimeError(state.message or state.name or "flow run failed")


# -- recording -------------------------------------------------------------------------


def _start(
    config: WorkflowConfig, run: Any, flow_name: str, *, started: datetime | None = None
) -> None:
    run_id = str(run.id)
    own, live, _ = _cpu_usage()
    with _LOCK:
        _BASELINES.setdefault(run_id, _Baseline(own, live))
    catalogue = _catalogue(config)
    _ensure_record(catalogue, run, flow_name)
    started = started or run.start_time
    perf: dict[str, Any] = {"run_count": int(run.run_count or 1)}
    wait = _seconds(run.expected_start_time, started)
    if wait is not None:
        perf["queue_wait_s"] = round(max(wait, 0.0), 3)
    changes: dict[str, Any] = {"status": FlowState.RUNNING, "metrics": {"performance": perf}}
    if started is not None:
        changes["started_at"] = _utc(started)
    catalogue.update_flow_run(run_id, **changes)


def _measure(
    config: WorkflowConfig,
    run: Any,
    flow_name: str,
    *,
    resources: dict[str, float] | None,
    final_state: Any = None,
) -> dict[str, Any]:
    """Combine Prefect's view of a run with the catalogue's, store it and return it."""
    fresh, _ = _read_prefect_run(str(run.id))
    catalogue = _catalogue(config)
    record = _ensure_record(catalogue, fresh, flow_name)
    state = final_state or fresh.state
    figures = run_figures(fresh, record, catalogue.child_flow_runs(record.id), state=state)
    status = FlowState(figures["state"])
    end = fresh.end_time or (state.timestamp if status.is_final and state is not None else None)
    start = fresh.start_time or record.started_at
    perf: dict[str, Any] = {**dict(record.metrics.get("performance") or {}), **figures}
    if resources:
        perf.update(resources)
    changes: dict[str, Any] = {"metrics": {"performance": perf}}
    if status.is_final and not FlowState(record.status).is_final:
        # A flow that does not record itself (the model flows), or one that was killed.
        changes.update(status=status, ended_at=_utc(end) if end else None)
        if status is not FlowState.COMPLETED and not record.error_message:
            changes["error_message"] = (state.message or status.value)[:4000]
    if start is not None and record.started_at is None:
        changes["started_at"] = _utc(start)
    catalogue.update_flow_run(record.id, **changes)
    return perf


def run_figures(
    run: Any,
    record: Any | None,
    children: Sequence[Any],
    *,
    state: Any = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """A run's performance from Prefect's view of it and the catalogue's records (no I/O).

    Parameters
    ----------
    run : prefect FlowRun
        As read from Prefect (times, run count).
    record : FlowRun record or None
        The catalogue's record of the run (start time, the runner's figures).
    children : list of FlowRun records
        Its step runs.
    state : prefect State, optional
        The state the run is entering (a hook's), when Prefect does not show it yet.
    now : datetime, optional
        The end of a run still going (default: now).

    Returns
    -------
    dict
        ``state``, ``duration_s``, ``queue_wait_s``, ``run_count``, ``retries`` and
        the step figures (``step_durations_s``, ``notebook_durations_s``,
        ``notebook_attempts``) that apply.
    """
    from pipeline.workflow.status import map_state

    state = state or run.state
    status = map_state(state.type) if state is not None else FlowState.PENDING
    end = run.end_time or (state.timestamp if status.is_final and state is not None else None)
    start = run.start_time or (record.started_at if record is not None else None)
    figures: dict[str, Any] = {"state": status.value}
    duration = _seconds(start, end or now or datetime.now(UTC))
    if duration is not None:
        figures["duration_s"] = round(duration, 3)
    wait = _seconds(run.expected_start_time, start)
    if wait is not None:
        figures["queue_wait_s"] = round(max(wait, 0.0), 3)
    # a hook can read the run before Prefect counts the run it is in
    started = 0 if status is FlowState.PENDING else 1
    figures["run_count"] = int(run.run_count or 0) or started
    figures["retries"] = max(figures["run_count"] - 1, 0)
    figures.update(_step_figures(record, children))
    return figures


def step_name(child: Any) -> str:
    """The pipeline step a step run's record is of (``ingestion``...)."""
    return child.metrics.get("step") or child.flow_type.removeprefix("observation_")


def step_duration(child: Any) -> float | None:
    """Seconds a step run took: as it measured itself, else from its record's times."""
    duration = (child.metrics.get("performance") or {}).get("duration_s")
    return duration if duration is not None else _seconds(child.started_at, child.ended_at)


def _step_figures(record: Any | None, children: Sequence[Any]) -> dict[str, Any]:
    """Per-step durations and the runner's attempts, from the run's own or its steps' records."""
    figures: dict[str, Any] = {}
    own = record.metrics.get("durations") if record is not None else None
    if isinstance(own, Mapping):
        figures["notebook_durations_s"] = dict(own)
    steps: dict[str, float] = {}
    attempts = int(record.attempts or 0) if record is not None else 0
    for child in children:
        duration = step_duration(child)
        if duration is not None:
            name = step_name(child)
            steps[name] = round(steps.get(name, 0.0) + duration, 3)
        attempts += int(child.attempts or 0)
    if steps:
        figures["step_durations_s"] = steps
    if attempts:
        figures["notebook_attempts"] = attempts
    return figures


def _ensure_record(catalogue: Catalogue, run: Any, flow_name: str) -> Any:
    """The run's catalogue record, created (with its parameters and parent) if absent."""
    try:
        return catalogue.get_flow_run(run.id)
    except NotFoundError:
        pass
    return catalogue.record_flow_run(
        run.id,
        FlowType(_flow_type_value(flow_name)),
        status=FlowState.PENDING,
        parameters=_jsonable(dict(run.parameters or {})),
        parent_id=_parent_flow_run(run),
    )


def _parent_flow_run(run: Any) -> str | None:
    """Id of the flow run that ran ``run`` as a subflow, if any."""
    task_run_id = getattr(run, "parent_task_run_id", None)
    if task_run_id is None:
        return None
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return str(client.read_task_run(task_run_id).flow_run_id)


def _read_prefect_run(flow_id: str) -> tuple[Any, str]:
    """A flow run and its flow's name from Prefect; NotFoundError when unknown."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    run_id = _as_uuid(flow_id)
    if run_id is None:
        raise NotFoundError(f"{flow_id!r} is not a flow run id (expected a UUID)")
    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(run_id)
        except ObjectNotFound:
            raise NotFoundError(f"no flow run {flow_id} in Prefect") from None
        return run, client.read_flow(run.flow_id).name


def _flow_type_of_run(catalogue: Catalogue, flow_id: str) -> str:
    try:
        return catalogue.get_flow_run(flow_id).flow_type
    except NotFoundError:
        _, flow_name = _read_prefect_run(flow_id)
        return _flow_type_value(flow_name)


def _flow_type_value(flow_name: str) -> str:
    from pipeline.workflow.status import flow_type_of

    return flow_type_of(flow_name).value


def _route_defaults(config: WorkflowConfig) -> dict[str, Any]:
    return {k: v for k, v in config.alerting.items() if k in alerting.ROUTE_DEFAULTS}


def _catalogue(config: WorkflowConfig) -> Catalogue:
    from pipeline.flows.runtime import get_catalogue

    return get_catalogue(config)


def _selected(flow_type: str, flow_id: str) -> bool:
    return flow_id in ("*", "all") or fnmatch.fnmatchcase(flow_type, flow_id)


def _as_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (_utc(end) - _utc(start)).total_seconds()


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))
