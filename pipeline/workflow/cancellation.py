"""Notice that Prefect was asked to cancel a flow run, from inside the run.

A flow served by a worker is stopped by the worker, but one run in-process (``astr
observe``) is not, and a worker may stop the kernel before the flow hears of it. The
watcher polls the states of the given flow runs and sets an event as soon as one is
CANCELLING or CANCELLED; the notebook runner then kills the kernel, keeps the partial
notebook marked cancelled, and does not retry.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterable
from types import TracebackType

__all__ = ["CancelWatcher"]

log = logging.getLogger(__name__)

_CANCEL_TYPES = frozenset({"CANCELLING", "CANCELLED"})


class CancelWatcher:
    """Set ``event`` when any of ``run_ids`` is being cancelled (use as a context manager).

    Parameters
    ----------
    run_ids : iterable of str
        Flow runs to watch (a step's own run and its pipeline's).
    interval : float
        Seconds between polls.
    """

    def __init__(self, run_ids: Iterable[str | None], interval: float = 1.0) -> None:
        self.run_ids = [uuid.UUID(str(r)) for r in run_ids if r]
        self.interval = interval
        self.event = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> CancelWatcher:
        if self.run_ids:
            self._thread = threading.Thread(target=self._watch, name="astr-cancel", daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _watch(self) -> None:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            while not self._stop.wait(self.interval):
                for run_id in self.run_ids:
                    try:
                        state = client.read_flow_run(run_id).state
                    except Exception as exc:  # the server may blink; keep watching
                        log.debug("cancel watcher: %s", exc)
                        continue
                    if state is not None and state.type.value in _CANCEL_TYPES:
                        self.event.set()
                        return
