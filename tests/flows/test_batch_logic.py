"""The batch's pure parts: waiting with a no-progress timeout, the overlap proof, the setting."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.config import TaskRunnerSpec, load_config, task_runner_spec
from pipeline.errors import ConfigError
from pipeline.flows.batch import watch
from pipeline.workflow.concurrency import max_overlap, times_from_states

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _t(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_watch_returns_when_every_pair_is_final():
    states = iter([{"a": "SCHEDULED", "b": "RUNNING"}, {"a": "RUNNING", "b": "COMPLETED"}])
    last = {"a": "FAILED", "b": "COMPLETED"}
    seen, stalled = watch(lambda: next(states, last), timeout=5, interval=0.01)
    assert seen == last and not stalled


def test_watch_gives_up_after_timeout_without_change_but_not_while_things_move():
    began = time.monotonic()
    seen, stalled = watch(lambda: {"a": "SCHEDULED"}, timeout=0.3, interval=0.05)
    assert stalled and seen == {"a": "SCHEDULED"}
    assert 0.3 <= time.monotonic() - began < 2.0

    counter = itertools.count()  # a state that changes on every poll never stalls
    changing = iter([{"a": f"RUNNING-{next(counter)}"} for _ in range(20)] + [{"a": "COMPLETED"}])
    seen, stalled = watch(lambda: next(changing), timeout=0.05, interval=0.01)
    assert seen == {"a": "COMPLETED"} and not stalled


def test_max_overlap_counts_touching_intervals_once():
    assert max_overlap([]) == 0
    assert max_overlap([(_t(0), _t(10)), (_t(10), _t(20))]) == 1  # one ends as one starts
    assert max_overlap([(_t(0), _t(10)), (_t(5), _t(20)), (_t(6), _t(7))]) == 3
    assert max_overlap([(_t(0), None), (_t(100), _t(101))]) == 2  # open: still running
    assert max_overlap([(None, _t(5)), (_t(0), _t(1))]) == 1  # never started: skipped


@dataclass
class _State:
    type: str
    timestamp: datetime


def test_times_from_states_takes_the_slot_from_the_last_pending():
    history = [
        _State("SCHEDULED", _t(0)),
        _State("SCHEDULED", _t(5)),  # AwaitingConcurrencySlot
        _State("PENDING", _t(9)),
        _State("RUNNING", _t(10)),
        _State("COMPLETED", _t(40)),
    ]
    times = times_from_states("run", "COMPLETED", reversed(history))
    assert (times.scheduled, times.pending, times.running, times.ended) == (
        _t(0),
        _t(9),
        _t(10),
        _t(40),
    )
    assert times.queue_wait == 10.0


@pytest.mark.parametrize(
    ("value", "spec"),
    [
        ("threads", TaskRunnerSpec("threads")),
        ("dask", TaskRunnerSpec("dask")),
        ("dask:3", TaskRunnerSpec("dask", workers=3)),
        ("dask:tcp://scheduler:8786", TaskRunnerSpec("dask", address="tcp://scheduler:8786")),
    ],
)
def test_task_runner_values(value: str, spec: TaskRunnerSpec):
    assert task_runner_spec(value) == spec
    assert load_config(environ={"ASTR_TASK_RUNNER": value}).task_runner == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("processes", "is not a task runner; use one of"),
        ("dask:0", "is not a task runner"),
        ("dask:tcp://scheduler", "names no port"),
        ("dask:http://scheduler:8786", "is not a task runner"),
    ],
)
def test_task_runner_refused_naming_the_variable(value: str, message: str):
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(environ={"ASTR_TASK_RUNNER": value})
    assert "ASTR_TASK_RUNNER" in str(caught.value)
