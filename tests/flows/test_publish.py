"""Artifacts published off the critical path: in order, in windows, all there at the end."""

from __future__ import annotations

import contextvars
import logging
import threading

import pytest

from pipeline.flows import publish as pub

WHO: contextvars.ContextVar[str] = contextvars.ContextVar("who", default="nobody")


def test_calls_wait_for_a_quiet_window_run_in_order_with_the_callers_context():
    seen: list[tuple[int, str]] = []
    ran = threading.Event()
    token = WHO.set("flow-a")
    try:
        for n in range(5):
            pub.publish(lambda n=n: seen.append((n, WHO.get())))
        pub.publish(ran.set)
    finally:
        WHO.reset(token)
    # the flow is creating runs (no window open): nothing goes to the server yet
    assert not ran.wait(0.3) and seen == []
    with pub.quiet_window():  # a notebook computes
        assert ran.wait(5)
    assert seen == [(n, "flow-a") for n in range(5)]


def test_flush_sends_everything_even_outside_a_window(caplog: pytest.LogCaptureFixture):
    seen: list[int] = []

    def broken() -> None:
        raise RuntimeError("server said no")

    with caplog.at_level(logging.WARNING, logger="pipeline.flows.publish"):
        pub.publish(broken)  # logged, never raised, and the queue goes on
        pub.publish(lambda: seen.append(1))
        assert pub.flush(timeout=5)
    assert seen == [1]
    assert "server said no" in caplog.text


def test_only_the_outermost_flow_body_flushes():
    seen: list[str] = []
    with pub.publishing():
        with pub.publishing():  # a step flow inside the pipeline
            pub.publish(lambda: seen.append("inner"))
        assert seen == []  # the inner body did not wait for it
        pub.publish(lambda: seen.append("outer"))
    assert seen == ["inner", "outer"]
