"""Real local receivers for alert tests: an HTTP endpoint and an SMTP server."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from procs import free_port


@dataclass
class Received:
    """What a receiver got: (path, JSON body, wall-clock receipt time) per request."""

    requests: list[tuple[str, Any, float]] = field(default_factory=list)
    status: int = 200
    arrived: threading.Condition = field(default_factory=threading.Condition)

    def bodies(self, path: str | None = None) -> list[Any]:
        """JSON bodies received (at ``path`` only, when given)."""
        return [body for p, body, _ in self.requests if path is None or p == path]

    def wait_for(self, count: int, timeout: float = 10.0, path: str | None = None) -> list[Any]:
        """Block until ``count`` bodies arrived (at ``path``), or the timeout passed."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.bodies(path)) < count and time.monotonic() < deadline:
                self.arrived.wait(deadline - time.monotonic())
        return self.bodies(path)


@contextmanager
def http_receiver() -> Iterator[tuple[str, Received]]:
    """A JSON-accepting HTTP server on 127.0.0.1; yields (base URL, what it received)."""
    received = Received()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", 0))
            body = json.loads(self.rfile.read(length) or b"null")
            with received.arrived:
                received.requests.append((self.path, body, time.time()))
                received.arrived.notify_all()
            self.send_response(received.status)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", received
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@contextmanager
def smtp_server() -> Iterator[tuple[int, list[Any]]]:
    """An aiosmtpd server on 127.0.0.1; yields (port, envelopes received)."""
    from aiosmtpd.controller import Controller

    envelopes: list[Any] = []

    class Handler:
        async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
            envelopes.append(envelope)
            return "250 OK"

    port = free_port()
    controller = Controller(Handler(), hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield port, envelopes
    finally:
        controller.stop()
