"""JSON shapes of the REST API's answers (they make its OpenAPI schema)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from pipeline.types import FlowState, FlowStatus, FlowType

__all__ = [
    "ErrorBody",
    "FlowList",
    "FlowMetrics",
    "FlowStatusModel",
    "HealthBody",
    "LogLine",
    "LogPage",
    "ValidationErrorBody",
]


class FlowStatusModel(BaseModel):
    """A flow run's status (``pipeline.types.FlowStatus``)."""

    flow_id: str = Field(description="Id of the flow run (a UUID).")
    flow_type: FlowType
    status: FlowState
    start_time: datetime | None = None
    end_time: datetime | None = None
    progress: float = Field(ge=0.0, le=1.0, description="Fraction of the run's steps done.")
    current_step: str | None = None
    error_message: str | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def of(cls, status: FlowStatus) -> FlowStatusModel:
        """The model of a ``FlowStatus``."""
        return cls.model_validate(status.to_dict())


class FlowList(BaseModel):
    """One page of recorded flow runs, newest first."""

    items: list[FlowStatusModel]
    total: int = Field(description="Runs matching the filters, on every page.")
    limit: int
    offset: int
    next_offset: int | None = Field(description="Offset of the next page; null on the last.")


class LogLine(BaseModel):
    """One log line of a run or of one of its subflow runs."""

    timestamp: str
    level: str
    logger: str
    message: str
    flow_run_id: str | None
    task_run_id: str | None


class LogPage(BaseModel):
    """One page of a run's log, oldest first."""

    flow_id: str
    items: list[LogLine]
    limit: int
    offset: int
    next_offset: int | None


class FlowMetrics(BaseModel):
    """Measured figures of one run."""

    flow_id: str
    flow_type: FlowType
    status: FlowState
    duration_s: float | None = Field(description="Start to end (to now while running).")
    queue_wait_s: float | None = Field(description="From when it was due to when it started.")
    run_count: int = Field(description="Times Prefect ran it (retries included).")
    retries: int = Field(description="Prefect's reruns of the run (run_count - 1).")
    steps: dict[str, dict[str, Any]] = Field(description="Per step: status, duration, attempts.")
    resources: dict[str, Any] = Field(description="CPU time and peak memory, when recorded.")
    recorded: dict[str, Any] = Field(description="Everything the flow recorded (science/model).")


class HealthBody(BaseModel):
    """Whether the API and the services it needs answer."""

    status: str = Field(description="'ok' or 'degraded'.")
    version: str
    checks: dict[str, dict[str, Any]]


class ErrorBody(BaseModel):
    """An error: what went wrong and what to do."""

    detail: str


class ValidationErrorItem(BaseModel):
    """One bad field of a request."""

    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(BaseModel):
    """The request's fields that are wrong (HTTP 422)."""

    detail: list[ValidationErrorItem]
