"""Prefect clients that ride out a short outage of the Prefect server (a restart).

Prefect's HTTP clients retry a refused connection (``httpx.ConnectError``, with
``PREFECT_CLIENT_MAX_RETRIES`` backed-off attempts, about a minute by default) only once
that client instance has reached the server, so that a wrong URL fails fast. A flow run
makes new clients all the time: each subflow's engine, each concurrency-slot acquire and
release, our own calls. During a server restart the first request of such a client
fails at once, and the run with it. Inside a running flow the server has been reached
already (the run is RUNNING), so :func:`retry_refused_connections` lets every client the
process makes from then on retry a refused connection like a connected one.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

__all__ = ["retry_refused_connections"]

_LOCK = threading.Lock()
_PATCHED = "_astr_retries_refused_connections"


def retry_refused_connections() -> None:
    """Make Prefect clients created in this process retry refused connections (idempotent).

    Call it once the process has reached the server (inside a flow run): a client
    created afterwards treats ``httpx.ConnectError`` as a transient error, retried with
    backoff (``PREFECT_CLIENT_MAX_RETRIES``), instead of failing on its first request.
    """
    from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient

    with _LOCK:
        for cls in (PrefectHttpxAsyncClient, PrefectHttpxSyncClient):
            if not getattr(cls, _PATCHED, False):
                cls.__init__ = _connected_init(cls.__init__)
                setattr(cls, _PATCHED, True)


def _connected_init(init: Any) -> Any:
    @functools.wraps(init)
    def init_connected(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        self._has_connected = True  # the server was reached: a refusal is an outage

    return init_connected
