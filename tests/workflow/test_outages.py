"""Prefect clients made inside a flow process ride out a server that refuses connections."""

from __future__ import annotations

import http.server
import threading
import time

import httpx
import pytest
from procs import free_port


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"true"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def _serve_later(port: int, delay: float) -> http.server.ThreadingHTTPServer:
    """Answer on ``port`` from ``delay`` seconds on (refused until then)."""
    holder: dict = {}

    def run() -> None:
        time.sleep(delay)
        holder["server"] = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Health)
        holder["server"].serve_forever()

    threading.Thread(target=run, daemon=True).start()
    return holder


def _get(port: int) -> int:
    from prefect.client.base import PrefectHttpxSyncClient

    with PrefectHttpxSyncClient(base_url=f"http://127.0.0.1:{port}") as client:
        return client.get("/api/health").status_code


@pytest.fixture
def _unpatched_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """Undo the process-wide patch when the test ends (other tests want Prefect's own)."""
    from prefect.client.base import PrefectHttpxAsyncClient, PrefectHttpxSyncClient

    for cls in (PrefectHttpxAsyncClient, PrefectHttpxSyncClient):
        monkeypatch.setattr(cls, "__init__", cls.__init__)
        monkeypatch.setattr(cls, "_astr_retries_refused_connections", False, raising=False)


@pytest.mark.usefixtures("_unpatched_afterwards")
def test_a_new_client_retries_a_refused_connection():
    from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings

    port = free_port()
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 3}):
        with pytest.raises(httpx.ConnectError):  # Prefect's own behaviour: fail at once
            _get(port)

        from pipeline.workflow.outages import retry_refused_connections

        retry_refused_connections()
        retry_refused_connections()  # idempotent
        holder = _serve_later(port, 1.0)
        try:
            began = time.monotonic()
            assert _get(port) == 200  # refused, then answered after a backoff
            assert time.monotonic() - began >= 1.0
        finally:
            if "server" in holder:
                holder["server"].shutdown()
                holder["server"].server_close()
