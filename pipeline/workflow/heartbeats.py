"""Flow-run heartbeats that stop at once when the run ends.

Prefect shows that a flow run's process is alive with ``prefect.flow-run.heartbeat``
events. Nothing in a self-hosted Prefect server acts on missing heartbeats by itself: a
run whose host died stays RUNNING for ever. ``astr worker`` therefore makes its flow
runs beat every :data:`WORKER_HEARTBEAT_SECONDS` (unless ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
says otherwise) and keeps the :data:`CRASH_AUTOMATION` automation on the server, which
marks a run CRASHED once :data:`MISSED_HEARTBEATS` heartbeats in a row are missing
(:func:`worker_heartbeats`, :func:`ensure_crash_detection`).

Prefect's
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
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta

__all__ = [
    "CRASH_AUTOMATION",
    "HEARTBEAT_EVENT",
    "MISSED_HEARTBEATS",
    "WORKER_HEARTBEAT_SECONDS",
    "crash_automation",
    "ensure_crash_detection",
    "flow_heartbeats",
    "prompt_heartbeats",
    "subflows_without_heartbeats",
    "worker_heartbeats",
]

logger = logging.getLogger(__name__)

HEARTBEAT_EVENT = "prefect.flow-run.heartbeat"

#: Seconds between the heartbeats of runs a worker starts (Prefect's minimum; its default
#: is 180 s, which leaves a dead host's run RUNNING for many minutes).
WORKER_HEARTBEAT_SECONDS = 30
#: Heartbeats in a row a run may miss before it is marked CRASHED.
MISSED_HEARTBEATS = 2
#: Name of the Prefect automation that marks runs without heartbeats CRASHED.
CRASH_AUTOMATION = "astr-crash-runs-without-heartbeats"
#: Events that end a run: after one of them, missing heartbeats mean nothing.
_FINAL_EVENTS = (
    "prefect.flow-run.Completed",
    "prefect.flow-run.Failed",
    "prefect.flow-run.Cancelled",
    "prefect.flow-run.Crashed",
)
_FREQUENCY_VARIABLES = ("PREFECT_FLOWS_HEARTBEAT_FREQUENCY", "PREFECT_RUNNER_HEARTBEAT_FREQUENCY")


def worker_heartbeats(default: int = WORKER_HEARTBEAT_SECONDS) -> int | None:
    """Make the flow runs this process starts beat every ``default`` seconds; the interval.

    Sets ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY`` in this process's environment (inherited by
    the flow-run processes a worker starts) unless it, or its legacy spelling, is set
    already; the value set there wins.

    Returns
    -------
    int or None
        Seconds between heartbeats; None when heartbeats are off.
    """
    from prefect.settings import get_current_settings

    from pipeline.workflow.prefect_server import refresh_prefect_settings

    if not any(os.environ.get(name) for name in _FREQUENCY_VARIABLES):
        os.environ["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] = str(default)
    refresh_prefect_settings()
    return get_current_settings().flows.heartbeat_frequency


def crash_automation(interval: int, missed: int = MISSED_HEARTBEATS) -> object:
    """The automation that marks a flow run CRASHED when its heartbeats stop.

    A proactive trigger per flow run: after a heartbeat, if neither another heartbeat
    nor an event ending the run comes within ``missed * interval`` seconds (plus 5 s of
    slack for a busy machine), the run's state becomes CRASHED. Only runs of deployments
    (those a worker started, which beat every ``interval`` seconds) are watched: a run
    started in-process (``astr observe``) beats at Prefect's own interval, and a run that
    never sent a heartbeat (a subflow of a beating run) cannot be judged.

    Parameters
    ----------
    interval : int
        Seconds between heartbeats.
    missed : int
        Heartbeats in a row that may be missing.

    Returns
    -------
    prefect.events.schemas.automations.AutomationCore
    """
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    window = timedelta(seconds=missed * interval + 5)
    return AutomationCore(
        name=CRASH_AUTOMATION,
        description=(
            f"Marks a flow run CRASHED when {missed} heartbeats ({interval} s apart) are "
            "missing: its process or host died. Kept by `astr worker`."
        ),
        trigger=EventTrigger(
            after={HEARTBEAT_EVENT},
            expect={HEARTBEAT_EVENT, *_FINAL_EVENTS},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            match_related=ResourceSpecification({"prefect.resource.role": "deployment"}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=window,
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=(
                    f"Crashed: no heartbeat for {window.total_seconds():g} s; the flow run's "
                    "process or its host died"
                ),
            )
        ],
    )


def ensure_crash_detection(
    interval: int | None, missed: int = MISSED_HEARTBEATS
) -> uuid.UUID | None:
    """Create or update the server's :data:`CRASH_AUTOMATION` for heartbeats ``interval`` apart.

    Parameters
    ----------
    interval : int or None
        Seconds between heartbeats (None: heartbeats are off, nothing can be detected,
        and a warning says so).
    missed : int
        Heartbeats in a row that may be missing.

    Returns
    -------
    uuid.UUID or None
        The automation's id.
    """
    from prefect.client.orchestration import get_client

    if interval is None:
        logger.warning(
            "flow-run heartbeats are off (PREFECT_FLOWS_HEARTBEAT_FREQUENCY): a run whose "
            "worker dies stays RUNNING until someone cancels it"
        )
        return None
    wanted = crash_automation(interval, missed)
    with get_client(sync_client=True) as client:
        found = client.read_automations_by_name(CRASH_AUTOMATION)
        if not found:
            return client.create_automation(wanted)
        current = found[0]
        client.update_automation(current.id, wanted)  # this worker's interval wins
        for extra in found[1:]:  # two workers started at once: keep one
            client.delete_automation(extra.id)
        return current.id


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
