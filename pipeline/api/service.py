"""What the /workflows routes do: start, read, cancel, retry flow runs through Prefect.

Prefect is the source of truth for a run's state; the catalogue's flow-run record adds
what Prefect does not know (progress, current step, metrics, subflow links) and makes
listing fast. A run is started from its flow's deployment, so it runs in an
``astr worker`` process that Prefect can cancel.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from starlette.concurrency import run_in_threadpool

from pipeline.api.parameters import check_parameters
from pipeline.errors import ConflictError, NotFoundError, ServerError
from pipeline.store import Catalogue
from pipeline.store.models import FlowRun as FlowRunRecord
from pipeline.types import FlowState, FlowStatus, FlowType
from pipeline.workflow.deployments import deployment_path, served_flows
from pipeline.workflow.monitoring import run_figures, step_duration, step_name
from pipeline.workflow.status import flow_status, map_state, record_corrections

__all__ = ["FlowService", "RunFilter"]

#: Prefect state types from which a run has not started executing yet.
_NOT_STARTED = ("SCHEDULED", "PAUSED")
#: Prefect state types a run can be retried from.
_RETRYABLE = ("FAILED", "CRASHED", "CANCELLED")
#: Most rows the Prefect API returns per request (its default limit).
PREFECT_PAGE = 200
#: Log levels by name, as the logs route accepts them.
LOG_LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40, "CRITICAL": 50}


@dataclass(frozen=True)
class RunFilter:
    """Which runs ``GET /workflows/flows`` lists."""

    flow_type: FlowType | None = None
    status: FlowState | None = None
    since: datetime | None = None
    until: datetime | None = None
    include_subflows: bool = False
    limit: int = 50
    offset: int = 0


class FlowService:
    """Flow-run operations against one Prefect server and one catalogue.

    Parameters
    ----------
    client : prefect.client.orchestration.PrefectClient
        An open asynchronous client (kept for the life of the API process).
    catalogue : Catalogue
    """

    def __init__(self, client: Any, catalogue: Catalogue) -> None:
        self.client = client
        self.catalogue = catalogue
        self._flow_names: dict[uuid.UUID, str] = {}
        self._deployments: dict[str, uuid.UUID] = {}

    # -- start --------------------------------------------------------------------------

    async def start(self, flow_type: FlowType, body: Any) -> FlowStatus:
        """Create a run of ``flow_type`` from its deployment with ``body`` as parameters.

        Raises
        ------
        ParameterError
            If the parameters do not fit the flow (nothing is created).
        ServerError
            If no deployment of the flow exists (no worker has ever served it).
        """
        flow = served_flows()[flow_type.value]
        parameters = check_parameters(flow, body)
        run = await self._create_run(flow.name, parameters)
        record = await run_in_threadpool(
            self.catalogue.record_flow_run,
            run.id,
            flow_type,
            status=FlowState.PENDING,
            parameters=parameters,
        )
        self._flow_names[run.flow_id] = flow.name
        return flow_status(run, flow.name, record)

    async def _create_run(self, flow_name: str, parameters: dict[str, Any]) -> Any:
        """A run of the flow's deployment; a deployment deleted and made again is found anew."""
        from prefect.exceptions import ObjectNotFound

        deployment_id = await self._deployment_id(flow_name)
        try:
            return await self.client.create_flow_run_from_deployment(
                deployment_id, parameters=parameters, tags=["astr", "api"]
            )
        except ObjectNotFound:
            self._deployments.pop(flow_name, None)
            return await self.client.create_flow_run_from_deployment(
                await self._deployment_id(flow_name), parameters=parameters, tags=["astr", "api"]
            )

    async def _deployment_id(self, flow_name: str) -> uuid.UUID:
        from prefect.exceptions import ObjectNotFound

        cached = self._deployments.get(flow_name)
        if cached is not None:
            return cached
        try:
            deployment = await self.client.read_deployment_by_name(deployment_path(flow_name))
        except ObjectNotFound:
            raise ServerError(
                f"no deployment of {flow_name} on the Prefect server: start a worker "
                "(`astr worker`) against the same server, then try again"
            ) from None
        self._deployments[flow_name] = deployment.id
        return deployment.id

    # -- read ---------------------------------------------------------------------------

    async def status(self, flow_id: str) -> FlowStatus:
        """The run's status; NotFoundError for an id Prefect does not know as ours."""
        run, name = await self._read(flow_id)
        record = await self._record(run.id)
        return await self._status(run, name, record)

    async def list(self, query: RunFilter) -> tuple[list[FlowStatus], int]:
        """The recorded runs matching ``query`` (newest first) and how many match."""
        filters = {
            "flow_type": query.flow_type,
            "status": query.status,
            "since": query.since,
            "until": query.until,
            "top_level": not query.include_subflows,
        }
        records, total = await run_in_threadpool(self._page, filters, query.limit, query.offset)
        live = [r.id for r in records if not FlowState(r.status).is_final]
        runs = {run.id: run for run in await self._read_many(live)}
        items = []
        for record in records:
            run = runs.get(record.id)
            if run is not None:
                items.append(await self._status(run, record.flow_type, record))
            else:
                items.append(_record_status(record))
        return items, total

    def _page(
        self, filters: dict[str, Any], limit: int, offset: int
    ) -> tuple[list[FlowRunRecord], int]:
        records = self.catalogue.list_flow_runs(**filters, limit=limit, offset=offset)
        return records, self.catalogue.count_flow_runs(**filters)

    async def logs(
        self, flow_id: str, *, limit: int, offset: int, level: str = "DEBUG"
    ) -> dict[str, Any]:
        """Log lines of the run and of its subflow runs (notebook cell output included)."""
        from prefect.client.schemas.filters import (
            LogFilter,
            LogFilterFlowRunId,
            LogFilterLevel,
        )
        from prefect.client.schemas.sorting import LogSort

        run, _ = await self._read(flow_id)
        ids = [run.id, *await run_in_threadpool(self._descendants, run.id)]
        rows = await self.client.read_logs(
            LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=ids),
                level=LogFilterLevel(ge_=LOG_LEVELS[level]),
            ),
            limit=limit,
            offset=offset,
            sort=LogSort.TIMESTAMP_ASC,
        )
        items = [
            {
                "timestamp": _iso(row.timestamp),
                "level": _level_name(row.level),
                "logger": row.name,
                "message": row.message,
                "flow_run_id": str(row.flow_run_id) if row.flow_run_id else None,
                "task_run_id": str(row.task_run_id) if row.task_run_id else None,
            }
            for row in rows
        ]
        return {
            "flow_id": str(run.id),
            "items": items,
            "limit": limit,
            "offset": offset,
            "next_offset": offset + len(items) if len(items) == limit else None,
        }

    async def metrics(self, flow_id: str) -> dict[str, Any]:
        """Durations per step, retries, resources and the science or model figures."""
        run, name = await self._read(flow_id)
        record = await self._record(run.id)
        children = await run_in_threadpool(self.catalogue.child_flow_runs, run.id)
        status = await self._status(run, name, record)
        return run_metrics(run, status, record, children)

    def _descendants(self, flow_run_id: uuid.UUID) -> list[uuid.UUID]:
        found: list[uuid.UUID] = []
        frontier = [flow_run_id]
        while frontier and len(found) < 1000:
            children = [c.id for parent in frontier for c in self.catalogue.child_flow_runs(parent)]
            found.extend(children)
            frontier = children
        return found

    # -- change -------------------------------------------------------------------------

    async def cancel(self, flow_id: str) -> FlowStatus:
        """Cancel the run: a running one is stopped by its worker (kernel killed).

        Raises
        ------
        ConflictError
            If the run has already ended.
        """
        from prefect.states import Cancelled, Cancelling

        run, _ = await self._read(flow_id)
        state = _state_type(run)
        if map_state(state).is_final:
            raise ConflictError(
                f"flow run {run.id} is already {map_state(state).value}: nothing to cancel"
            )
        if state != "CANCELLING":
            message = "cancelled through the API"
            proposed = (
                Cancelled(message=message) if state in _NOT_STARTED else Cancelling(message=message)
            )
            await self._set_state(run.id, proposed, "cancel")
        return await self.status(str(run.id))

    async def retry(self, flow_id: str) -> FlowStatus:
        """Run a FAILED or CANCELLED run again with its parameters.

        A run started from a deployment is rescheduled under the same id (the finished
        steps of an observation come back from the cache); any other run is started
        anew from its flow's deployment, and the new run's status is returned.

        Raises
        ------
        ConflictError
            If the run has not failed or been cancelled.
        """
        from prefect.states import Scheduled

        run, name = await self._read(flow_id)
        state = _state_type(run)
        if state not in _RETRYABLE:
            raise ConflictError(
                f"flow run {run.id} is {map_state(state).value}: only FAILED or CANCELLED runs "
                "can be retried"
            )
        if run.deployment_id is None:
            status = await self.start(FlowType(name), dict(run.parameters))
            await run_in_threadpool(
                self.catalogue.update_flow_run, status.flow_id, metrics={"retry_of": str(run.id)}
            )
            return status
        await self._set_state(
            run.id, Scheduled(name="AwaitingRetry", message="retried through the API"), "retry"
        )
        await run_in_threadpool(self._reset_record, run, name)
        return await self.status(str(run.id))

    def _reset_record(self, run: Any, name: str) -> None:
        record = self.catalogue.record_flow_run(
            run.id, FlowType(name), status=FlowState.PENDING, parameters=dict(run.parameters)
        )
        retried = int((record.metrics or {}).get("api_retries", 0)) + 1
        self.catalogue.update_flow_run(
            run.id,
            status=FlowState.PENDING,
            error_message=None,
            ended_at=None,
            progress=0.0,
            current_step=None,
            metrics={"api_retries": retried},
        )

    async def _set_state(self, run_id: uuid.UUID, state: Any, action: str) -> None:
        from prefect.client.schemas.responses import SetStateStatus

        result = await self.client.set_flow_run_state(run_id, state)
        if result.status not in (SetStateStatus.ACCEPT, SetStateStatus.WAIT):
            reason = getattr(result.details, "reason", None) or result.status.value
            raise ConflictError(f"Prefect refused to {action} flow run {run_id}: {reason}")

    # -- helpers ------------------------------------------------------------------------

    async def _read(self, flow_id: str) -> tuple[Any, str]:
        from prefect.exceptions import ObjectNotFound

        try:
            run_id = uuid.UUID(str(flow_id))
        except ValueError:
            raise NotFoundError(f"no flow run {flow_id!r}: flow ids are UUIDs") from None
        try:
            run = await self.client.read_flow_run(run_id)
        except ObjectNotFound:
            raise NotFoundError(f"no flow run {run_id}") from None
        name = await self._flow_name(run.flow_id)
        if name not in served_flows():
            raise NotFoundError(f"flow run {run_id} is a run of {name!r}, not a pipeline flow")
        return run, name

    async def _read_many(self, ids: Sequence[uuid.UUID]) -> list[Any]:
        if not ids:
            return []
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        runs = []
        for start in range(0, len(ids), PREFECT_PAGE):
            chunk = list(ids[start : start + PREFECT_PAGE])
            runs += await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=len(chunk)
            )
        return runs

    async def _flow_name(self, flow_id: uuid.UUID) -> str:
        name = self._flow_names.get(flow_id)
        if name is None:
            name = (await self.client.read_flow(flow_id)).name
            self._flow_names[flow_id] = name
        return name

    async def _record(self, run_id: uuid.UUID) -> FlowRunRecord | None:
        try:
            return await run_in_threadpool(self.catalogue.get_flow_run, run_id)
        except NotFoundError:
            return None

    async def _status(self, run: Any, name: str, record: FlowRunRecord | None) -> FlowStatus:
        status = flow_status(run, name, record)
        changes = record_corrections(run, status, record)
        if changes:
            await run_in_threadpool(self.catalogue.update_flow_run, run.id, **changes)
        return status


def run_metrics(
    run: Any,
    status: FlowStatus,
    record: FlowRunRecord | None,
    children: Sequence[FlowRunRecord],
) -> dict[str, Any]:
    """The metrics route's document for one run.

    The figures are monitoring's (:func:`pipeline.workflow.monitoring.run_figures`),
    computed afresh so a running run's are current; CPU time and peak memory are
    those its own process recorded.

    Parameters
    ----------
    run : prefect FlowRun
        As read from Prefect (times, run count).
    status : FlowStatus
    record : FlowRun record or None
        The catalogue's record (the flow's own figures, resources).
    children : list of FlowRun records
        Its subflow runs (the steps of an observation pipeline).
    """
    recorded = dict(record.metrics) if record is not None else {}
    figures = run_figures(run, record, children)
    performance = recorded.get("performance")
    performance = performance if isinstance(performance, dict) else {}
    return {
        "flow_id": status.flow_id,
        "flow_type": status.flow_type.value,
        "status": status.status.value,
        "duration_s": figures.get("duration_s"),
        "queue_wait_s": figures.get("queue_wait_s"),
        "run_count": figures["run_count"],
        "retries": figures["retries"],
        "steps": {
            step_name(child): {
                "flow_id": str(child.id),
                "status": child.status,
                "duration_s": step_duration(child),
                "attempts": child.attempts,
            }
            for child in children
        },
        "resources": {
            key: performance[key]
            for key in ("cpu_time_s", "peak_rss_mb", "children_rss_mb")
            if performance.get(key) is not None
        },
        "recorded": recorded,
    }


def _record_status(record: FlowRunRecord) -> FlowStatus:
    final = FlowState(record.status).is_final
    return FlowStatus(
        flow_id=str(record.id),
        flow_type=FlowType(record.flow_type),
        status=FlowState(record.status),
        start_time=record.started_at,
        end_time=record.ended_at if final else None,
        progress=1.0 if record.status == FlowState.COMPLETED else float(record.progress or 0.0),
        current_step=None if final else record.current_step,
        error_message=record.error_message,
        metrics=dict(record.metrics or {}),
    )


def _state_type(run: Any) -> str:
    return run.state.type.value if run.state is not None else "SCHEDULED"


def _iso(value: datetime) -> str:
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()


def _level_name(level: int) -> str:
    for name, number in sorted(LOG_LEVELS.items(), key=lambda item: -item[1]):
        if level >= number:
            return name
    return "NOTSET"
