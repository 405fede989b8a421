"""Catalogue queries of monitoring: the runs of a time range, counts, recent durations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from pipeline.store.catalogue import Catalogue
from pipeline.store.models import FlowRun

__all__ = ["ended_since", "run_counts", "runs_between"]


def runs_between(
    catalogue: Catalogue, since: datetime, until: datetime, flow_types: list[str] | None
) -> list[FlowRun]:
    """Every flow run record created in [since, until), of ``flow_types`` when given."""
    query = select(FlowRun).where(FlowRun.created_at >= since, FlowRun.created_at < until)
    if flow_types is not None:
        query = query.where(FlowRun.flow_type.in_(flow_types))
    with catalogue.session() as session:
        return list(session.scalars(query.order_by(FlowRun.created_at)))


def run_counts(catalogue: Catalogue) -> dict[tuple[str, str], int]:
    """Number of flow run records per (flow type, status)."""
    query = select(FlowRun.flow_type, FlowRun.status, func.count()).group_by(
        FlowRun.flow_type, FlowRun.status
    )
    with catalogue.session() as session:
        return {(kind, status): int(n) for kind, status, n in session.execute(query)}


def ended_since(
    catalogue: Catalogue, since: datetime
) -> list[tuple[str, datetime | None, datetime, dict[str, Any]]]:
    """(flow type, started_at, ended_at, metrics) of the runs that ended since ``since``."""
    query = select(FlowRun.flow_type, FlowRun.started_at, FlowRun.ended_at, FlowRun.metrics).where(
        FlowRun.ended_at >= since
    )
    with catalogue.session() as session:
        return [tuple(row) for row in session.execute(query)]
