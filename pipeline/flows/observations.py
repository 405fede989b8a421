"""The observation flows: each runs one notebook through the runner and records its products.

``observation_pipeline_flow`` chains the five steps. An observation is identified by
its inputs (raw checksums and overrides), so submitting the same pair again resumes
it: steps that already succeeded come back from the runner's cache at once, and the
first step that did not runs. ``force`` in ``observation_data`` reruns everything.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Cancelled

from pipeline.config import WorkflowConfig, get_config
from pipeline.errors import (
    CatalogueError,
    FlowStepError,
    ImageNotFoundError,
    NotebookCancelledError,
    NotFoundError,
    ObservationDataError,
    UpstreamProductError,
)
from pipeline.flows.publish import publish, publishing, quiet_window
from pipeline.flows.runtime import (
    PipelineContext,
    ProgressReporter,
    attempt_dicts,
    download,
    emit,
    expect_notebooks,
    flow_run_id,
    get_catalogue,
    get_runner,
    in_pipeline,
    local_copy,
    pipeline_context,
    production_model,
    progress_hook,
    register_file,
    utcnow,
)
from pipeline.flows.steps import (
    STEP_ORDER,
    STEPS,
    ObservationRequest,
    Step,
    input_key,
    notebook_parameters,
    notebooks_dir,
    parse_observation_data,
    producer_of,
)
from pipeline.runner import Attempt, NotebookResult, kernel_session
from pipeline.store import ArtifactStore, Catalogue
from pipeline.store.models import Observation
from pipeline.store.storage import sha256_file
from pipeline.types import FlowState, FlowType, ObservationStatus
from pipeline.workflow.cancellation import CancelWatcher
from pipeline.workflow.concurrency import observation_slot
from pipeline.workflow.heartbeats import flow_heartbeats, subflows_without_heartbeats
from pipeline.workflow.monitoring import monitoring_hooks
from pipeline.workflow.outages import retry_refused_connections

__all__ = [
    "observation_detection_flow",
    "observation_differencing_flow",
    "observation_ingestion_flow",
    "observation_pipeline_flow",
    "observation_preprocessing_flow",
    "observation_validation_flow",
]

#: Candidates shown in the Prefect table artifact (the full list is candidates.ecsv).
TABLE_ROWS = 50

#: The batch run a pipeline runs for when a batch runs it in-process (on a Dask worker);
#: the pipeline's catalogue record names it as its parent, as for one through a deployment.
batch_parent: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "astr_batch_parent", default=None
)


# -- the notebook task ---------------------------------------------------------------


@task(name="run-notebook", retries=0, cache_policy=NO_CACHE, persist_result=False)
def run_notebook(
    step_name: str,
    parameters: dict[str, Any],
    inputs: dict[str, str],
    force: bool = False,
    input_checksums: dict[str, str] | None = None,
) -> NotebookResult:
    """Run one step's notebook; its cell output goes to this task's log as it comes.

    Retries are the runner's (backoff, jitter, no retry of a bug), so the task has none.
    """
    config = get_config()
    step = STEPS[step_name]
    logger = get_run_logger()
    context = pipeline_context()
    catalogue = get_catalogue(config)
    reporter = ProgressReporter(catalogue, flow_run_id(), key=f"progress-{step.name}")

    def on_text(cell: int, text: str) -> None:
        # One record per output message, not per line: a printed table is one entry
        # to read, and one row for the server to write, not hundreds.
        text = text.rstrip()
        if text.strip():
            logger.info("[%s cell %d] %s", step.notebook, cell, text)

    def on_progress(done: int, total: int, cell: int) -> None:
        fraction = done / total if total else 1.0
        label = f"{step.name}: cell {min(done + 1, total)}/{total}"
        reporter.update(fraction, label, force=done == total)
        if context is not None and context.reporter is not None:
            overall = (context.step_index + fraction) / context.steps
            context.reporter.update(overall, label)

    def on_attempt(attempt: Attempt) -> None:
        if attempt.status != "completed":
            logger.warning(
                "%s attempt %d %s: %s",
                step.notebook,
                attempt.number,
                attempt.status,
                (attempt.error or "").splitlines()[0] if attempt.error else "",
            )

    watched = [flow_run_id(), context.run_id if context is not None else None]
    try:
        with CancelWatcher(watched) as watcher, quiet_window():
            return get_runner(config).run(
                notebooks_dir() / step.notebook,
                parameters,
                inputs={name: Path(path) for name, path in inputs.items()},
                input_checksums=input_checksums,
                force=force,
                cancel_event=watcher.event,
                on_text=on_text,
                on_progress=on_progress,
                on_attempt=on_attempt,
            )
    finally:
        reporter.update(reporter.progress, reporter.current_step, force=True)


# -- the flows -----------------------------------------------------------------------


@contextlib.contextmanager
def _flow_body() -> Iterator[None]:
    """What every flow body runs in: prompt heartbeats, artifacts flushed at the end.

    In a process a worker started for the run, its Prefect clients ride out a restart of
    the server (:mod:`pipeline.workflow.outages`).
    """
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        retry_refused_connections()
    with publishing(), flow_heartbeats():
        yield


@flow(name="observation_ingestion", log_prints=True, **monitoring_hooks())
def observation_ingestion_flow(observation_data: dict) -> dict:
    """Validate a science/reference pair, store it, and register the observation.

    Returns a dict with the new (or resumed) ``observation_id``, the products and the
    report. Bad input fails here with the reading error's message, and leaves no
    observation behind.
    """
    with _flow_body():
        return _ingest(observation_data)


@flow(name="observation_preprocessing", log_prints=True, **monitoring_hooks())
def observation_preprocessing_flow(observation_id: uuid.UUID) -> dict:
    """Background, masks, registration onto the reference grid, PSFs, flux scale."""
    with _flow_body():
        return _run_step(STEPS["preprocessing"], observation_id)


@flow(name="observation_differencing", log_prints=True, **monitoring_hooks())
def observation_differencing_flow(observation_id: uuid.UUID) -> dict:
    """ZOGY difference image D, S and S_corr."""
    with _flow_body():
        return _run_step(STEPS["differencing"], observation_id)


@flow(name="observation_detection", log_prints=True, **monitoring_hooks())
def observation_detection_flow(observation_id: uuid.UUID) -> dict:
    """Candidates in S_corr with PSF photometry, flags and cutout triplets."""
    with _flow_body():
        return _run_step(STEPS["detection"], observation_id)


@flow(name="observation_validation", log_prints=True, **monitoring_hooks())
def observation_validation_flow(observation_id: uuid.UUID) -> dict:
    """Cross-match, cuts and real/bogus score; the candidate catalogue."""
    with _flow_body():
        return _run_step(STEPS["validation"], observation_id)


STEP_FLOWS = {
    "ingestion": observation_ingestion_flow,
    "preprocessing": observation_preprocessing_flow,
    "differencing": observation_differencing_flow,
    "detection": observation_detection_flow,
    "validation": observation_validation_flow,
}


@flow(name="observation_pipeline", log_prints=True, **monitoring_hooks())
def observation_pipeline_flow(observation_data: dict) -> dict:
    """All five steps for one pair; resumes an observation after its last good step.

    Holds one slot of the ``max_concurrent_flows`` limit while it runs. With
    ``observation_data["output_dir"]`` it also writes ``candidates.ecsv`` and
    ``reports/<step>.html`` there.
    """
    config = get_config()
    request = parse_observation_data(observation_data)
    run_id = flow_run_id()
    logger = get_run_logger()
    with _flow_body(), observation_slot(config.max_concurrent_flows):
        # the steps share one kernel, cleared between notebooks (kernel_session), so the
        # run needs one warm kernel; a retry or a failed step's successor starts its own
        expect_notebooks(config, 1)
        catalogue = get_catalogue(config)
        _record_run(
            catalogue,
            run_id,
            FlowType.OBSERVATION_PIPELINE,
            observation_data,
            None,
            batch_parent.get(),
        )
        reporter = ProgressReporter(
            catalogue, run_id, key="progress-pipeline", hook=progress_hook.get()
        )
        context = PipelineContext(run_id=run_id, force=request.force, reporter=reporter)
        results: dict[str, dict] = {}
        try:
            with in_pipeline(context), subflows_without_heartbeats(), kernel_session():
                for index, name in enumerate(STEP_ORDER):
                    context.step_index = index
                    reporter.update(index / len(STEP_ORDER), name, force=True)
                    timeout = config.flow_timeout
                    if name == "ingestion":
                        results[name] = STEP_FLOWS[name].with_options(timeout_seconds=timeout)(
                            observation_data
                        )
                        context.observation_id = uuid.UUID(results[name]["observation_id"])
                    else:
                        results[name] = STEP_FLOWS[name].with_options(timeout_seconds=timeout)(
                            context.observation_id
                        )
                    how = "cached" if results[name]["cached"] else "ran"
                    logger.info("%s: %s (%s)", name, how, results[name]["report"])
            reporter.update(1.0, None, force=True)
        except BaseException as exc:
            _finish_run(catalogue, run_id, exc, {})
            if request.output_dir is not None and context.observation_id is not None:
                _export(config, catalogue, context.observation_id, request.output_dir)
            if _is_cancel(exc):
                return Cancelled(message=f"cancelled: {_first_line(str(exc))}")
            raise
        summary = _pipeline_summary(context.observation_id, results)
        if request.output_dir is not None:
            summary["exported"] = _export(
                config, catalogue, context.observation_id, request.output_dir
            )
        _finish_run(catalogue, run_id, None, summary["metrics"], observation=context.observation_id)
        return summary


# -- ingestion -----------------------------------------------------------------------


def _ingest(observation_data: dict) -> dict:
    config = get_config()
    step = STEPS["ingestion"]
    request = parse_observation_data(observation_data)
    raw = {"raw_science": request.science_path, "raw_reference": request.reference_path}
    if request.catalog_path is not None:
        raw["catalog"] = request.catalog_path
    for kind, path in raw.items():
        if not path.is_file():
            raise ImageNotFoundError(
                f"{kind.removeprefix('raw_')} file {path} does not exist or is not a file"
            )
    checksums = {kind: sha256_file(path) for kind, path in raw.items()}
    key = input_key(checksums, request)
    store = ArtifactStore(config.storage_config)
    catalogue = get_catalogue(config)
    existing = _existing_observation(catalogue, request, key)
    observation_id = existing.id if existing is not None else uuid.uuid4()
    run_id = flow_run_id()
    parent = _parent_run_id()
    _record_run(catalogue, run_id, step.flow_type, observation_data, None, parent)
    metadata = request.metadata()
    params = notebook_parameters(step, raw, observation_id=observation_id, metadata=metadata)
    try:
        result = run_notebook(
            step.name, params, _as_str(raw), force=_force(request), input_checksums=checksums
        )
    except BaseException as exc:
        if existing is not None:
            _step_failed(catalogue, store, existing.id, step, run_id, exc)
        _finish_run(catalogue, run_id, exc, {})
        emit(
            f"astr.observation.{step.name}.failed",
            observation_id,
            {"error": str(exc)[:2000], "inputs": _as_str(raw)},
        )
        if _is_cancel(exc):
            return Cancelled(message=f"cancelled: {_first_line(str(exc))}")
        raise
    created = existing is None
    if created:
        facts = result.outputs.get("science", {})
        catalogue.add_observation(
            raw_checksums={k.removeprefix("raw_"): v for k, v in checksums.items()},
            metadata=metadata,
            band=facts.get("band"),
            mjd=facts.get("mjd"),
            observation_id=observation_id,
            input_key=key,
        )
    try:
        for kind, path in raw.items():
            register_file(
                catalogue,
                store,
                observation_id,
                kind=kind,
                key=f"observations/{observation_id}/raw/{kind}{''.join(path.suffixes)}",
                path=path,
                step=step.name,
                run_id=run_id,
                metadata={"original_path": str(path)},
                link=False,  # the user's file: copied, never linked or made read-only
            )
        summary = _record_success(catalogue, store, observation_id, step, result, run_id)
    except BaseException:
        if created:  # no half-registered observation
            _forget(catalogue, store, observation_id)
        raise
    return summary


def _existing_observation(
    catalogue: Catalogue, request: ObservationRequest, key: str
) -> Observation | None:
    if request.observation_id is not None:
        try:
            observation = catalogue.get_observation(request.observation_id)
        except NotFoundError:
            raise ObservationDataError(
                f"observation_data['observation_id'] {request.observation_id} is not in "
                "the catalogue; leave it out to register a new observation"
            ) from None
        if observation.input_key not in (None, key):
            raise ObservationDataError(
                f"observation {request.observation_id} was registered with other inputs "
                "or overrides; leave observation_id out to register these as a new one"
            )
        return observation
    return catalogue.find_observation(key)


def _forget(catalogue: Catalogue, store: ArtifactStore, observation_id: uuid.UUID) -> None:
    for product in catalogue.products(observation_id):
        with contextlib.suppress(Exception):  # best effort: the row goes regardless
            store.delete(store.key_of(product.uri))
    catalogue.delete_observation(observation_id)


# -- the other steps -----------------------------------------------------------------


def _run_step(step: Step, observation_id: uuid.UUID | str) -> dict:
    config = get_config()
    store = ArtifactStore(config.storage_config)
    try:
        observation_id = uuid.UUID(str(observation_id))
    except ValueError:
        raise ObservationDataError(f"observation_id is not a UUID: {observation_id!r}") from None
    catalogue = get_catalogue(config)
    run_id = flow_run_id()
    _record_run(
        catalogue,
        run_id,
        step.flow_type,
        {"observation_id": str(observation_id)},
        None,
        _parent_run_id(),
    )
    try:
        observation = catalogue.get_observation(observation_id)
        _record_run_observation(catalogue, run_id, observation_id)
        inputs, checksums = _upstream_inputs(config, catalogue, store, observation, step)
        model = production_model(config) if step.name == "validation" else None
        params = notebook_parameters(
            step, inputs, observation_id=observation_id, metadata=observation.meta, model=model
        )
    except (NotFoundError, UpstreamProductError) as exc:
        _finish_run(catalogue, run_id, exc, {})
        emit(f"astr.observation.{step.name}.failed", observation_id, {"error": str(exc)})
        raise
    context = pipeline_context()
    force = bool(context and context.force)
    try:
        result = run_notebook(
            step.name, params, _as_str(inputs), force=force, input_checksums=checksums
        )
    except BaseException as exc:
        _step_failed(catalogue, store, observation_id, step, run_id, exc)
        _finish_run(catalogue, run_id, exc, {})
        if _is_cancel(exc):
            return Cancelled(message=f"cancelled: {_first_line(str(exc))}")
        raise
    return _record_success(catalogue, store, observation_id, step, result, run_id)


def _upstream_inputs(
    config: WorkflowConfig,
    catalogue: Catalogue,
    store: ArtifactStore,
    observation: Observation,
    step: Step,
) -> tuple[dict[str, Path], dict[str, str]]:
    """Local paths of the products a step reads, and their recorded checksums.

    Refuses with a message naming what is missing.
    """
    states = observation.steps or {}
    scratch = Path(config.home) / "scratch" / str(observation.id)
    inputs: dict[str, Path] = {}
    checksums: dict[str, str] = {}
    for kind in step.needs:
        producer = producer_of(kind)
        state = states.get(producer, {})
        if state.get("status") == "failed":
            raise UpstreamProductError(
                f"observation {observation.id}: its {producer} step failed "
                f"({_first_line(state.get('error'))}); its {kind!r} product is not usable. "
                f"Rerun observation_{producer}_flow (or the pipeline) first"
            )
        try:
            product = catalogue.latest_product(observation.id, kind)
        except NotFoundError:
            raise UpstreamProductError(
                f"observation {observation.id} has no {kind!r} product from the {producer} "
                f"step: run observation_{producer}_flow first"
            ) from None
        inputs[kind] = local_copy(store, product, scratch)
        checksums[kind] = product.sha256
    if step.name == "validation":
        found = catalogue.products(observation.id, kind="catalog")
        if found:
            inputs["catalog"] = local_copy(store, found[-1], scratch)
            checksums["catalog"] = found[-1].sha256
    return inputs, checksums


# -- recording results ---------------------------------------------------------------


def _record_success(
    catalogue: Catalogue,
    store: ArtifactStore,
    observation_id: uuid.UUID,
    step: Step,
    result: NotebookResult,
    run_id: str | None,
) -> dict:
    tag = result.output_dir.parent.parent.name  # the runner's run id
    base = f"observations/{observation_id}/{step.name}/{tag}"
    declared = result.outputs.get("products", {})
    products: dict[str, str] = {}
    for name, kind in step.makes.items():
        filename = declared.get(name)
        if not filename:
            raise FlowStepError(
                f"{step.notebook} did not declare its {name!r} product in outputs.json"
            )
        product = register_file(
            catalogue,
            store,
            observation_id,
            kind=kind,
            key=f"{base}/{filename}",
            path=result.output_dir / filename,
            step=step.name,
            run_id=run_id,
            metadata={"cache_key": result.cache_key},
            sha256=result.files.get(filename),
        )
        products[kind] = product.uri
    reports = _store_reports(catalogue, store, observation_id, step, result.attempts, tag, run_id)
    report_uri = reports[-1]["html"]
    if step.name == "validation":
        rows = _candidate_rows(result.output_dir / declared["candidates"])
        catalogue.replace_candidates(observation_id, rows, run_id=run_id)
        _candidate_table(rows)
    state = {
        "status": "completed",
        "run_id": run_id,
        "cached": result.cached,
        "cache_key": result.cache_key,
        "report": report_uri,
        "finished_at": utcnow().isoformat(),
    }
    catalogue.set_step_state(
        observation_id, step.name, state, status=_status_after(step, catalogue, observation_id)
    )
    metrics = {
        "step": step.name,
        "cached": result.cached,
        "attempts": result.attempt_count,
        "durations": {k: round(v, 4) for k, v in result.durations.items()},
        "science": result.outputs.get("metrics", {}),
    }
    _finish_run(catalogue, run_id, None, metrics, attempts=result.attempt_count)
    _link(step, report_uri)
    emit(
        f"astr.observation.{step.name}.completed",
        observation_id,
        {"products": products, "report": report_uri, "cached": result.cached},
    )
    return {
        "observation_id": str(observation_id),
        "step": step.name,
        "status": "completed",
        "cached": result.cached,
        "products": products,
        "report": report_uri,
        "executed_notebook": reports[-1]["notebook"],
        "attempts": result.attempt_count,
        "attempt_reports": reports,
        "durations": metrics["durations"],
        "metrics": metrics["science"],
        "outputs": result.outputs,
    }


def _status_after(step: Step, catalogue: Catalogue, observation_id: uuid.UUID) -> ObservationStatus:
    """The observation's status once ``step`` succeeded: never moves an observation back."""
    observation = catalogue.get_observation(observation_id)
    done = [ObservationStatus.REGISTERED] + [STEPS[name].done for name in STEP_ORDER]
    states = observation.steps or {}
    failed = [
        n for n in STEP_ORDER if n != step.name and states.get(n, {}).get("status") == "failed"
    ]
    if failed:
        return ObservationStatus.FAILED
    try:
        current = done.index(ObservationStatus(observation.status))
    except ValueError:
        current = 0
    return done[max(current, done.index(step.done))]


def _store_reports(
    catalogue: Catalogue,
    store: ArtifactStore,
    observation_id: uuid.UUID,
    step: Step,
    attempts: tuple[Any, ...],
    tag: str,
    run_id: str | None,
) -> list[dict[str, Any]]:
    stored = []
    for attempt in attempts:
        if not isinstance(attempt, Attempt):
            continue
        base = f"observations/{observation_id}/reports/{step.name}/{tag}/attempt-{attempt.number}"
        meta = {"status": attempt.status, "attempt": attempt.number, "error": attempt.error}
        uris = {}
        for kind, path in (("report", attempt.html), ("notebook", attempt.notebook)):
            if path.exists():
                product = register_file(
                    catalogue,
                    store,
                    observation_id,
                    kind=kind,
                    key=f"{base}/{path.name}",
                    path=path,
                    step=step.name,
                    run_id=run_id,
                    metadata=meta,
                )
                uris[kind] = product.uri
        stored.append(
            {
                "attempt": attempt.number,
                "status": attempt.status,
                "html": uris.get("report"),
                "notebook": uris.get("notebook"),
            }
        )
    return stored


def _step_failed(
    catalogue: Catalogue,
    store: ArtifactStore,
    observation_id: uuid.UUID,
    step: Step,
    run_id: str | None,
    exc: BaseException,
) -> None:
    attempts = getattr(exc, "attempts", ())
    reports: list[dict[str, Any]] = []
    if attempts:
        tag = attempts[0].notebook.parent.parent.name
        try:
            reports = _store_reports(catalogue, store, observation_id, step, attempts, tag, run_id)
        except Exception as store_error:  # keep the original failure in front
            reports = [{"error": f"reports not stored: {store_error}"}]
    message = f"{step.name}: {_first_line(str(exc)) or type(exc).__name__}"
    cancelled = _is_cancel(exc) or not isinstance(exc, Exception)
    state = {
        "status": "cancelled" if cancelled else "failed",
        "run_id": run_id,
        "error": str(exc)[:4000],
        "attempts": attempt_dicts(attempts),
        "reports": reports,
        "finished_at": utcnow().isoformat(),
    }
    with contextlib.suppress(CatalogueError):
        catalogue.set_step_state(
            observation_id,
            step.name,
            state,
            status=None if cancelled else ObservationStatus.FAILED,
            error_message=None if cancelled else message,
        )
    emit(
        f"astr.observation.{step.name}.failed",
        observation_id,
        {"error": str(exc)[:2000], "cancelled": cancelled, "reports": reports},
    )


def _candidate_rows(path: Path) -> list[dict[str, Any]]:
    from astropy.table import Table

    table = Table.read(path, format="ascii.ecsv")
    rows = []
    for row in table:
        rows.append({name: _plain(row[name]) for name in table.colnames})
    return rows


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bytes):
        value = value.decode()
    return value


def _candidate_table(rows: list[dict[str, Any]]) -> None:
    shown = sorted(rows, key=lambda r: -abs(r.get("snr") or 0.0))[:TABLE_ROWS]
    columns = ("candidate_id", "ra", "dec", "snr", "flux", "flags", "passed", "rb_score")
    table = [
        {
            c: (round(r[c], 6) if isinstance(r.get(c), float) else r.get(c))
            for c in columns
            if c in r
        }
        for r in shown
    ]
    publish(
        functools.partial(
            create_table_artifact,
            table,
            key="candidates",
            description=f"{len(rows)} candidates; the {len(table)} with the largest |S/N|",
        )
    )


def _link(step: Step, report_uri: str) -> None:
    publish(
        functools.partial(
            create_link_artifact,
            report_uri,
            link_text=f"{step.name} report",
            key=f"report-{step.name}",
            description=f"Executed {step.notebook}",
        )
    )


# -- flow-run records ----------------------------------------------------------------


def _record_run(
    catalogue: Catalogue,
    run_id: str | None,
    flow_type: FlowType,
    parameters: Any,
    observation_id: uuid.UUID | None,
    parent_id: str | None = None,
) -> None:
    if run_id is None:
        return
    catalogue.record_flow_run(
        run_id,
        flow_type,
        status=FlowState.RUNNING,
        parameters=_jsonable(parameters),
        observation_id=observation_id,
        parent_id=parent_id,
    )
    catalogue.update_flow_run(run_id, status=FlowState.RUNNING, started_at=utcnow())


def _record_run_observation(
    catalogue: Catalogue, run_id: str | None, observation_id: uuid.UUID
) -> None:
    if run_id is not None:
        catalogue.update_flow_run(run_id, observation_id=observation_id)


def _finish_run(
    catalogue: Catalogue,
    run_id: str | None,
    error: BaseException | None,
    metrics: dict[str, Any],
    *,
    observation: uuid.UUID | None = None,
    attempts: int | None = None,
) -> None:
    if run_id is None:
        return
    changes: dict[str, Any] = {"ended_at": utcnow(), "metrics": _jsonable(metrics)}
    if error is None:
        changes.update(status=FlowState.COMPLETED, progress=1.0, current_step=None)
    elif isinstance(error, Exception) and not _is_cancel(error):
        changes.update(status=FlowState.FAILED, error_message=str(error)[:4000])
    else:
        changes.update(status=FlowState.CANCELLED, error_message=str(error)[:4000] or "cancelled")
    if observation is not None:
        changes["observation_id"] = observation
    if attempts is not None:
        changes["attempts"] = attempts
    with contextlib.suppress(CatalogueError):
        catalogue.update_flow_run(run_id, **changes)


def _is_cancel(exc: BaseException) -> bool:
    """Whether a failure is a cancellation (of this run, or of a subflow it ran)."""
    from prefect.exceptions import CancelledRun, TerminationSignal

    return isinstance(exc, NotebookCancelledError | CancelledRun | TerminationSignal)


def _parent_run_id() -> str | None:
    context = pipeline_context()
    return context.run_id if context is not None else None


def _pipeline_summary(observation_id: uuid.UUID | None, results: dict[str, dict]) -> dict:
    validation = results.get("validation", {})
    metrics = validation.get("metrics", {})
    return {
        "observation_id": str(observation_id),
        "status": "completed",
        "steps": {
            name: {k: r[k] for k in ("cached", "report", "attempts", "durations")}
            for name, r in results.items()
        },
        "reports": {name: r["report"] for name, r in results.items()},
        "candidates": validation.get("products", {}).get("candidates"),
        "rb_model": validation.get("outputs", {}).get("rb_model"),
        "drift": validation.get("outputs", {}).get("drift"),
        "metrics": {
            "candidates": metrics,
            "steps_cached": sum(r["cached"] for r in results.values()),
        },
    }


def _export(
    config: WorkflowConfig, catalogue: Catalogue, observation_id: uuid.UUID, output_dir: Path
) -> dict[str, str]:
    """Copy the candidate catalogue and each step's latest report into ``output_dir``."""
    store = ArtifactStore(config.storage_config)
    observation = catalogue.get_observation(observation_id)
    written: dict[str, str] = {}
    reports_dir = output_dir / "reports"
    reports_dir.mkdir(parents=True, exist_ok=True)
    for name in STEP_ORDER:
        state = (observation.steps or {}).get(name, {})
        if state.get("status") == "completed" and state.get("report"):
            target = reports_dir / f"{name}.html"
            uri = state["report"]
        elif state.get("reports"):
            uri = state["reports"][-1].get("html")
            target = reports_dir / f"{name}.{state['status']}.html"
        else:
            continue
        if uri:
            download(store, uri, target)
            written[f"report:{name}"] = str(target)
    found = catalogue.products(observation_id, kind="candidates")
    if found and (observation.steps or {}).get("validation", {}).get("status") == "completed":
        target = output_dir / "candidates.ecsv"
        download(store, found[-1].uri, target)
        written["candidates"] = str(target)
    return written


def _force(request: ObservationRequest) -> bool:
    context = pipeline_context()
    return request.force or bool(context and context.force)


def _as_str(paths: dict[str, Path]) -> dict[str, str]:
    return {name: str(path) for name, path in paths.items()}


def _first_line(text: Any) -> str:
    return str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""


def _jsonable(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))
