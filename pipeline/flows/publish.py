"""Prefect artifacts published off the flow's critical path.

Progress bars, report links and candidate tables are for people watching the UI.
Each is an HTTP call to the Prefect server, and on a small machine the server shares
the cores with the notebooks: made inline, they added a few tenths of a second to
every step. They are queued instead and sent, in order, by one background thread,
with the caller's context (so Prefect still knows which flow or task run they belong
to), while a notebook computes: never while the flow creates runs or changes states.
The outermost flow waits for the queue before it returns, so everything a run
published is there when the caller looks.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["flush", "publish", "publishing", "quiet_window"]

log = logging.getLogger(__name__)

#: Longest wait (seconds) for queued artifacts when a flow ends.
FLUSH_TIMEOUT = 30.0

_QUEUE: queue.SimpleQueue[tuple[contextvars.Context, Callable[[], Any]] | threading.Event] = (
    queue.SimpleQueue()
)
_THREAD: threading.Thread | None = None
_THREAD_LOCK = threading.Lock()
_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("astr_publish_depth", default=0)
#: Set while some flow in this process is inside a ``quiet_window`` (or a flush waits).
_OPEN = threading.Event()
_WINDOW_LOCK = threading.Lock()
_WINDOWS = 0
_FLUSHING = 0


@contextlib.contextmanager
def quiet_window() -> Iterator[None]:
    """Mark a stretch where the flow itself makes no Prefect API calls (a notebook runs).

    Queued calls are sent only inside such windows (or when flushed): the Prefect
    server's SQLite store refuses a write that races another connection's commit,
    and the client then backs off for two seconds. Run creation at a step boundary
    must not race our own artifact updates.
    """
    with _WINDOW_LOCK:
        global _WINDOWS
        _WINDOWS += 1
        _OPEN.set()
    try:
        yield
    finally:
        with _WINDOW_LOCK:
            _WINDOWS -= 1
            if _WINDOWS == 0:
                _OPEN.clear()


def publish(call: Callable[[], Any]) -> None:
    """Run ``call`` soon on the publishing thread, in a copy of the caller's context.

    Calls run one at a time in the order given; an exception is logged, never raised
    (what is published is for display, and must not fail a run).
    """
    _ensure_thread()
    _QUEUE.put((contextvars.copy_context(), call))


def flush(timeout: float = FLUSH_TIMEOUT) -> bool:
    """Wait until everything published so far has been sent; False on timeout."""
    global _FLUSHING
    if _THREAD is None:
        return True
    done = threading.Event()
    _QUEUE.put(done)
    with _WINDOW_LOCK:
        _FLUSHING += 1
        _OPEN.set()
    try:
        return done.wait(timeout)
    finally:
        with _WINDOW_LOCK:
            _FLUSHING -= 1
            if _WINDOWS == 0 and _FLUSHING == 0:
                _OPEN.clear()


@contextlib.contextmanager
def publishing() -> Iterator[None]:
    """Mark a flow body; the outermost one flushes the queue when it ends."""
    token = _DEPTH.set(_DEPTH.get() + 1)
    try:
        yield
    finally:
        outermost = _DEPTH.get() == 1
        _DEPTH.reset(token)
        if outermost and not flush():
            log.warning("some Prefect artifacts were not sent within %.0f s", FLUSH_TIMEOUT)


def _ensure_thread() -> None:
    global _THREAD
    with _THREAD_LOCK:
        if _THREAD is None or not _THREAD.is_alive():
            _THREAD = threading.Thread(target=_serve, name="astr-publish", daemon=True)
            _THREAD.start()


def _serve() -> None:
    while True:
        item = _QUEUE.get()
        if isinstance(item, threading.Event):
            item.set()
            continue
        context, call = item
        _OPEN.wait()
        try:
            context.run(call)
        except Exception as exc:  # display only
            log.warning("could not publish to Prefect: %s", exc)
