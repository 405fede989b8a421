"""Run observation pipelines from this process: one pair, or a night's manifest at once.

Each observation runs ``observation_pipeline_flow`` in its own thread. A thread takes
a slot of the ``max_concurrent_flows`` limit *before* its flow run is created, so
Prefect never shows more than that many observation pipelines running.
"""

from __future__ import annotations

import csv
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import WorkflowConfig, get_config
from pipeline.errors import ObservationDataError
from pipeline.flows.steps import HEADER_OVERRIDES, OBSERVATION_KEYS

__all__ = ["ObserveOutcome", "read_manifest", "run_observations"]

#: Most observations started from one process at once (each waits for a slot).
MAX_THREADS = 32

ProgressCallback = Callable[[str, float, str | None], None]


@dataclass
class ObserveOutcome:
    """How one observation's pipeline run ended."""

    name: str
    observation_data: dict[str, Any]
    state: str
    flow_run_id: str | None
    result: dict[str, Any] | None
    error: str | None
    seconds: float


def read_manifest(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """Read a night manifest: a CSV with ``science_path`` and ``reference_path`` columns.

    Optional columns are ``name`` and any other ``observation_data`` key; empty cells
    are left out and relative paths are taken from the manifest's folder.

    Raises
    ------
    ObservationDataError
        Naming the manifest row and column at fault.
    """
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise ObservationDataError(f"cannot read manifest {path}: {exc}") from exc
    if not rows:
        raise ObservationDataError(f"manifest {path} has no rows")
    columns = set(rows[0])
    allowed = set(OBSERVATION_KEYS) | {"name"}
    unknown = sorted(columns - allowed)
    if unknown:
        raise ObservationDataError(
            f"manifest {path} has unknown column(s) {', '.join(unknown)}; "
            f"allowed: name, {', '.join(OBSERVATION_KEYS)}"
        )
    missing = {"science_path", "reference_path"} - columns
    if missing:
        raise ObservationDataError(f"manifest {path} lacks column(s) {', '.join(sorted(missing))}")
    items = []
    names: set[str] = set()
    for number, row in enumerate(rows, start=2):
        data: dict[str, Any] = {}
        for key, value in row.items():
            if key == "name" or value is None or not value.strip():
                continue
            data[key] = _cell(path, number, key, value.strip())
        name = (row.get("name") or "").strip() or f"row-{number - 1:03d}"
        if name in names:
            raise ObservationDataError(f"manifest {path} line {number}: name {name!r} repeats")
        names.add(name)
        items.append((name, data))
    return items


def _cell(path: Path, line: int, key: str, value: str) -> Any:
    if key.endswith("_path") or key == "output_dir":
        resolved = Path(value).expanduser()
        return str(resolved if resolved.is_absolute() else (path.parent / resolved).resolve())
    if key in HEADER_OVERRIDES and key != "band":
        try:
            return float(value)
        except ValueError:
            raise ObservationDataError(
                f"manifest {path} line {line}: {key} must be a number, got {value!r}"
            ) from None
    if key == "force":
        return value.lower() in ("1", "true", "yes")
    return value


def run_observations(
    items: list[tuple[str, dict[str, Any]]],
    *,
    config: WorkflowConfig | None = None,
    on_progress: ProgressCallback | None = None,
) -> list[ObserveOutcome]:
    """Run the pipeline for every item concurrently, within ``max_concurrent_flows``.

    Parameters
    ----------
    items : list of (name, observation_data)
    config : WorkflowConfig, optional
    on_progress : callable, optional
        ``on_progress(name, progress, current_step)`` as each pipeline advances.

    Returns
    -------
    list of ObserveOutcome
        In the order of ``items``; failures are reported, not raised.
    """
    from pipeline.flows.observations import observation_pipeline_flow
    from pipeline.flows.runtime import progress_hook
    from pipeline.workflow.concurrency import ensure_limit, observation_slot
    from pipeline.workflow.heartbeats import prompt_heartbeats

    config = config or get_config()
    ensure_limit(config.max_concurrent_flows)
    flow = observation_pipeline_flow.with_options(timeout_seconds=config.flow_timeout)
    cancel = threading.Event()

    def one(name: str, data: dict[str, Any]) -> ObserveOutcome:
        began = time.perf_counter()
        if on_progress is not None:
            progress_hook.set(lambda p, step: on_progress(name, p, step))
        try:
            with observation_slot(config.max_concurrent_flows):
                if cancel.is_set():
                    raise KeyboardInterrupt
                with prompt_heartbeats():
                    state = flow(dict(data), return_state=True)
        except Exception as exc:  # the slot could not be taken, or the flow did not start
            return ObserveOutcome(
                name, data, "FAILED", None, None, str(exc), time.perf_counter() - began
            )
        run_id = state.state_details.flow_run_id
        result = error = None
        if state.is_completed():
            result = state.result()
        else:
            try:
                state.result()
            except BaseException as exc:
                error = str(exc) or type(exc).__name__
            error = error or state.message
        return ObserveOutcome(
            name,
            data,
            state.type.value,
            str(run_id) if run_id else None,
            result,
            error,
            time.perf_counter() - began,
        )

    workers = max(1, min(len(items), MAX_THREADS))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="astr-observe") as pool:
        futures = [pool.submit(one, name, data) for name, data in items]
        try:
            return [future.result() for future in futures]
        except BaseException:
            cancel.set()
            for future in futures:
                future.cancel()
            raise
