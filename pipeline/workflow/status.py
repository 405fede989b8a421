"""Map a Prefect flow run to the pipeline's ``FlowStatus``.

Prefect knows the state and times; the catalogue's flow-run record, which the flows
update as each notebook cell starts and ends, knows the true ``progress`` and the
``current_step``.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pipeline.errors import NotFoundError
from pipeline.store import Catalogue
from pipeline.store.models import FlowRun as FlowRunRecord
from pipeline.types import FlowState, FlowStatus, FlowType

__all__ = [
    "STATE_MAP",
    "flow_status",
    "flow_type_of",
    "get_flow_status",
    "map_state",
    "record_corrections",
]

#: Prefect state type -> pipeline state.
STATE_MAP: dict[str, FlowState] = {
    "SCHEDULED": FlowState.PENDING,
    "PENDING": FlowState.PENDING,
    "PAUSED": FlowState.PENDING,
    "RUNNING": FlowState.RUNNING,
    "CANCELLING": FlowState.RUNNING,
    "COMPLETED": FlowState.COMPLETED,
    "FAILED": FlowState.FAILED,
    "CRASHED": FlowState.FAILED,
    "CANCELLED": FlowState.CANCELLED,
}


def map_state(state_type: Any) -> FlowState:
    """Pipeline state of a Prefect state type (enum or its name)."""
    name = getattr(state_type, "value", state_type)
    try:
        return STATE_MAP[str(name).upper()]
    except KeyError:
        raise ValueError(f"unknown Prefect state type {state_type!r}") from None


def flow_type_of(flow_name: str) -> FlowType:
    """The pipeline flow type of a Prefect flow name (``observation_pipeline`` ...)."""
    try:
        return FlowType(flow_name.replace("-", "_"))
    except ValueError:
        raise ValueError(f"flow {flow_name!r} is not one of the pipeline's flows") from None


def flow_status(flow_run: Any, flow_name: str, record: FlowRunRecord | None = None) -> FlowStatus:
    """Build the ``FlowStatus`` of a Prefect flow run.

    Parameters
    ----------
    flow_run : prefect.client.schemas.objects.FlowRun
        As read from the Prefect API.
    flow_name : str
        Name of its flow.
    record : FlowRun record, optional
        The catalogue's record of the same run (progress, current step, metrics).
    """
    state = flow_run.state
    status = map_state(state.type) if state is not None else FlowState.PENDING
    if status is FlowState.COMPLETED:
        progress = 1.0
    elif record is not None:
        progress = float(record.progress or 0.0)
    else:
        progress = 0.0
    current = record.current_step if record is not None and not status.is_final else None
    error = None
    if status in (FlowState.FAILED, FlowState.CANCELLED):
        error = (record.error_message if record is not None else None) or (
            state.message if state is not None else None
        )
    metrics: dict[str, Any] = dict(record.metrics) if record is not None else {}
    if record is not None and record.attempts:
        metrics.setdefault("attempts", record.attempts)
    return FlowStatus(
        flow_id=str(flow_run.id),
        flow_type=flow_type_of(flow_name),
        status=status,
        start_time=flow_run.start_time,
        end_time=flow_run.end_time if status.is_final else None,
        progress=min(max(progress, 0.0), 1.0),
        current_step=current,
        error_message=error,
        metrics=metrics,
    )


def get_flow_status(flow_run_id: uuid.UUID | str, catalogue: Catalogue) -> FlowStatus:
    """Read a flow run from Prefect (and its catalogue record) and map it.

    A catalogue record lagging behind Prefect (a run a worker took up, or killed) is
    brought in line (:func:`record_corrections`).

    Raises
    ------
    NotFoundError
        If Prefect has no such flow run.
    """
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            run = client.read_flow_run(uuid.UUID(str(flow_run_id)))
        except (ObjectNotFound, ValueError):
            raise NotFoundError(f"no flow run {flow_run_id}") from None
        flow = client.read_flow(run.flow_id)
    try:
        record = catalogue.get_flow_run(run.id)
    except NotFoundError:
        record = None
    status = flow_status(run, flow.name, record)
    changes = record_corrections(run, status, record)
    if changes:
        catalogue.update_flow_run(run.id, **changes)
    return status


def record_corrections(
    flow_run: Any, status: FlowStatus, record: FlowRunRecord | None
) -> dict[str, Any]:
    """Changes that bring a catalogue record in line with Prefect's view of the run.

    Prefect moves a run on without the flow writing its record when a worker takes
    it up, or kills or crashes it; the record then lags behind.

    Parameters
    ----------
    flow_run : prefect FlowRun
    status : FlowStatus
        The run's status as :func:`flow_status` maps it.
    record : FlowRun record or None

    Returns
    -------
    dict
        Keyword arguments for ``Catalogue.update_flow_run``; empty when nothing lags.
    """
    if record is None or status.status.value == record.status:
        return {}
    changes: dict[str, Any] = {"status": status.status}
    if status.status.is_final:
        changes["ended_at"] = flow_run.end_time or datetime.now(UTC)
        if record.error_message is None and status.error_message:
            changes["error_message"] = status.error_message
    if flow_run.start_time is not None and record.started_at is None:
        changes["started_at"] = flow_run.start_time
    return changes
