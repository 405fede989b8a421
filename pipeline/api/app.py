"""The REST API: start, watch, cancel and retry the pipeline's flows over HTTP.

``create_app()`` builds the FastAPI application; ``astr api`` serves it with uvicorn.
Every route but ``/health`` needs a bearer token when ``authentication_enabled``.
"""

from __future__ import annotations

import enum
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BeforeValidator
from starlette.concurrency import run_in_threadpool

from pipeline import __version__
from pipeline.api.auth import token_checker
from pipeline.api.schemas import (
    ErrorBody,
    FlowList,
    FlowMetrics,
    FlowStatusModel,
    HealthBody,
    LogPage,
    ValidationErrorBody,
)
from pipeline.api.service import LOG_LEVELS, PREFECT_PAGE, FlowService, RunFilter
from pipeline.api.telemetry import Telemetry
from pipeline.config import WorkflowConfig, get_config
from pipeline.errors import (
    CatalogueError,
    ConflictError,
    NotFoundError,
    ParameterError,
    ServerError,
)
from pipeline.store import Catalogue
from pipeline.types import FlowState, FlowType
from pipeline.workflow.deployments import served_flows

__all__ = ["create_app"]

#: Most rows one page of a list or of a log may hold.
MAX_PAGE = 1000
#: Largest offset accepted (beyond any real history; keeps databases' integers in range).
MAX_OFFSET = 10**9


#: The flows a run can be started of (those ``astr worker`` serves).
StartableFlow = enum.StrEnum("StartableFlow", {name: name for name in sorted(served_flows())})
#: Log levels the logs route filters on.
LogLevel = enum.StrEnum("LogLevel", {name: name for name in LOG_LEVELS})


def _service(request: Request) -> FlowService:
    return request.app.state.service


Service = Annotated[FlowService, Depends(_service)]
FlowId = Annotated[str, Path(description="Id of the flow run (a UUID).")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "No bearer token."},
    403: {"model": ErrorBody, "description": "Wrong bearer token."},
    422: {"model": ValidationErrorBody, "description": "A field of the request is wrong."},
    503: {"model": ErrorBody, "description": "Prefect or the catalogue cannot be reached."},
}
_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No such flow run."}
}
_CONFLICT: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "Not possible in the run's present state."}
}


def create_app(config: WorkflowConfig | None = None) -> FastAPI:
    """Build the API application for ``config`` (default: the process's settings).

    Raises
    ------
    ConfigError
        If authentication is enabled but no token is configured.
    """
    config = config or get_config()
    require_token = token_checker(config)
    telemetry = Telemetry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        from prefect.client.orchestration import get_client

        from pipeline.workflow.prefect_server import use_server

        use_server(config.prefect_server_url, config.prefect_api_auth_string)
        catalogue = await run_in_threadpool(Catalogue.from_config, config)
        telemetry.watch(catalogue)
        try:
            async with get_client() as client:
                app.state.service = FlowService(client, catalogue)
                yield
        finally:
            catalogue.close()

    app = FastAPI(
        title="astr-pipeline",
        version=__version__,
        summary="Start, watch, cancel and retry the transient pipeline's flows.",
        lifespan=lifespan,
        dependencies=[Depends(_known_query_only)],
    )
    secured = [Depends(require_token)]

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Response:
        began = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        telemetry.observe(
            request.method,
            getattr(route, "path", "unmatched"),
            response.status_code,
            time.perf_counter() - began,
        )
        return response

    @app.get("/health", response_model=HealthBody, responses={503: {"model": HealthBody}})
    async def health(request: Request) -> JSONResponse:
        """Whether the API, the Prefect server and the catalogue answer (no token needed)."""
        checks = await _health_checks(request.app.state.service, config)
        ok = all(check["ok"] for check in checks.values())
        body = HealthBody(status="ok" if ok else "degraded", version=__version__, checks=checks)
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=secured, responses=_ERRORS, response_class=Response)
    async def metrics() -> Response:
        """Prometheus text: API requests and latencies, flow runs by type and state."""
        body = await run_in_threadpool(telemetry.render)
        return Response(body, media_type=telemetry.content_type)

    @app.get("/workflows/flows", dependencies=secured, response_model=FlowList, responses=_ERRORS)
    async def list_flows(
        svc: Service,
        flow_type: Annotated[FlowType | None, Query(description="Only runs of this type.")] = None,
        status: Annotated[FlowState | None, Query(description="Only runs in this state.")] = None,
        since: Annotated[
            datetime | None,
            BeforeValidator(_rfc3339),
            Query(description="Created at or after (RFC 3339, e.g. 2026-11-29T00:00:00Z)."),
        ] = None,
        until: Annotated[
            datetime | None,
            BeforeValidator(_rfc3339),
            Query(description="Created before (RFC 3339)."),
        ] = None,
        include_subflows: Annotated[
            bool, Query(description="Also list the step runs of pipelines.")
        ] = False,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    ) -> FlowList:
        """Recorded flow runs, newest first, filtered by type, state and creation time."""
        query = RunFilter(
            flow_type=flow_type,
            status=status,
            since=_utc(since),
            until=_utc(until),
            include_subflows=include_subflows,
            limit=limit,
            offset=offset,
        )
        items, total = await svc.list(query)
        more = offset + len(items) < total
        return FlowList(
            items=[FlowStatusModel.of(item) for item in items],
            total=total,
            limit=limit,
            offset=offset,
            next_offset=offset + len(items) if more and items else None,
        )

    @app.post(
        "/workflows/flows/{flow_type}/start",
        dependencies=secured,
        status_code=202,
        response_model=FlowStatusModel,
        responses={**_ERRORS, 400: {"model": ErrorBody, "description": "The body is not JSON."}},
    )
    async def start_flow(
        svc: Service,
        flow_type: Annotated[StartableFlow, Path(description="The flow to start.")],
        parameters: Annotated[
            dict[str, Any] | None,
            Body(
                description="The flow's parameters, e.g. "
                '{"observation_data": {"science_path": ..., "reference_path": ...}}.'
            ),
        ] = None,
    ) -> FlowStatusModel:
        """Start a run from the flow's deployment; an ``astr worker`` runs it."""
        status = await svc.start(FlowType(flow_type.value), parameters or {})
        return FlowStatusModel.of(status)

    @app.get(
        "/workflows/flows/{flow_id}/status",
        dependencies=secured,
        response_model=FlowStatusModel,
        responses={**_ERRORS, **_NOT_FOUND},
    )
    async def flow_status(svc: Service, flow_id: FlowId) -> FlowStatusModel:
        """State, progress and current step of one run."""
        return FlowStatusModel.of(await svc.status(flow_id))

    @app.post(
        "/workflows/flows/{flow_id}/cancel",
        dependencies=secured,
        status_code=202,
        response_model=FlowStatusModel,
        responses={**_ERRORS, **_NOT_FOUND, **_CONFLICT},
    )
    async def cancel_flow(svc: Service, flow_id: FlowId) -> FlowStatusModel:
        """Cancel a run; a running one's worker stops it and its notebook kernel."""
        return FlowStatusModel.of(await svc.cancel(flow_id))

    @app.get(
        "/workflows/flows/{flow_id}/logs",
        dependencies=secured,
        response_model=LogPage,
        responses={**_ERRORS, **_NOT_FOUND},
    )
    async def flow_logs(
        svc: Service,
        flow_id: FlowId,
        limit: Annotated[int, Query(ge=1, le=PREFECT_PAGE)] = 200,
        offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
        level: Annotated[LogLevel, Query(description="Lowest level shown.")] = LogLevel.DEBUG,
    ) -> LogPage:
        """Log lines of the run and its steps, notebook cell output included, oldest first."""
        page = await svc.logs(flow_id, limit=limit, offset=offset, level=str(level))
        return LogPage.model_validate(page)

    @app.get(
        "/workflows/flows/{flow_id}/metrics",
        dependencies=secured,
        response_model=FlowMetrics,
        responses={**_ERRORS, **_NOT_FOUND},
    )
    async def flow_metrics(svc: Service, flow_id: FlowId) -> FlowMetrics:
        """Duration, queue wait, per-step durations, retries, resources, recorded figures."""
        return FlowMetrics.model_validate(await svc.metrics(flow_id))

    @app.post(
        "/workflows/flows/{flow_id}/retry",
        dependencies=secured,
        status_code=202,
        response_model=FlowStatusModel,
        responses={**_ERRORS, **_NOT_FOUND, **_CONFLICT},
    )
    async def retry_flow(svc: Service, flow_id: FlowId) -> FlowStatusModel:
        """Run a FAILED or CANCELLED run again with its parameters."""
        return FlowStatusModel.of(await svc.retry(flow_id))

    _install_error_handlers(app, config)
    return app


def _known_query_only(request: Request) -> None:
    """Refuse query parameters the route does not take (a typo would otherwise be ignored)."""
    from fastapi.exceptions import RequestValidationError

    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    allowed = _query_names(dependant)
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": f"unknown query parameter; this route takes: {takes}",
                    "type": "extra_forbidden",
                }
                for name in unknown
            ]
        )


def _query_names(dependant: Any) -> set[str]:
    """Names of the query parameters a route (and its dependencies) declares."""
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def _install_error_handlers(app: FastAPI, config: WorkflowConfig) -> None:
    import httpx
    from prefect.exceptions import PrefectHTTPStatusError
    from sqlalchemy.exc import SQLAlchemyError

    def error(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(ParameterError)
    async def bad_parameters(request: Request, exc: ParameterError) -> JSONResponse:
        detail = [
            {"loc": ["body", *loc], "msg": message, "type": "value_error"}
            for loc, message in exc.errors
        ]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(NotFoundError)
    async def not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return error(404, str(exc))

    @app.exception_handler(ConflictError)
    async def conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return error(409, str(exc))

    @app.exception_handler(ServerError)
    async def unavailable(request: Request, exc: ServerError) -> JSONResponse:
        return error(503, str(exc))

    @app.exception_handler(CatalogueError)
    @app.exception_handler(SQLAlchemyError)
    async def catalogue_down(request: Request, exc: Exception) -> JSONResponse:
        return error(503, f"the catalogue cannot be read ({type(exc).__name__}: {exc})")

    @app.exception_handler(httpx.HTTPError)
    @app.exception_handler(PrefectHTTPStatusError)
    async def prefect_down(request: Request, exc: Exception) -> JSONResponse:
        return error(
            503,
            f"the Prefect server at {config.prefect_server_url} did not answer "
            f"({type(exc).__name__}: {exc}); is it running (`astr server status`)?",
        )


async def _health_checks(service: FlowService, config: WorkflowConfig) -> dict[str, Any]:
    checks: dict[str, dict[str, Any]] = {}
    began = time.perf_counter()
    failure = await service.client.api_healthcheck()
    checks["prefect"] = {
        "ok": failure is None,
        "url": config.prefect_server_url,
        "seconds": round(time.perf_counter() - began, 4),
        **({"error": f"{type(failure).__name__}: {failure}"} if failure else {}),
    }
    began = time.perf_counter()
    try:
        await run_in_threadpool(service.catalogue.count_flow_runs)
        checks["catalogue"] = {"ok": True}
    except Exception as exc:  # any database failure is a failed check, not a 500
        checks["catalogue"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    checks["catalogue"]["seconds"] = round(time.perf_counter() - began, 4)
    return checks


_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def _rfc3339(value: Any) -> Any:
    """Refuse times that are not RFC 3339 (numbers, dates alone, no time zone)."""
    if isinstance(value, str) and not _RFC3339.fullmatch(value.strip()):
        raise ValueError(
            f"{value!r} is not an RFC 3339 time; give e.g. 2026-11-29T00:00:00Z or "
            "2026-11-29T01:00:00+01:00"
        )
    return value


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
