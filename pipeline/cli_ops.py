"""The ``astr`` commands of operations: flow reports and alerts.

``astr report`` summarises the flow runs of a time range (success rate, p50/p95
durations, failures by cause, throughput) and writes an HTML page with plots;
``astr alerts`` lists, acknowledges and escalates alerts.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.config import get_config

__all__ = ["alerts_app", "register"]

console = Console()
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]

alerts_app = typer.Typer(help="Alerts raised by failed flow runs.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add ``astr report`` and ``astr alerts`` to the ``astr`` app."""
    app.command("report")(report)
    app.add_typer(alerts_app, name="alerts")


def report(
    since: Annotated[
        str, typer.Option(help="Start: ISO 8601 time, or a span back from now (24h, 7d).")
    ] = "24h",
    until: Annotated[str, typer.Option(help="End: ISO 8601 time or 'now'.")] = "now",
    flow_type: Annotated[
        str,
        typer.Option(
            "--flow-type", help="Flow type, glob (observation_*), 'all', or a flow run id."
        ),
    ] = "all",
    as_json: JsonFlag = False,
) -> None:
    """Success rate, p50/p95 durations, failures by cause and throughput of flow runs.

    Also writes an HTML page with plots under <home>/reports/flows/ and prints its path.
    """
    from pipeline.workflow.monitoring import generate_flow_reports

    try:
        summary = generate_flow_reports(flow_type, (since, until))
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    console.print(_report_table(summary))
    if summary["failures_by_cause"]:
        causes = Table(title="failures by cause")
        causes.add_column("runs", justify="right")
        causes.add_column("cause")
        for cause, count in summary["failures_by_cause"].items():
            causes.add_row(str(count), cause)
        console.print(causes)
    console.print(f"report: {summary['html_path']}", highlight=False)


def _report_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"flow runs {summary['since'][:19]} .. {summary['until'][:19]} UTC")
    for column in ("flow type", "runs", "success", "p50 (s)", "p95 (s)", "completed/h"):
        table.add_column(column, justify="left" if column == "flow type" else "right")
    rows = [*summary["by_flow_type"].items(), ("all selected", summary)]
    for name, figures in rows:
        table.add_row(
            name,
            str(figures["runs"]),
            _fmt(figures["success_rate"], "{:.1%}"),
            _fmt(figures["duration_p50_s"], "{:.1f}"),
            _fmt(figures["duration_p95_s"], "{:.1f}"),
            _fmt(figures["throughput_per_hour"], "{:.2f}"),
        )
    return table


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


@alerts_app.command("list")
def alerts_list(
    show_all: Annotated[
        bool, typer.Option("--all", help="Also acknowledged alerts (default: open ones).")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="At most this many.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Alerts, most recently seen first."""
    from pipeline.flows.runtime import get_catalogue
    from pipeline.store.alerts import OPEN, AlertStore
    from pipeline.workflow.monitoring import alert_dict

    store = AlertStore(get_catalogue(get_config()))
    alerts = [alert_dict(a) for a in store.recent(status=None if show_all else OPEN, limit=limit)]
    if as_json:
        typer.echo(json.dumps(alerts, indent=2))
        return
    table = Table(title="alerts")
    for column in ("id", "flow type", "severity", "status", "count", "level", "last seen"):
        table.add_column(column)
    for alert in alerts:
        table.add_row(
            alert["alert_id"],
            alert["flow_type"],
            alert["severity"],
            alert["status"],
            str(alert["count"]),
            str(alert["level"]),
            (alert["last_seen"] or "")[:19],
        )
    console.print(table)


@alerts_app.command("ack")
def alerts_ack(
    alert_id: Annotated[str, typer.Argument(help="Id of the alert (astr alerts list).")],
    by: Annotated[str | None, typer.Option(help="Who acknowledges it.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Acknowledge an alert: it escalates no further."""
    from pipeline.workflow.monitoring import acknowledge_alert

    alert = acknowledge_alert(alert_id, by=by)
    if as_json:
        typer.echo(json.dumps(alert, indent=2))
    else:
        console.print(f"alert {alert['alert_id']} {alert['status']} at {alert['acknowledged_at']}")


@alerts_app.command("check")
def alerts_check(
    every: Annotated[
        float | None,
        typer.Option(min=1.0, help="Repeat every this many seconds until interrupted."),
    ] = None,
) -> None:
    """Escalate alerts left unacknowledged longer than their route's ack_timeout_s."""
    from pipeline.workflow.monitoring import check_overdue

    while True:
        for outcome in check_overdue():
            console.print(
                f"alert {outcome['alert_id']} escalated to level {outcome['level']}: "
                + ", ".join(f"{route} {status}" for route, _, status in outcome["deliveries"])
            )
        if every is None:
            return
        time.sleep(every)
