"""A night of pairs in parallel: ``observation_batch_flow``.

The batch reads a night manifest (see :func:`pipeline.flows.submit.read_manifest`),
checks every row before anything starts, then runs one observation pipeline per pair,
in one of two ways chosen by the ``task_runner`` setting:

``threads`` (default)
    One run of the ``observation_pipeline/astr`` deployment per pair, created as a
    subflow of the batch (``run_deployment(..., timeout=0)``). Any ``astr worker`` on any
    host takes them; the deployment's concurrency limit (``max_concurrent_flows``,
    enforced by the Prefect server) bounds how many run at once across all workers.
    The batch only polls Prefect: it holds no observation slot and runs no notebook.
``dask``, ``dask:N``, ``dask:tcp://scheduler:8786``
    Each pair's pipeline runs as a Prefect task on a Dask cluster (prefect-dask): a
    local cluster of N worker processes started for the batch, or an existing one.
    Each pipeline still takes a slot of the global ``max_concurrent_flows`` limit.

Either way each pair is recorded in the catalogue as an ``observation_pipeline`` run
whose parent is the batch, and the batch is recorded as an ``observation_batch`` run
holding the summary in its metrics. The batch ends COMPLETED when every pair did, and
FAILED (naming the pairs) otherwise, so a bad night raises one alert. It gives up,
cancelling what has not ended, when nothing in the batch changed state for
``flow_timeout`` seconds (a paused or lost worker).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from pipeline.config import TaskRunnerSpec, WorkflowConfig, get_config, task_runner_spec
from pipeline.errors import AstrError, ObservationDataError, ServerError
from pipeline.flows.observations import (
    _finish_run,
    _record_run,
    batch_parent,
    observation_pipeline_flow,
)
from pipeline.flows.runtime import flow_run_id, get_catalogue
from pipeline.flows.steps import parse_observation_data
from pipeline.flows.submit import read_manifest
from pipeline.store import Catalogue
from pipeline.types import FlowState, FlowType
from pipeline.workflow.concurrency import FINAL_STATES
from pipeline.workflow.deployments import deployment_path
from pipeline.workflow.monitoring import monitoring_hooks

__all__ = [
    "BatchError",
    "PairOutcome",
    "batch_summary",
    "observation_batch_flow",
    "read_runs",
    "validate_manifest",
]

log = logging.getLogger(__name__)

#: Seconds between two looks at the pairs' states.
POLL_SECONDS = 2.0
#: Most flow runs read from Prefect per request.
PAGE = 200
#: What a Dask future's state is once it has ended, one way or another.
_DASK_FINAL = frozenset({"FINISHED"})
#: Keys of ``observation_data`` that name files the pipeline reads.
_FILE_KEYS = ("science_path", "reference_path", "catalog_path")


class BatchError(AstrError):
    """Some pairs of a batch did not complete; ``summary`` says which and why."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary

    def __reduce__(self) -> tuple[Any, ...]:  # pickled into the failed run's state
        return (type(self), (str(self), self.summary))


@dataclass
class PairOutcome:
    """How one pair of a batch ended.

    Parameters
    ----------
    name : str
        The pair's name in the manifest.
    flow_run_id : str or None
        Its ``observation_pipeline`` run (None if it never started).
    state : str
        Prefect state type of that run (``COMPLETED``, ``FAILED``...).
    observation_id : str or None
        The observation, when completed.
    candidates : int or None
        Candidates recorded in the catalogue for it, when completed.
    error : str or None
        Why it did not complete.
    process : str or None
        ``host:pid`` of the process that ran it (Dask mode).
    """

    name: str
    flow_run_id: str | None
    state: str
    observation_id: str | None = None
    candidates: int | None = None
    error: str | None = None
    process: str | None = None


# -- the manifest ----------------------------------------------------------------------


def validate_manifest(manifest: str | os.PathLike[str]) -> list[tuple[str, dict[str, Any]]]:
    """Read a night manifest and check every row as the pipeline would, opening no image.

    Parameters
    ----------
    manifest : path
        A CSV with ``science_path`` and ``reference_path`` columns and optionally
        ``name`` and any other ``observation_data`` key.

    Returns
    -------
    list of (name, observation_data)

    Raises
    ------
    ObservationDataError
        For a manifest that is not a readable file, and for the first bad row, naming
        its line and column (a missing image, a value of the wrong type).
    """
    path = Path(manifest).expanduser()
    if not path.is_file():
        raise ObservationDataError(
            f"manifest {path} does not exist or is not a file: give the path of a night "
            "manifest CSV (science_path, reference_path, optional name, band, mjd...)"
        )
    if not os.access(path, os.R_OK):
        raise ObservationDataError(f"manifest {path} is not readable by this process")
    items = read_manifest(path)
    for line, (_name, data) in enumerate(items, start=2):
        for key in _FILE_KEYS:
            if key in data and not Path(data[key]).is_file():
                raise ObservationDataError(
                    f"manifest {path} line {line}, column {key}: {data[key]} does not exist "
                    "or is not a file"
                )
        for key in ("science_path", "reference_path"):
            if key not in data:
                raise ObservationDataError(
                    f"manifest {path} line {line}, column {key}: empty; every row needs "
                    "a science and a reference image"
                )
        try:
            parse_observation_data(data)
        except ObservationDataError as exc:
            raise ObservationDataError(f"manifest {path} line {line}: {exc}") from None
    return items


# -- the flow --------------------------------------------------------------------------


@flow(name="observation_batch", log_prints=True, **monitoring_hooks())
def observation_batch_flow(manifest: str) -> dict:
    """Run the observation pipeline for every pair of a night manifest, in parallel.

    With ``task_runner = "threads"`` (default) each pair is a run of the
    ``observation_pipeline/astr`` deployment that any ``astr worker`` takes; with
    ``"dask..."`` each runs as a task on a Dask cluster. Returns the summary: per pair
    its flow run, final state, observation and candidate count (or error), counts by
    state and the wall time. Fails, naming the pairs, if any pair did not complete.
    """
    config = get_config()
    run_id = flow_run_id()
    logger = get_run_logger()
    catalogue = get_catalogue(config)
    _record_run(catalogue, run_id, FlowType.OBSERVATION_BATCH, {"manifest": manifest}, None)
    began = time.monotonic()
    try:
        items = validate_manifest(manifest)
        spec = task_runner_spec(config.task_runner, "task_runner")
        logger.info("%d pair(s) from %s through %s", len(items), manifest, _mode_name(spec, config))
        if spec.kind == "dask":
            outcomes = _through_dask(items, config, spec, run_id)
        else:
            outcomes = _through_deployments(items, config, run_id, catalogue)
        summary = batch_summary(
            manifest, _mode_name(spec, config), outcomes, time.monotonic() - began, catalogue
        )
    except BaseException as exc:
        _finish_run(catalogue, run_id, exc, {})
        raise
    _log_summary(logger, summary)
    failed = [name for name, pair in summary["pairs"].items() if pair["state"] != "COMPLETED"]
    if failed:
        error = BatchError(
            f"{len(failed)} of {summary['total']} pair(s) did not complete: "
            + "; ".join(f"{n} {summary['pairs'][n]['state']}" for n in failed[:20])
            + (" ..." if len(failed) > 20 else ""),
            summary,
        )
        _finish_run(catalogue, run_id, error, {"batch": summary})
        raise error
    _finish_run(catalogue, run_id, None, {"batch": summary})
    return summary


def batch_summary(
    manifest: str,
    mode: str,
    outcomes: list[PairOutcome],
    wall_seconds: float,
    catalogue: Catalogue | None = None,
) -> dict[str, Any]:
    """The batch's result: per pair, counts by state, wall time.

    Completed pairs get their observation and candidate count from the catalogue (the
    pipeline recorded them there).
    """
    pairs: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = {}
    for outcome in outcomes:
        if outcome.state == "COMPLETED" and catalogue is not None and outcome.flow_run_id:
            _fill_from_catalogue(outcome, catalogue)
        entry = asdict(outcome)
        entry.pop("name")
        pairs[outcome.name] = {k: v for k, v in entry.items() if v is not None}
        counts[outcome.state] = counts.get(outcome.state, 0) + 1
    return {
        "manifest": str(manifest),
        "mode": mode,
        "total": len(outcomes),
        "counts": dict(sorted(counts.items())),
        "wall_seconds": round(wall_seconds, 3),
        "pairs": pairs,
    }


def _fill_from_catalogue(outcome: PairOutcome, catalogue: Catalogue) -> None:
    from pipeline.errors import NotFoundError

    try:
        record = catalogue.get_flow_run(outcome.flow_run_id)
    except NotFoundError:
        return
    if record.observation_id is not None:
        outcome.observation_id = str(record.observation_id)
        outcome.candidates = len(catalogue.candidates(record.observation_id))


def _mode_name(spec: TaskRunnerSpec, config: WorkflowConfig) -> str:
    if spec.kind != "dask":
        return f"deployment {deployment_path('observation_pipeline')}"
    if spec.address:
        return f"dask {spec.address}"
    return f"dask local cluster of {spec.workers or config.max_concurrent_flows} processes"


def _log_summary(logger: Any, summary: dict[str, Any]) -> None:
    counts = ", ".join(f"{n} {state}" for state, n in summary["counts"].items())
    logger.info("batch of %d in %.1f s: %s", summary["total"], summary["wall_seconds"], counts)
    for name, pair in summary["pairs"].items():
        if pair["state"] != "COMPLETED":
            logger.warning("%s: %s: %s", name, pair["state"], pair.get("error"))


# -- waiting ---------------------------------------------------------------------------


def watch(
    snapshot: Callable[[], dict[str, str]],
    *,
    timeout: float,
    interval: float = POLL_SECONDS,
    final: frozenset[str] = FINAL_STATES,
) -> tuple[dict[str, str], bool]:
    """Poll ``snapshot()`` until every state is final or nothing changed for ``timeout`` s.

    Parameters
    ----------
    snapshot : callable
        Returns the current state of every pair, by name.
    timeout : float
        Seconds without any change after which the wait gives up.
    interval : float
        Seconds between polls.
    final : set of str
        States that end a pair.

    Returns
    -------
    states : dict
        The last snapshot.
    stalled : bool
        Whether the wait gave up.
    """
    last: dict[str, str] | None = None
    changed_at = time.monotonic()
    while True:
        states = snapshot()
        if states != last:
            last, changed_at = states, time.monotonic()
        if all(state in final for state in states.values()):
            return states, False
        if time.monotonic() - changed_at >= timeout:
            return states, True
        time.sleep(interval)


# -- through the deployments -----------------------------------------------------------


def _through_deployments(
    items: list[tuple[str, dict[str, Any]]],
    config: WorkflowConfig,
    batch_run_id: str | None,
    catalogue: Catalogue,
) -> list[PairOutcome]:
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext
    from prefect.deployments import run_deployment

    path = deployment_path("observation_pipeline")
    _require_deployment(path)
    context = FlowRunContext.get()
    attempt = context.flow_run.run_count if context and context.flow_run else 1
    started: dict[str, str] = {}
    try:
        for name, data in items:
            run = run_deployment(
                path,
                parameters={"observation_data": data},
                timeout=0,
                tags=["astr", "batch"],
                # a retried batch starts its pairs anew; one attempt never twice
                idempotency_key=f"{batch_run_id}:{attempt}:{name}" if batch_run_id else None,
            )
            started[name] = str(run.id)
            catalogue.record_flow_run(
                run.id,
                FlowType.OBSERVATION_PIPELINE,
                status=FlowState.PENDING,
                parameters={"observation_data": data},
                parent_id=batch_run_id,
            )
        with get_client(sync_client=True) as client:
            runs: dict[str, Any] = {}

            def snapshot() -> dict[str, str]:
                runs.update(read_runs(client, list(started.values())))
                return {name: _state_type(runs.get(rid)) for name, rid in started.items()}

            states, stalled = watch(snapshot, timeout=config.flow_timeout)
            if stalled:
                _cancel(client, [started[n] for n, s in states.items() if s not in FINAL_STATES])
    except BaseException:
        _cancel_quietly(list(started.values()))
        raise
    outcomes = []
    for name, run_id in started.items():
        run = runs.get(run_id)
        state = states[name]
        error = None
        if state != "COMPLETED":
            error = _run_error(catalogue, run_id, run)
            if stalled and state not in FINAL_STATES:
                error = (
                    f"nothing in the batch changed state for {config.flow_timeout} s "
                    f"(flow_timeout) while this run was {state}: cancelled. Is an `astr "
                    "worker` running (and not paused) against this Prefect server?"
                )
        outcomes.append(PairOutcome(name, run_id, state, error=error))
    return outcomes


def _require_deployment(path: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(path)
        except ObjectNotFound:
            raise ServerError(
                f"no deployment {path} on the Prefect server: start a worker (`astr worker`) "
                "against the same server, or set task_runner to dask"
            ) from None


def read_runs(client: Any, run_ids: list[str]) -> dict[str, Any]:
    """Prefect's flow runs by id string, read a page at a time; a failed page is skipped."""
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    found: dict[str, Any] = {}
    for start in range(0, len(run_ids), PAGE):
        chunk = [uuid.UUID(r) for r in run_ids[start : start + PAGE]]
        try:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=chunk)), limit=PAGE
            )
        except Exception as exc:  # the server may blink (restart): look again next poll
            log.warning("could not read the pairs' states: %s", exc)
            continue
        found.update({str(run.id): run for run in runs})
    return found


def _state_type(run: Any) -> str:
    if run is None or run.state is None:
        return "SCHEDULED"
    return run.state.type.value


def _run_error(catalogue: Catalogue, run_id: str, run: Any) -> str | None:
    from pipeline.errors import NotFoundError

    with contextlib.suppress(NotFoundError):
        message = catalogue.get_flow_run(run_id).error_message
        if message:
            return message
    return (run.state.message if run is not None and run.state is not None else None) or None


def _cancel(client: Any, run_ids: list[str]) -> None:
    from prefect.states import Cancelled, Cancelling

    for run_id in run_ids:
        with contextlib.suppress(Exception):
            run = client.read_flow_run(uuid.UUID(run_id))
            state = _state_type(run)
            if state in FINAL_STATES or state == "CANCELLING":
                continue
            message = "cancelled by its batch"
            proposed = (
                Cancelled(message=message)
                if state in ("SCHEDULED", "PAUSED")
                else Cancelling(message=message)
            )
            client.set_flow_run_state(uuid.UUID(run_id), proposed, force=True)


def _cancel_quietly(run_ids: list[str]) -> None:
    from prefect.client.orchestration import get_client

    with contextlib.suppress(Exception), get_client(sync_client=True) as client:
        _cancel(client, run_ids)


# -- on a Dask cluster -----------------------------------------------------------------


def pair_pipeline(
    name: str, observation_data: dict, batch_run_id: str | None, timeout: int
) -> dict:
    """Run one pair's pipeline here (a Dask worker process) as a subflow of the batch.

    A plain module-level function (the task wraps it), so Dask pickles it by reference.
    """
    pipeline = observation_pipeline_flow.with_options(timeout_seconds=timeout)
    with _parent(batch_run_id):
        state = pipeline(dict(observation_data), return_state=True)
    error = None
    if not state.is_completed():
        try:
            state.result()
        except BaseException as exc:
            error = str(exc) or type(exc).__name__
        error = error or state.message
    run_id = state.state_details.flow_run_id
    return {
        "flow_run_id": str(run_id) if run_id else None,
        "state": state.type.value,
        "error": error,
        "process": f"{socket.gethostname()}:{os.getpid()}",
    }


#: The Prefect task a Dask worker runs per pair.
run_pair = task(
    pair_pipeline,
    name="observation-pair",
    retries=0,
    cache_policy=NO_CACHE,
    persist_result=False,
)


@contextlib.contextmanager
def _parent(batch_run_id: str | None) -> Iterator[None]:
    token = batch_parent.set(batch_run_id)
    try:
        yield
    finally:
        batch_parent.reset(token)


def dask_task_runner(spec: TaskRunnerSpec, config: WorkflowConfig) -> Any:
    """A prefect-dask task runner for ``spec``: a new local cluster, or an existing one."""
    from prefect_dask import DaskTaskRunner

    if spec.address:
        return DaskTaskRunner(address=spec.address)
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": spec.workers or config.max_concurrent_flows,
            "threads_per_worker": 1,  # one pipeline per process; its notebooks run in kernels
            "processes": True,
            "dashboard_address": None,
        },
    )


def _through_dask(
    items: list[tuple[str, dict[str, Any]]],
    config: WorkflowConfig,
    spec: TaskRunnerSpec,
    batch_run_id: str | None,
) -> list[PairOutcome]:
    results: dict[str, dict[str, Any]] = {}
    with dask_task_runner(spec, config) as runner:
        futures = {
            name: runner.submit(
                run_pair,
                parameters={
                    "name": name,
                    "observation_data": data,
                    "batch_run_id": batch_run_id,
                    "timeout": config.flow_timeout,
                },
            )
            for name, data in items
        }

        def snapshot() -> dict[str, str]:
            return {name: _dask_state(f) for name, f in futures.items()}

        states, stalled = watch(snapshot, timeout=config.flow_timeout, final=_DASK_FINAL)
        for name, future in futures.items():
            if states[name] == "FINISHED":
                try:
                    results[name] = future.result()
                except Exception as exc:
                    results[name] = {"state": "FAILED", "error": str(exc), "flow_run_id": None}
            elif stalled:
                future.wrapped_future.cancel()
                results[name] = {
                    "state": "CANCELLED",
                    "flow_run_id": None,
                    "error": f"not finished after {config.flow_timeout} s without progress "
                    "(flow_timeout): cancelled",
                }
    return [
        PairOutcome(
            name,
            results[name].get("flow_run_id"),
            results[name]["state"],
            error=results[name].get("error"),
            process=results[name].get("process"),
        )
        for name, _ in items
    ]


def _dask_state(future: Any) -> str:
    status = future.wrapped_future.status
    return "FINISHED" if status in ("finished", "error", "cancelled", "lost") else "RUNNING"
