"""Records shared across the package: flow types, run states and a run's status."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "FlowState",
    "FlowStatus",
    "FlowType",
    "ObservationStatus",
]


class FlowType(StrEnum):
    """Kinds of flow the pipeline runs; values are the lower-case member names."""

    OBSERVATION_INGESTION = "observation_ingestion"
    OBSERVATION_PREPROCESSING = "observation_preprocessing"
    OBSERVATION_DIFFERENCING = "observation_differencing"
    OBSERVATION_DETECTION = "observation_detection"
    OBSERVATION_VALIDATION = "observation_validation"
    OBSERVATION_PIPELINE = "observation_pipeline"
    OBSERVATION_BATCH = "observation_batch"
    CANDIDATE_DATASET = "candidate_dataset"
    MODEL_TRAINING = "model_training"
    HYPERPARAMETER_OPTIMIZATION = "hyperparameter_optimization"
    MODEL_EVALUATION = "model_evaluation"
    MODEL_DEPLOYMENT = "model_deployment"
    MODEL_ROLLBACK = "model_rollback"
    MODEL_RETRAINING = "model_retraining"
    SCORE_DRIFT = "score_drift"
    SYSTEM_MAINTENANCE = "system_maintenance"


class FlowState(StrEnum):
    """Life-cycle state of one flow run."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        """Whether the run can no longer change state on its own."""
        return self in (FlowState.COMPLETED, FlowState.FAILED, FlowState.CANCELLED)


class ObservationStatus(StrEnum):
    """How far an observation has come through the pipeline (last successful step)."""

    REGISTERED = "registered"
    INGESTED = "ingested"
    PREPROCESSED = "preprocessed"
    DIFFERENCED = "differenced"
    DETECTED = "detected"
    VALIDATED = "validated"
    FAILED = "failed"


@dataclass
class FlowStatus:
    """Status of one flow run as the API and the monitoring report it.

    Parameters
    ----------
    flow_id : str
        Id of the flow run (a UUID string).
    flow_type : FlowType
    status : FlowState
    start_time, end_time : datetime or None
        Timezone-aware (naive values are taken as UTC).
    progress : float
        Fraction of the run's steps completed, from 0.0 to 1.0.
    current_step : str or None
        Name of the step running now (or the last one, once final).
    error_message : str or None
        Why the run failed, for FAILED runs.
    metrics : dict
        JSON-serialisable measurements (durations, counts, scores).
    """

    flow_id: str
    flow_type: FlowType
    status: FlowState
    start_time: datetime | None = None
    end_time: datetime | None = None
    progress: float = 0.0
    current_step: str | None = None
    error_message: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.flow_id = str(self.flow_id)
        self.flow_type = FlowType(self.flow_type)
        self.status = FlowState(self.status)
        self.start_time = _utc(self.start_time)
        self.end_time = _utc(self.end_time)
        progress = float(self.progress)
        if not (math.isfinite(progress) and 0.0 <= progress <= 1.0):
            raise ValueError(f"FlowStatus.progress must be within 0.0-1.0, got {self.progress!r}")
        self.progress = progress

    def to_dict(self) -> dict[str, Any]:
        """Return the status as JSON-ready plain data (ISO 8601 times)."""
        return {
            "flow_id": self.flow_id,
            "flow_type": self.flow_type.value,
            "status": self.status.value,
            "start_time": self.start_time.isoformat() if self.start_time else None,
            "end_time": self.end_time.isoformat() if self.end_time else None,
            "progress": self.progress,
            "current_step": self.current_step,
            "error_message": self.error_message,
            "metrics": self.metrics,
        }

    def to_json(self) -> str:
        """Serialise to a JSON string."""
        return json.dumps(self.to_dict(), allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FlowStatus:
        """Build a status from :meth:`to_dict` output."""
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"FlowStatus got unknown fields: {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in ("start_time", "end_time"):
            if isinstance(values.get(key), str):
                values[key] = datetime.fromisoformat(values[key])
        return cls(**values)

    @classmethod
    def from_json(cls, text: str) -> FlowStatus:
        """Parse a status from :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
