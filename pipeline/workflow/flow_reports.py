"""Reports over flow runs: success rate, duration percentiles, failures by cause, throughput.

The figures are pure functions of run records (:func:`summarize_runs`); the HTML page
adds two plots (durations, runs per hour) as an embedded PNG.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.types import FlowState
from pipeline.workflow.alerting import error_cause

__all__ = [
    "RunFacts",
    "parse_time",
    "parse_time_range",
    "percentile",
    "recent_run_figures",
    "run_facts",
    "summarize_runs",
    "write_report",
]

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass(frozen=True)
class RunFacts:
    """What a report needs of one flow run."""

    flow_type: str
    status: str
    created_at: datetime
    duration_s: float | None
    error: str | None


def run_facts(record: Any) -> RunFacts:
    """Facts of a catalogue ``FlowRun`` record (duration from its performance, else times)."""
    duration = (record.metrics.get("performance") or {}).get("duration_s")
    if duration is None and record.started_at is not None and record.ended_at is not None:
        duration = (record.ended_at - record.started_at).total_seconds()
    return RunFacts(
        record.flow_type, record.status, record.created_at, duration, record.error_message
    )


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100), linear between order statistics; None when empty."""
    if not len(values):
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize_runs(runs: Sequence[RunFacts], since: datetime, until: datetime) -> dict[str, Any]:
    """The report's figures over ``runs`` created in [since, until).

    Returns
    -------
    dict
        ``since``, ``until`` (ISO 8601), ``hours``, ``runs``, ``by_status``,
        ``success_rate`` (completed / (completed + failed); cancelled runs are an
        operator's choice and left out; None without finished runs),
        ``duration_p50_s`` / ``duration_p95_s`` / ``duration_mean_s`` (completed runs),
        ``failures_by_cause`` (error type and first line, ids and numbers blanked, most
        frequent first), ``throughput_per_hour`` (completed runs per hour of the range)
        and ``by_flow_type`` (the same figures per flow type).
    """
    hours = (until - since).total_seconds() / 3600
    summary = {"since": since.isoformat(), "until": until.isoformat(), "hours": round(hours, 4)}
    summary.update(_figures(runs, hours))
    by_type: dict[str, list[RunFacts]] = {}
    for run in runs:
        by_type.setdefault(run.flow_type, []).append(run)
    summary["by_flow_type"] = {
        flow_type: _figures(group, hours) for flow_type, group in sorted(by_type.items())
    }
    return summary


def _figures(runs: Sequence[RunFacts], hours: float) -> dict[str, Any]:
    statuses = Counter(run.status for run in runs)
    completed = statuses.get(FlowState.COMPLETED.value, 0)
    failed = statuses.get(FlowState.FAILED.value, 0)
    durations = [
        r.duration_s
        for r in runs
        if r.status == FlowState.COMPLETED.value and r.duration_s is not None
    ]
    causes = Counter(
        error_cause(run.error or "no error message")
        for run in runs
        if run.status == FlowState.FAILED.value
    )
    return {
        "runs": len(runs),
        "by_status": dict(sorted(statuses.items())),
        "success_rate": completed / (completed + failed) if completed + failed else None,
        "duration_p50_s": percentile(durations, 50),
        "duration_p95_s": percentile(durations, 95),
        "duration_mean_s": float(np.mean(durations)) if durations else None,
        "failures_by_cause": dict(causes.most_common()),
        "throughput_per_hour": completed / hours if hours > 0 else None,
    }


def parse_time(value: Any, *, now: datetime | None = None) -> datetime:
    """A datetime, an ISO 8601 string or a span back from now (``90m``, ``24h``, ``7d``).

    Naive times are taken as UTC.
    """
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    text = str(value).strip()
    match = _RELATIVE.match(text)
    if match:
        span = float(match.group(1)) * _UNITS[match.group(2)]
        return (now or datetime.now(UTC)) - timedelta(seconds=span)
    if text == "now":
        return now or datetime.now(UTC)
    try:
        return parse_time(datetime.fromisoformat(text))
    except ValueError:
        raise ValueError(
            f"{value!r} is not a time: give ISO 8601 (2026-12-01 or 2026-12-01T18:00:00+00:00), "
            "'now', or a span back from now such as 90m, 24h, 7d"
        ) from None


def parse_time_range(time_range: Any) -> tuple[datetime, datetime]:
    """``(since, until)`` as aware UTC datetimes, checked to be in order."""
    if not isinstance(time_range, tuple | list) or len(time_range) != 2:
        raise ValueError(f"time_range must be a (since, until) pair, got {time_range!r}")
    now = datetime.now(UTC)
    since, until = (parse_time(value, now=now) for value in time_range)
    if not since < until:
        raise ValueError(f"time_range: since {since} is not before until {until}")
    return since, until


def recent_run_figures(catalogue: Any, window_s: float) -> dict[str, Any]:
    """Counts of records by (type, status), and durations of runs finished recently.

    Returns
    -------
    dict
        ``counts``: {(flow_type, status): n}; ``durations``: {flow_type: {"count",
        "sum", "0.5", "0.95", "queue_wait_mean"}} over runs ended in the last
        ``window_s`` seconds.
    """
    from pipeline.store.flow_stats import ended_since, run_counts

    counts = run_counts(catalogue)
    recent = ended_since(catalogue, datetime.now(UTC) - timedelta(seconds=window_s))
    grouped: dict[str, tuple[list[float], list[float]]] = {}
    for flow_type, started, ended, metrics in recent:
        perf = (metrics or {}).get("performance") or {}
        duration = perf.get("duration_s")
        if duration is None and started is not None:
            duration = (ended - started).total_seconds()
        durations, waits = grouped.setdefault(flow_type, ([], []))
        if duration is not None:
            durations.append(float(duration))
        if perf.get("queue_wait_s") is not None:
            waits.append(float(perf["queue_wait_s"]))
    return {
        "counts": counts,
        "durations": {
            flow_type: {
                "count": len(durations),
                "sum": float(sum(durations)),
                "0.5": percentile(durations, 50) or 0.0,
                "0.95": percentile(durations, 95) or 0.0,
                "queue_wait_mean": float(np.mean(waits)) if waits else None,
            }
            for flow_type, (durations, waits) in grouped.items()
        },
    }


# -- HTML ----------------------------------------------------------------------------


def write_report(summary: dict[str, Any], runs: Sequence[RunFacts], directory: Path) -> Path:
    """Write the report page (figures, plots, failures) under ``directory``; its path."""
    directory.mkdir(parents=True, exist_ok=True)
    stamp = "{}_{}".format(*(summary[k][:19].replace(":", "") for k in ("since", "until")))
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", str(summary.get("flow_id", "all")))
    path = directory / f"flows-{name}-{stamp}.html"
    path.write_text(render_html(summary, runs), encoding="utf-8")
    return path


def render_html(summary: dict[str, Any], runs: Sequence[RunFacts]) -> str:
    """The report as a self-contained HTML page."""
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{f['runs']}</td><td>{_pct(f['success_rate'])}</td>"
        f"<td>{_sec(f['duration_p50_s'])}</td><td>{_sec(f['duration_p95_s'])}</td>"
        f"<td>{_num(f['throughput_per_hour'])}</td></tr>"
        for t, f in summary["by_flow_type"].items()
    )
    causes = "".join(
        f"<tr><td>{n}</td><td><code>{html.escape(c)}</code></td></tr>"
        for c, n in summary["failures_by_cause"].items()
    )
    title = f"Flow runs {summary['since'][:19]} to {summary['until'][:19]} UTC"
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Selection: <code>{html.escape(str(summary.get("flow_id", "all")))}</code>.
{summary["runs"]} runs; success rate {_pct(summary["success_rate"])};
duration p50 {_sec(summary["duration_p50_s"])}, p95 {_sec(summary["duration_p95_s"])};
throughput {_num(summary["throughput_per_hour"])} completed runs/hour.</p>
<img alt="durations and runs per hour" src="data:image/png;base64,{_plot(runs, summary)}">
<h2>By flow type</h2>
<table><tr><th>flow type</th><th>runs</th><th>success</th><th>p50</th><th>p95</th>
<th>runs/hour</th></tr>{rows}</table>
<h2>Failures by cause</h2>
<table><tr><th>runs</th><th>cause</th></tr>{causes or "<tr><td>0</td><td>none</td></tr>"}
</table></body></html>
"""


def _plot(runs: Sequence[RunFacts], summary: dict[str, Any]) -> str:
    """Base64 PNG: completed-run durations per flow type, and runs per hour by state."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 4), dpi=90)
    left, right = figure.subplots(1, 2)
    by_type: dict[str, list[float]] = {}
    for run in runs:
        if run.status == FlowState.COMPLETED.value and run.duration_s is not None:
            by_type.setdefault(run.flow_type, []).append(run.duration_s)
    for flow_type, durations in sorted(by_type.items()):
        left.hist(durations, bins=min(max(len(durations), 1), 30), histtype="step", label=flow_type)
    if by_type:
        left.legend(loc="upper right", fontsize="small")
    left.set_xlabel("duration of completed runs (s)")
    left.set_ylabel("runs")
    since = datetime.fromisoformat(summary["since"])
    hours = max(int(np.ceil(summary["hours"])), 1)
    edges = np.arange(hours + 1)
    bottom = np.zeros(hours)
    for state in (FlowState.COMPLETED, FlowState.FAILED, FlowState.CANCELLED):
        offsets = [
            (run.created_at - since).total_seconds() / 3600
            for run in runs
            if run.status == state.value
        ]
        counts, _ = np.histogram(offsets, bins=edges)
        right.bar(edges[:-1], counts, width=1.0, bottom=bottom, align="edge", label=state.value)
        bottom += counts
    right.set_xlabel(f"hours since {summary['since'][:16]}")
    right.set_ylabel("runs")
    right.legend(loc="upper right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _sec(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} s"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"
