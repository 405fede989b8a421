"""One attempt at executing a parameterized notebook in a given kernel.

Cell output is handed to a callback as it arrives (so it can be streamed into the
flow run's logs), progress is reported per code cell, and a watchdog enforces the
per-notebook deadline and cancellation by killing the kernel: nbclient then stops
within about a second and the partial notebook is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError, CellTimeoutError, DeadKernelError
from nbclient.util import run_hook

from pipeline.runner.kernels import Kernel, close_client, open_client, wait_until_connected
from pipeline.runner.reports import strip_ansi

__all__ = [
    "RESET_CODE",
    "TRANSIENT_ERRORS",
    "AttemptOutcome",
    "execute_attempt",
    "kernel_seconds",
]

#: Exception names raised inside a cell that are worth retrying (the environment, not the code).
TRANSIENT_ERRORS = frozenset(
    {
        "ConnectionError",
        "ConnectionResetError",
        "ConnectionRefusedError",
        "ConnectionAbortedError",
        "BrokenPipeError",
        "TimeoutError",
        "InterruptedError",
    }
)
_TRANSIENT_MESSAGES = ("database is locked", "temporarily unavailable", "resource busy")

TextCallback = Callable[[int, str], None]
ProgressCallback = Callable[[int, int, int], None]


@dataclass
class AttemptOutcome:
    """How one attempt ended.

    Attributes
    ----------
    status : str
        ``completed``, ``failed`` (a cell raised), ``cancelled``, ``timed_out`` or
        ``kernel_died``.
    notebook : NotebookNode
        The executed notebook, partial unless completed.
    message : str or None
        What went wrong, for the user (cell source, error and traceback for a failed cell).
    retryable : bool
        Whether another attempt could succeed (kernel death, timeouts, transient errors).
    kernel_seconds : float
        Time the kernel spent executing cells.
    cells_done, cells_total : int
        Code cells finished, and in the notebook.
    interrupt : BaseException or None
        A termination signal or interrupt that arrived during the run; the caller
        re-raises it after recording the attempt.
    kept : bool
        Whether the kernel was kept, cleared, for another notebook (``keep=True``).
    """

    status: str
    notebook: nbformat.NotebookNode
    message: str | None = None
    retryable: bool = False
    kernel_seconds: float = 0.0
    cells_done: int = 0
    cells_total: int = 0
    interrupt: BaseException | None = None
    kept: bool = False


class _AttemptLoop(asyncio.SelectorEventLoop):
    """An event loop that leaves the process's signal handlers as they are.

    nbclient puts its own SIGINT and SIGTERM handlers on the loop while a notebook runs
    (they only close the kernel), and removing them afterwards leaves SIGTERM at the
    system default, not at the handler the process had. In a flow run that handler is
    Prefect's, which turns a cancel's SIGTERM into an exception the run can record; without
    it the cancel could not be acknowledged and the worker's SIGTERM killed the process
    outright, losing the interrupted notebook. nbclient treats the ``RuntimeError`` raised
    here as "no signals on this loop" (what it gets outside the main thread).
    """

    def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
        """Refuse: signals stay with the process's own handlers."""
        raise RuntimeError("signal handlers stay with the process, not the notebook's loop")

    def remove_signal_handler(self, sig: int) -> bool:
        """Refuse, as :meth:`add_signal_handler` (nothing was added)."""
        raise RuntimeError("signal handlers stay with the process, not the notebook's loop")


class _StreamingClient(NotebookClient):  # type: ignore[misc]
    """nbclient's client with live output, per-cell progress and a working directory."""

    async def async_start_new_kernel_client(self) -> Any:
        """Connect to the (already started) kernel without a heartbeat thread."""
        self.kc = open_client(self.km)
        try:
            await wait_until_connected(self.kc, self.km, timeout=self.startup_timeout)
        except BaseException:
            close_client(self.kc)
            self.kc = None
            raise
        self.kc.allow_stdin = False
        await run_hook(self.on_notebook_start, notebook=self.nb)
        return self.kc

    def output(
        self, outs: list[Any], msg: dict[str, Any], display_id: str | None, cell_index: int
    ) -> Any:
        out = super().output(outs, msg, display_id, cell_index)
        callback: TextCallback | None = getattr(self, "astr_on_text", None)
        if callback is not None:
            kind = msg["msg_type"]
            content = msg.get("content", {})
            if kind == "stream":
                callback(cell_index, content.get("text", ""))
            elif kind == "error":
                callback(cell_index, f"{content.get('ename')}: {content.get('evalue')}\n")
        return out


def execute_attempt(
    nb: nbformat.NotebookNode,
    kernel: Kernel,
    *,
    cwd: Path,
    cell_timeout: float | None,
    deadline: float | None,
    cancel_event: threading.Event | None = None,
    on_text: TextCallback | None = None,
    on_progress: ProgressCallback | None = None,
    keep: bool = False,
) -> AttemptOutcome:
    """Execute every cell of ``nb`` in ``kernel``; the kernel is killed afterwards.

    With ``keep``, a kernel whose notebook completed is left running, its namespace
    cleared (see :data:`RESET_CODE`), for the caller's next notebook; ``outcome.kept``
    says whether it was.

    Parameters
    ----------
    nb : NotebookNode
        Parameterized notebook; executed in place.
    kernel : Kernel
        A fresh kernel, used for this notebook only.
    cwd : Path
        Working directory of the notebook's code.
    cell_timeout : float or None
        Seconds one cell may run.
    deadline : float or None
        ``time.monotonic()`` after which the whole notebook is stopped.
    cancel_event : threading.Event, optional
        Set it to stop the run (the kernel is killed at once).
    on_text : callable, optional
        ``on_text(cell_index, text)`` for each piece of stream output, as it arrives.
    on_progress : callable, optional
        ``on_progress(done, total, cell_index)`` at the start and end of each code cell.
    keep : bool
        Keep the kernel, cleared, when the notebook completes.

    Returns
    -------
    AttemptOutcome
    """
    total = sum(cell.cell_type == "code" for cell in nb.cells)
    state = {"done": 0, "cell": -1, "stopped": ""}
    finished = threading.Event()

    client = _StreamingClient(
        nb,
        km=kernel.manager,
        timeout=int(cell_timeout) if cell_timeout else None,
        allow_errors=False,
        record_timing=True,
        raise_on_iopub_timeout=False,
        iopub_timeout=4,
        shutdown_kernel="immediate",
    )
    client.astr_on_text = on_text

    async def on_notebook_start(notebook: nbformat.NotebookNode) -> None:
        msg_id = client.kc.execute(
            f"import os as _o; _o.chdir({str(cwd)!r}); del _o", silent=True, store_history=False
        )
        await client.async_wait_for_reply(msg_id)

    def on_cell_start(cell: nbformat.NotebookNode, cell_index: int) -> None:
        state["cell"] = cell_index
        if on_progress is not None and cell.cell_type == "code":
            on_progress(state["done"], total, cell_index)

    def on_cell_executed(cell: nbformat.NotebookNode, cell_index: int, **_: Any) -> None:
        if cell.cell_type == "code":
            state["done"] += 1
            if on_progress is not None:
                on_progress(state["done"], total, cell_index)

    client.on_notebook_start = on_notebook_start
    client.on_cell_start = on_cell_start
    client.on_cell_executed = on_cell_executed

    def watchdog() -> None:
        while not finished.is_set():
            if cancel_event is not None and cancel_event.is_set():
                state["stopped"] = "cancelled"
            elif deadline is not None and time.monotonic() >= deadline:
                state["stopped"] = "timed_out"
            if state["stopped"]:
                kernel.kill()
                return
            finished.wait(0.05)

    kernel.busy = True
    guard = threading.Thread(target=watchdog, name="astr-notebook-watchdog", daemon=True)
    guard.start()
    outcome: AttemptOutcome
    loop = _AttemptLoop()
    kept = False
    try:
        loop.run_until_complete(client.async_execute())
        outcome = AttemptOutcome("completed", nb)
        if keep:  # a stop that arrives meanwhile is seen below, and the kernel killed
            kept = loop.run_until_complete(_reset(client))
    except CellTimeoutError as exc:
        outcome = AttemptOutcome(
            "timed_out",
            nb,
            f"cell {state['cell']} ran past the per-cell limit of {cell_timeout:g} s: {exc}",
            retryable=True,
        )
    except CellExecutionError as exc:
        if state["stopped"]:
            outcome = _stopped(state["stopped"], nb, deadline)
        else:
            outcome = _cell_failure(nb, state["cell"], exc)
    except DeadKernelError as exc:
        if state["stopped"]:
            outcome = _stopped(state["stopped"], nb, deadline)
        else:
            outcome = AttemptOutcome(
                "kernel_died",
                nb,
                f"the kernel died while running cell {state['cell']}: {exc}",
                retryable=True,
            )
    except BaseException as exc:  # termination signal, KeyboardInterrupt, or a client failure
        if isinstance(exc, Exception) and not state["stopped"]:
            outcome = AttemptOutcome(
                "kernel_died", nb, f"lost the kernel: {type(exc).__name__}: {exc}", retryable=True
            )
        else:
            outcome = _stopped(state["stopped"] or "cancelled", nb, deadline)
            if not isinstance(exc, Exception):
                outcome.interrupt = exc
    finally:
        finished.set()
        guard.join(timeout=1)
        kept = kept and not state["stopped"] and kernel.is_alive()
        if kept:
            kernel.busy = False
        else:
            kernel.kill(wait=False)  # signalled now, reaped in the background
        _close_client(client)
        _close_loop(loop)
    outcome.kernel_seconds = kernel_seconds(nb)
    outcome.cells_done = state["done"]
    outcome.cells_total = total
    outcome.kept = kept
    return outcome


#: Run in a kept kernel after its notebook: the next notebook finds no figure, no name
#: and no execution count of this one. Imported modules stay (that is the point: their
#: import is paid once), and with them whatever state a library keeps at module level.
RESET_CODE = (
    "_m = __import__('sys').modules.get('matplotlib.pyplot')\n"
    "if _m is not None:\n"
    "    _m.close('all')\n"
    "get_ipython().run_line_magic('reset', '-f')\n"
    "__import__('gc').collect()\n"
    "get_ipython().execution_count = 1\n"
)


async def _reset(client: NotebookClient) -> bool:
    """Clear the kernel for another notebook; False if it did not answer ``ok``."""
    try:
        msg_id = client.kc.execute(RESET_CODE, silent=True, store_history=False)
        reply = await asyncio.wait_for(client.async_wait_for_reply(msg_id), 30)
    except Exception:  # a kernel that cannot be cleared is not kept
        return False
    return bool(reply) and reply.get("content", {}).get("status") == "ok"


def _close_client(client: NotebookClient) -> None:
    """Close the client's sockets (nbclient leaves them open for a kernel it does not own)."""
    if client.kc is not None:
        close_client(client.kc)
        client.kc = None


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the attempt's own event loop, then close it."""
    pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in pending:
        task.cancel()
    if pending:
        with contextlib.suppress(BaseException):
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.close()


def _stopped(reason: str, nb: nbformat.NotebookNode, deadline: float | None) -> AttemptOutcome:
    if reason == "timed_out":
        return AttemptOutcome(
            "timed_out", nb, "the notebook ran past its time limit and was stopped", retryable=True
        )
    return AttemptOutcome("cancelled", nb, "the run was cancelled and its kernel stopped")


def _cell_failure(
    nb: nbformat.NotebookNode, cell_index: int, exc: CellExecutionError
) -> AttemptOutcome:
    cell = nb.cells[cell_index] if 0 <= cell_index < len(nb.cells) else None
    source = cell.source if cell is not None else ""
    shown = [
        "\n".join(out.get("traceback", []))
        for out in (cell.get("outputs", []) if cell is not None else [])
        if out.get("output_type") == "error"
    ]
    traceback = strip_ansi(shown[-1] if shown else str(exc.traceback or "")).strip()
    transient = exc.ename in TRANSIENT_ERRORS or any(
        text in str(exc.evalue).lower() for text in _TRANSIENT_MESSAGES
    )
    message = (
        f"cell {cell_index} raised {exc.ename}: {strip_ansi(str(exc.evalue))}\n"
        f"--- cell source ---\n{source}\n--- traceback ---\n{_last_lines(traceback, 40)}"
    )
    return AttemptOutcome("failed", nb, message, retryable=transient)


def _last_lines(text: str, count: int) -> str:
    lines = text.splitlines()
    return "\n".join(lines if len(lines) <= count else ["...", *lines[-count:]])


def kernel_seconds(nb: nbformat.NotebookNode) -> float:
    """Seconds the kernel spent executing cells, from nbclient's timing metadata."""
    total = 0.0
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        began = timing.get("iopub.execute_input")
        ended = timing.get("shell.execute_reply")
        if began and ended:
            delta = _parse(ended) - _parse(began)
            total += max(delta.total_seconds(), 0.0)
    return total


def _parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))
