"""What the benchmarks that need Prefect share: a temporary home and a local server."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any


def start_local_prefect(prefix: str, *, console_level: str = "WARNING", **env: str) -> Any:
    """Point this process at a fresh project home and start a local Prefect server there.

    Sets ``ASTR_HOME``, ``PREFECT_HOME`` and ``env`` in the environment (children
    inherit them), starts the server on a free loopback port and makes it the one this
    process and its children use. The caller stops it (``server.stop_server()``).

    Returns
    -------
    root : Path
        The temporary directory holding the home (``root / "home"``).
    server : PrefectServer
    """
    root = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ["ASTR_HOME"] = str(root / "home")
    os.environ["PREFECT_HOME"] = str(root / "prefect-client")
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", console_level)
    os.environ.update(env)

    from pipeline.config import get_config
    from pipeline.workflow.prefect_server import PrefectServer, use_server

    server = PrefectServer(get_config())
    server.start_server("127.0.0.1", 0)
    os.environ["ASTR_PREFECT_SERVER_URL"] = server.api_url
    get_config.cache_clear()
    use_server(server.api_url)
    return root, server


def free_port() -> int:
    """A loopback TCP port nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
