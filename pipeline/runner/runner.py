"""Run one notebook as one unit of work: parameters, retries, timeouts, reports, cache.

``NotebookRunner.run`` injects the parameters (papermill's way), gives the notebook a
fresh ``output_dir`` per attempt, executes it in a kernel from the warm pool (inside
:func:`kernel_session`, in the kernel the previous notebook completed in), keeps
every attempt's executed notebook and its HTML rendering (marked if it did not
complete), and returns a ``NotebookResult`` with the notebook's ``outputs.json``.

Kernel death, timeouts and transient errors are retried with exponential backoff and
jitter, up to ``retry_attempts`` more times; an exception raised by the notebook's
own code fails at once with the cell's source, the error and its traceback.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nbformat
from papermill.parameterize import parameterize_notebook

from pipeline.errors import (
    KernelDiedError,
    NotebookCancelledError,
    NotebookCellError,
    NotebookError,
    NotebookTimeoutError,
)
from pipeline.runner.cache import RunCache, cache_key, directory_checksums
from pipeline.runner.execute import ProgressCallback, TextCallback, execute_attempt
from pipeline.runner.kernels import Kernel, KernelPool, start_kernel
from pipeline.runner.reports import mark_notebook, write_report_shielded
from pipeline.store.storage import sha256_file

__all__ = [
    "Attempt",
    "KernelSession",
    "NotebookResult",
    "NotebookRunner",
    "backoff_delay",
    "kernel_session",
]

OUTPUTS_FILE = "outputs.json"
#: After a kernel dies, how long to wait for a cancel request that explains it (seconds).
CANCEL_GRACE = 1.0
# Retry jitter from a private generator: never the global `random` state a seeded run uses.
_JITTER = random.Random()


class KernelSession:
    """One kernel shared by a sequence of notebooks: the steps of one pipeline run.

    Each notebook after the first runs in the kernel the previous one completed in,
    cleared in between (:data:`~pipeline.runner.execute.RESET_CODE`: no figure, no
    name, no execution count left), so the science stack is imported once per run
    instead of once per notebook. A kernel whose notebook did not complete (a failed
    cell, a timeout, a cancel, a death) is never reused: the next notebook, or the
    retry, gets a fresh one. Different sessions (different runs) never share a kernel.
    """

    def __init__(self) -> None:
        self._kernel: Kernel | None = None
        self._lock = threading.Lock()

    def take(self) -> Kernel | None:
        """The kept kernel, if it is still alive (it is then this caller's)."""
        with self._lock:
            kernel, self._kernel = self._kernel, None
        if kernel is not None and not kernel.is_alive():
            kernel.kill()
            return None
        return kernel

    def keep(self, kernel: Kernel) -> None:
        """Keep a cleared kernel for the next notebook (one at most: a second is killed)."""
        with self._lock:
            spare, self._kernel = self._kernel, kernel
        if spare is not None:
            spare.kill(wait=False)

    def close(self) -> None:
        """Kill the kept kernel."""
        with self._lock:
            kernel, self._kernel = self._kernel, None
        if kernel is not None:
            kernel.kill(wait=False)


_SESSION: contextvars.ContextVar[KernelSession | None] = contextvars.ContextVar(
    "astr_kernel_session", default=None
)


@contextlib.contextmanager
def kernel_session() -> Iterator[KernelSession]:
    """Run the notebooks started inside the block in one kernel (see :class:`KernelSession`)."""
    session = KernelSession()
    token = _SESSION.set(session)
    try:
        yield session
    finally:
        _SESSION.reset(token)
        session.close()


@dataclass(frozen=True)
class Attempt:
    """One attempt at a notebook and where its executed notebook and report are."""

    number: int
    status: str
    notebook: Path
    html: Path
    started_at: datetime
    seconds: float
    kernel_seconds: float
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "number": self.number,
            "status": self.status,
            "notebook": str(self.notebook),
            "html": str(self.html),
            "started_at": self.started_at.isoformat(),
            "seconds": round(self.seconds, 4),
            "kernel_seconds": round(self.kernel_seconds, 4),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Attempt:
        """Inverse of ``to_dict``."""
        return cls(
            number=int(data["number"]),
            status=str(data["status"]),
            notebook=Path(data["notebook"]),
            html=Path(data["html"]),
            started_at=datetime.fromisoformat(data["started_at"]),
            seconds=float(data["seconds"]),
            kernel_seconds=float(data["kernel_seconds"]),
            error=data.get("error"),
        )


@dataclass(frozen=True)
class NotebookResult:
    """What a successful notebook run gives back.

    Attributes
    ----------
    notebook : str
        Name of the notebook (file stem).
    outputs : dict
        The notebook's ``outputs.json``.
    output_dir : Path
        Where the notebook wrote its products.
    attempts : tuple of Attempt
        Every attempt, the successful one last.
    cached : bool
        True when an earlier identical run was reused and nothing was executed.
    cache_key : str
        Hash of notebook bytes, parameters and input checksums.
    durations : dict
        ``wall`` (this call), ``kernel`` (time in cells), ``overhead`` (the rest:
        kernel hand-over, injection, reports, cache), ``report`` and ``kernel_wait``.
    files : dict
        sha256 of every file under ``output_dir`` by relative path (hashed once, here,
        so whoever stores the products need not read them again).
    """

    notebook: str
    outputs: dict[str, Any]
    output_dir: Path
    attempts: tuple[Attempt, ...]
    cached: bool
    cache_key: str
    durations: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def executed_notebook(self) -> Path:
        """The successful attempt's executed notebook."""
        return self.attempts[-1].notebook

    @property
    def html_report(self) -> Path:
        """The successful attempt's HTML report."""
        return self.attempts[-1].html

    @property
    def executed_notebook_uri(self) -> str:
        """``file://`` URI of the executed notebook."""
        return self.executed_notebook.resolve().as_uri()

    @property
    def html_report_uri(self) -> str:
        """``file://`` URI of the HTML report."""
        return self.html_report.resolve().as_uri()

    @property
    def attempt_count(self) -> int:
        """Number of attempts this result took (those of the original run if cached)."""
        return len(self.attempts)


def backoff_delay(
    attempt: int, base: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before attempt ``attempt + 1``: exponential with full-range jitter.

    ``base * 2**(attempt-1)``, capped at ``maximum``, times a random factor in [0.5, 1.5).
    """
    rng = rng or _JITTER
    return min(maximum, base * 2 ** (attempt - 1)) * (0.5 + rng.random())


class NotebookRunner:
    """Executes notebooks with retries, timeouts, reports and a result cache.

    Parameters
    ----------
    work_dir : Path
        Runs are kept under ``work_dir/<notebook>/<run id>/attempt-<n>/``.
    retry_attempts : int
        Retries after the first attempt for kernel death, timeouts and transient errors.
    notebook_timeout : float or None
        Seconds one attempt of a whole notebook may take.
    cell_timeout : float or None
        Seconds one cell may take.
    backoff, backoff_max : float
        First retry delay and its cap (seconds); jittered.
    pool : KernelPool or None
        Warm kernels; without one each attempt starts a kernel (and imports cold).
    cache_dir : Path or None
        Where cache entries live; None disables the cache.
    """

    def __init__(
        self,
        work_dir: Path,
        *,
        retry_attempts: int = 2,
        notebook_timeout: float | None = None,
        cell_timeout: float | None = None,
        backoff: float = 1.0,
        backoff_max: float = 30.0,
        pool: KernelPool | None = None,
        cache_dir: Path | None = None,
        kernel_name: str = "python3",
    ) -> None:
        if retry_attempts < 0:
            raise ValueError(f"retry_attempts must be >= 0, got {retry_attempts}")
        self.work_dir = Path(work_dir)
        self.retry_attempts = retry_attempts
        self.notebook_timeout = notebook_timeout
        self.cell_timeout = cell_timeout
        self.backoff = backoff
        self.backoff_max = backoff_max
        self.pool = pool
        self.cache = RunCache(Path(cache_dir)) if cache_dir is not None else None
        self.kernel_name = kernel_name

    def run(
        self,
        notebook: str | Path,
        parameters: Mapping[str, Any] | None = None,
        *,
        inputs: Mapping[str, str | Path] | None = None,
        input_checksums: Mapping[str, str] | None = None,
        force: bool = False,
        timeout: float | None = None,
        cancel_event: threading.Event | None = None,
        on_text: TextCallback | None = None,
        on_progress: ProgressCallback | None = None,
        on_attempt: Callable[[Attempt], None] | None = None,
    ) -> NotebookResult:
        """Run a notebook to completion, or raise.

        Parameters
        ----------
        notebook : path
            The ``.ipynb`` file.
        parameters : mapping, optional
            Values for the notebook's parameters (``output_dir`` is set by the runner).
        inputs : mapping, optional
            Input files by name; their checksums join the cache key.
        input_checksums : mapping, optional
            sha256 of some inputs by name, when the caller knows them already (files
            from the artifact store, which never change); the others are hashed here.
        force : bool
            Run even if an identical earlier run is cached.
        timeout : float, optional
            Per-notebook limit for this call (default: ``notebook_timeout``).
        cancel_event : threading.Event, optional
            Set it to stop the run; raises NotebookCancelledError.
        on_text, on_progress : callable, optional
            Live cell output and per-cell progress (see ``execute_attempt``).
        on_attempt : callable, optional
            Called with each finished attempt (its report already written).

        Returns
        -------
        NotebookResult

        Raises
        ------
        NotebookCellError
            A cell raised (not retried unless the error is transient).
        NotebookTimeoutError, KernelDiedError
            The last attempt timed out or lost its kernel.
        NotebookCancelledError
            ``cancel_event`` was set.
        """
        began = time.perf_counter()
        path = Path(notebook)
        try:
            notebook_bytes = path.read_bytes()
            source = nbformat.reads(notebook_bytes.decode("utf-8"), as_version=4)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise NotebookError(f"cannot read notebook {path}: {exc}") from exc
        params = dict(parameters or {})
        known = input_checksums or {}
        checksums = {
            name: known.get(name) or sha256_file(file) for name, file in (inputs or {}).items()
        }
        key = cache_key(notebook_bytes, params, checksums)
        if self.cache is not None and not force:
            hit = self.cache.lookup(key)
            if hit is not None:
                return _from_cache(path.stem, key, hit, time.perf_counter() - began)

        run_dir = self.work_dir / path.stem / _run_id()
        limit = timeout if timeout is not None else self.notebook_timeout
        attempts: list[Attempt] = []
        kernel_total = report_total = wait_total = 0.0
        max_attempts = 1 + self.retry_attempts
        for number in range(1, max_attempts + 1):
            if cancel_event is not None and cancel_event.is_set():
                raise NotebookCancelledError(
                    f"{path.name}: cancelled before attempt {number}", attempts=tuple(attempts)
                )
            attempt_dir = run_dir / f"attempt-{number}"
            output_dir = attempt_dir / "output"
            output_dir.mkdir(parents=True)
            nb = parameterize_notebook(
                _with_tags(source), {**params, "output_dir": str(output_dir)}
            )
            started_at = datetime.now(UTC)
            t0 = time.perf_counter()
            session = _SESSION.get()
            interrupt: BaseException | None = None
            try:
                kernel = self._kernel(session)
            except KernelDiedError as exc:
                outcome_status, message, retryable, kseconds = "kernel_died", str(exc), True, 0.0
                outcome = None
            except BaseException as exc:  # stopped while waiting for a kernel: record it
                if isinstance(exc, Exception):
                    raise
                outcome_status, retryable, kseconds = "cancelled", False, 0.0
                message = f"the run was stopped before the notebook started ({type(exc).__name__})"
                outcome, interrupt = None, exc
            else:
                wait_total += time.perf_counter() - t0
                deadline = time.monotonic() + limit if limit else None
                outcome = execute_attempt(
                    nb,
                    kernel,
                    cwd=path.parent.resolve(),
                    cell_timeout=self.cell_timeout,
                    deadline=deadline,
                    cancel_event=cancel_event,
                    on_text=on_text,
                    on_progress=on_progress,
                    keep=session is not None,
                )
                if outcome.kept and session is not None:
                    session.keep(kernel)
                outcome_status, message = outcome.status, outcome.message
                retryable, kseconds = outcome.retryable, outcome.kernel_seconds
                nb = outcome.notebook
                if outcome_status == "kernel_died" and cancel_event is not None:
                    # The kernel may have gone down because the run is being cancelled
                    # (the orchestrator can stop it before we hear of the cancel).
                    try:
                        cancelled = cancel_event.wait(CANCEL_GRACE)
                    except BaseException as exc:  # stopped while waiting: record, re-raise
                        cancelled, outcome.interrupt = True, exc
                    if cancelled:
                        outcome_status, retryable = "cancelled", False
                        message = "the run was cancelled and its kernel stopped"
            outputs: dict[str, Any] | None = None
            if outcome_status == "completed":
                outputs, message = _read_outputs(output_dir)
                if outputs is None:
                    outcome_status, retryable = "failed", False
            kernel_total += kseconds
            suffix = "" if outcome_status == "completed" else f".{outcome_status}"
            record = Attempt(
                number=number,
                status=outcome_status,
                notebook=attempt_dir / f"{path.stem}{suffix}.ipynb",
                html=attempt_dir / f"{path.stem}{suffix}.html",
                started_at=started_at,
                seconds=time.perf_counter() - t0,
                kernel_seconds=kseconds,
                error=message,
            )
            t_report = time.perf_counter()
            mark_notebook(
                nb,
                status=outcome_status,
                attempt=number,
                info={
                    "error": message,
                    "parameters": params,
                    "started_at": started_at.isoformat(),
                    "seconds": round(record.seconds, 3),
                },
            )
            stopped = write_report_shielded(nb, record.notebook, record.html)
            report_total += time.perf_counter() - t_report
            attempts.append(record)
            if on_attempt is not None:
                on_attempt(record)
            pending = interrupt or (outcome.interrupt if outcome else None) or stopped
            if pending is not None:
                raise pending
            if outputs is not None:
                wall = time.perf_counter() - began
                result = NotebookResult(
                    notebook=path.stem,
                    outputs=outputs,
                    output_dir=output_dir,
                    attempts=tuple(attempts),
                    cached=False,
                    cache_key=key,
                    durations={
                        "wall": wall,
                        "kernel": kernel_total,
                        "overhead": max(wall - kernel_total, 0.0),
                        "report": report_total,
                        "kernel_wait": wait_total,
                    },
                    files=directory_checksums(output_dir),
                )
                if self.cache is not None:
                    self.cache.store(key, _cache_entry(result))
                return result
            error = _error_for(outcome_status, path.name, number, max_attempts, message)
            if outcome_status == "cancelled" or not retryable or number == max_attempts:
                error.attempts = tuple(attempts)
                raise error
            delay = backoff_delay(number, self.backoff, self.backoff_max)
            if cancel_event is not None and cancel_event.wait(delay):
                raise NotebookCancelledError(
                    f"{path.name}: cancelled while waiting to retry", attempts=tuple(attempts)
                )
            if cancel_event is None:
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover

    def _kernel(self, session: KernelSession | None = None) -> Kernel:
        kept = session.take() if session is not None else None
        if kept is not None:
            return kept
        if self.pool is not None:
            return self.pool.acquire()
        return start_kernel(self.kernel_name)


def _with_tags(source: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """A copy of the notebook with the metadata papermill expects (tags on every cell)."""
    nb = nbformat.from_dict(source)
    nb.metadata.setdefault("papermill", {})
    for cell in nb.cells:
        cell.metadata.setdefault("tags", [])
    return nb


def _error_for(
    status: str, name: str, number: int, max_attempts: int, message: str | None
) -> NotebookError:
    where = f"{name} (attempt {number} of {max_attempts})"
    if status == "cancelled":
        return NotebookCancelledError(f"{where}: {message}")
    if status == "timed_out":
        return NotebookTimeoutError(f"{where} timed out: {message}")
    if status == "kernel_died":
        return KernelDiedError(f"{where}: {message}")
    return NotebookCellError(f"{where} failed: {message}")


def _read_outputs(output_dir: Path) -> tuple[dict[str, Any] | None, str | None]:
    path = output_dir / OUTPUTS_FILE
    try:
        outputs = json.loads(path.read_text())
    except FileNotFoundError:
        return None, (
            f"the notebook finished without writing {OUTPUTS_FILE} to its output_dir; "
            "every notebook must write it (see the notebook contract)"
        )
    except ValueError as exc:
        return None, f"{path} is not valid JSON: {exc}"
    if not isinstance(outputs, dict):
        return None, f"{path} must hold a JSON object, got {type(outputs).__name__}"
    return outputs, None


def _cache_entry(result: NotebookResult) -> dict[str, Any]:
    return {
        "notebook": result.notebook,
        "outputs": result.outputs,
        "output_dir": str(result.output_dir),
        "files": result.files,
        "executed_notebook": str(result.executed_notebook),
        "html_report": str(result.html_report),
        "attempts": [attempt.to_dict() for attempt in result.attempts],
        "durations": result.durations,
        "stored_at": datetime.now(UTC).isoformat(),
    }


def _from_cache(name: str, key: str, entry: Mapping[str, Any], wall: float) -> NotebookResult:
    return NotebookResult(
        notebook=name,
        outputs=dict(entry["outputs"]),
        output_dir=Path(entry["output_dir"]),
        attempts=tuple(Attempt.from_dict(a) for a in entry["attempts"]),
        cached=True,
        cache_key=key,
        durations={"wall": wall, "kernel": 0.0, "overhead": wall, "report": 0.0},
        files=dict(entry.get("files", {})),
    )


def _run_id() -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
