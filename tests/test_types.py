"""Shared records: flow types and FlowStatus JSON round-trip."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.types import FlowState, FlowStatus, FlowType

REQUIRED_FLOW_TYPES = [
    "OBSERVATION_INGESTION",
    "OBSERVATION_PREPROCESSING",
    "OBSERVATION_DIFFERENCING",
    "OBSERVATION_DETECTION",
    "MODEL_TRAINING",
    "MODEL_EVALUATION",
    "MODEL_DEPLOYMENT",
    "SYSTEM_MAINTENANCE",
]


@pytest.mark.parametrize("name", REQUIRED_FLOW_TYPES)
def test_flow_type_values_are_lower_case_names(name: str) -> None:
    assert FlowType[name].value == name.lower()


def test_every_flow_type_value_is_its_lower_case_name() -> None:
    assert all(member.value == member.name.lower() for member in FlowType)


def test_flow_states() -> None:
    assert [s.value for s in FlowState] == [
        "PENDING",
        "RUNNING",
        "COMPLETED",
        "FAILED",
        "CANCELLED",
    ]
    assert {s for s in FlowState if s.is_final} == {
        FlowState.COMPLETED,
        FlowState.FAILED,
        FlowState.CANCELLED,
    }


def test_round_trip_of_a_full_status() -> None:
    status = FlowStatus(
        flow_id=str(uuid.uuid4()),
        flow_type=FlowType.OBSERVATION_DIFFERENCING,
        status=FlowState.FAILED,
        start_time=datetime(2026, 11, 28, 3, 4, 5, 123456, tzinfo=UTC),
        end_time=datetime(2026, 11, 28, 5, 0, tzinfo=timezone(timedelta(hours=2))),
        progress=0.4,
        current_step="differencing",
        error_message="reference.fits has no celestial WCS",
        metrics={"duration_s": 12.5, "candidates": 3, "steps": {"ingestion": 1.25}},
    )
    text = status.to_json()
    data = json.loads(text)
    assert data["status"] == "FAILED" and data["flow_type"] == "observation_differencing"
    assert data["end_time"] == "2026-11-28T03:00:00+00:00"  # normalised to UTC
    again = FlowStatus.from_json(text)
    assert again == status
    assert again.end_time == datetime(2026, 11, 28, 3, 0, tzinfo=UTC)


def test_strings_are_coerced_and_naive_times_taken_as_utc() -> None:
    status = FlowStatus("abc", "model_training", "RUNNING", start_time=datetime(2026, 1, 1))
    assert status.flow_type is FlowType.MODEL_TRAINING and status.status is FlowState.RUNNING
    assert status.start_time == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("progress", [-0.1, 1.01, float("nan"), float("inf")])
def test_progress_out_of_range_is_rejected(progress: float) -> None:
    with pytest.raises(ValueError, match="progress must be within"):
        FlowStatus("x", FlowType.MODEL_TRAINING, FlowState.RUNNING, progress=progress)


def test_unknown_values_are_rejected() -> None:
    with pytest.raises(ValueError):
        FlowStatus("x", "not_a_flow", FlowState.RUNNING)
    with pytest.raises(ValueError):
        FlowStatus("x", FlowType.MODEL_TRAINING, "DONE")
    with pytest.raises(ValueError, match="unknown fields: colour"):
        FlowStatus.from_dict(
            {"flow_id": "x", "flow_type": "model_training", "status": "RUNNING", "colour": "red"}
        )


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
aware_times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)
)


@given(
    flow_type=st.sampled_from(FlowType),
    state=st.sampled_from(FlowState),
    start=st.none() | aware_times,
    end=st.none() | aware_times,
    progress=st.floats(0.0, 1.0),
    step=st.none() | st.text(max_size=30),
    error=st.none() | st.text(max_size=60),
    metrics=st.dictionaries(st.text(max_size=12), json_values, max_size=5),
)
def test_json_round_trip_property(flow_type, state, start, end, progress, step, error, metrics):
    status = FlowStatus(
        str(uuid.uuid4()), flow_type, state, start, end, progress, step, error, metrics
    )
    assert FlowStatus.from_json(status.to_json()) == status
