"""Flow-run heartbeats that stop at once when the run ends.

Prefect shows that a flow run's process is alive with ``prefect.flow-run.heartbeat``
events (an automation can then mark a run whose heartbeats stop as crashed). Its
heartbeat thread sleeps in whole seconds and is joined when the run ends, so every
flow run pays up to a second of idle waiting at its end: a large share of a pipeline
whose steps take a few seconds. A caller that starts flows in its own process runs
them inside ``prompt_heartbeats()``: Prefect's thread is off, and the flow body's
``flow_heartbeats()`` sends the same events from a thread that wakes as soon as it
is told to stop. Subflows need none of their own: the outer run's heartbeats cover
the process.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

__all__ = ["HEARTBEAT_EVENT", "flow_heartbeats", "prompt_heartbeats", "subflows_without_heartbeats"]

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"

#: Seconds between heartbeats for flows started under ``prompt_heartbeats``.
_INTERVAL: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "astr_heartbeat_interval", default=None
)


@contextlib.contextmanager
def prompt_heartbeats() -> Iterator[None]:
    """Start flows in this block without Prefect's heartbeat thread; theirs is ours.

    Keeps Prefect's configured interval (``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``); when
    heartbeats are off there, this block changes nothing.
    """
    from prefect.settings import get_current_settings

    interval = get_current_settings().flows.heartbeat_frequency
    if interval is None:
        yield
        return
    token = _INTERVAL.set(interval)
    try:
        with _prefect_heartbeats_off():
            yield
    finally:
        _INTERVAL.reset(token)


@contextlib.contextmanager
def subflows_without_heartbeats() -> Iterator[None]:
    """Run the subflows started in this block without a heartbeat thread of their own.

    For a parent run that keeps Prefect's heartbeats (one served by a worker): they
    already show the process is alive, and each subflow's thread would add up to a
    second of idle waiting when it ends.
    """
    with _prefect_heartbeats_off():
        yield


@contextlib.contextmanager
def _prefect_heartbeats_off() -> Iterator[None]:
    """Prefect's settings with ``flows.heartbeat_frequency`` unset, for this block."""
    from prefect.context import SettingsContext, get_settings_context
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    quiet = settings.model_copy(
        update={"flows": settings.flows.model_copy(update={"heartbeat_frequency": None})}
    )
    with SettingsContext(profile=get_settings_context().profile, settings=quiet):
        yield


@contextlib.contextmanager
def flow_heartbeats() -> Iterator[None]:
    """Send this flow run's heartbeats while the block runs (flow bodies use it).

    Does nothing unless the flow was started under ``prompt_heartbeats`` (Prefect's
    own thread runs otherwise), and nothing in a subflow of such a flow.
    """
    interval = _INTERVAL.get()
    if interval is None:
        yield
        return
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        yield
        return
    token = _INTERVAL.set(None)  # subflows: this thread covers them
    stop = threading.Event()
    resource, related = _event_template(context)
    thread = threading.Thread(
        target=contextvars.copy_context().run,
        args=(_beat, stop, interval, resource, related),
        name=f"astr-heartbeat-{context.flow_run.id}",
        daemon=True,
    )
    thread.start()
    try:
        yield
    finally:
        _INTERVAL.reset(token)
        stop.set()
        thread.join(timeout=5)


def _beat(stop: threading.Event, interval: float, resource: dict, related: list) -> None:
    from prefect.events import emit_event

    while not stop.is_set():
        with contextlib.suppress(Exception):  # a lost heartbeat must not fail the run
            emit_event(event=HEARTBEAT_EVENT, resource=resource, related=related)
        stop.wait(interval)


def _event_template(context: object) -> tuple[dict[str, str], list]:
    """The resource and related resources of Prefect's own heartbeat event."""
    from prefect import __version__
    from prefect.events.related import tags_as_related_resources
    from prefect.events.schemas.events import RelatedResource

    flow_run = context.flow_run  # type: ignore[attr-defined]
    flow = getattr(context, "flow", None)
    resource = {
        "prefect.resource.id": f"prefect.flow-run.{flow_run.id}",
        "prefect.resource.name": flow_run.name or "",
        "prefect.version": __version__,
    }
    related: list = []
    if flow_run.flow_id:
        related.append(
            RelatedResource.model_validate(
                {
                    "prefect.resource.id": f"prefect.flow.{flow_run.flow_id}",
                    "prefect.resource.role": "flow",
                    "prefect.resource.name": flow.name if flow else "",
                }
            )
        )
    if flow_run.deployment_id:
        related.append(
            RelatedResource.model_validate(
                {
                    "prefect.resource.id": f"prefect.deployment.{flow_run.deployment_id}",
                    "prefect.resource.role": "deployment",
                }
            )
        )
    related += tags_as_related_resources(set(flow_run.tags or []))
    return resource, related
