"""The Prefect server: configure it, start it, stop it, check its health, point clients at it.

The server runs as ``prefect server start`` in its own process session, so it outlives
the command that started it. Everything it owns lives under ``<home>/prefect/``:

- ``prefect.db``: its SQLite database;
- ``server.log``: its standard output and error (appended, one header line per start);
- ``server.json``: the state file (pid, host, port, url, started_at), written when the
  process is spawned and removed when it is stopped, so another process can stop it;
- ``server.lock``: serialises concurrent starts and stops from the same home.

Before it starts, the server can be given another database (PostgreSQL, checked and
migrated: :meth:`PrefectServer.configure_database`), authentication from environment
variables (:meth:`PrefectServer.setup_authentication`) and a result and artifact store
(:meth:`PrefectServer.configure_storage`); :meth:`PrefectServer.health_check` reports
server, database, worker and storage together.

Starting is idempotent: when this home's server is already recorded, alive and answering
on the requested port, :meth:`PrefectServer.start_server` logs that it reuses it and
returns. A different server answering on the port, or this home's server running on
another port, is an error (one home holds one database, so it runs one server).

This module does not import Prefect at import time; it talks HTTP to the server's health
endpoint with the standard library. :func:`use_server` updates an already-imported
Prefect so that its clients use a new API URL.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import fcntl
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pipeline.config import StorageConfig, WorkflowConfig, get_config, prefect_database_url
from pipeline.errors import AstrError, ServerError
from pipeline.processes import pid_alive, signal_group
from pipeline.workflow import server_config

__all__ = [
    "DEFAULT_START_TIMEOUT",
    "DEFAULT_STOP_TIMEOUT",
    "LEASE_STORAGE",
    "PrefectServer",
    "ServerState",
    "api_url_for",
    "ensure_server",
    "is_healthy",
    "is_loopback",
    "refresh_prefect_settings",
    "tail_lines",
    "use_server",
    "using_server",
]

logger = logging.getLogger(__name__)

DEFAULT_START_TIMEOUT = 60.0
"""Seconds to wait for a new server's health endpoint (a loaded machine takes 15 s or more)."""
DEFAULT_STOP_TIMEOUT = 10.0
"""Seconds between SIGTERM and SIGKILL when stopping the server."""

LEASE_STORAGE = "prefect.server.concurrency.lease_storage.filesystem"
"""Where the server keeps concurrency leases: files that outlive a restart of the server."""

_POLL_INTERVAL = 0.25
_LOG_TAIL_LINES = 40
# Popen objects of servers this process started, so they are reaped (no zombies).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class ServerState:
    """What the state file records about a started server.

    Parameters
    ----------
    pid : int
        Process id of ``prefect server start``; it leads its own process group.
    host : str
        Address the server listens on.
    port : int
        Port the server listens on.
    url : str
        API URL for clients (``http://host:port/api``).
    started_at : str
        ISO 8601 UTC time of the start.
    """

    pid: int
    host: str
    port: int
    url: str
    started_at: str


class PrefectServer:
    """A Prefect server whose files live under ``<home>/prefect/``.

    Parameters
    ----------
    config : WorkflowConfig, optional
        Settings (default: :func:`pipeline.config.get_config`). ``home`` places the
        server's files; ``prefect_server_url`` gives the default host and port;
        ``prefect_database_url`` its database (empty: SQLite under ``home``);
        ``prefect_api_auth_string``, when set, turns on the server's basic auth.
        The ``configure_*`` and ``setup_*`` methods replace parts of it.
    start_timeout : float
        Seconds :meth:`start_server` waits for the health endpoint to answer.
    stop_timeout : float
        Seconds :meth:`stop_server` waits after SIGTERM before it sends SIGKILL.
    """

    def __init__(
        self,
        config: WorkflowConfig | None = None,
        *,
        start_timeout: float = DEFAULT_START_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        self.config = config if config is not None else get_config()
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.directory = Path(self.config.home) / "prefect"
        self.log_path = self.directory / "server.log"
        self.state_path = self.directory / "server.json"
        self._lock_path = self.directory / "server.lock"
        configured = urlsplit(self.config.prefect_server_url)
        self._host = configured.hostname or "127.0.0.1"
        self._port = configured.port or 4200
        # configure_storage() before the server answers: register its block at the start.
        self._results_pending = False

    # -- addresses -------------------------------------------------------------------

    @property
    def host(self) -> str:
        """Host of the recorded server, else of the last start, else of the configured URL."""
        state = self._read_state()
        return state.host if state else self._host

    @property
    def port(self) -> int:
        """Port of the recorded server, else of the last start, else of the configured URL."""
        state = self._read_state()
        return state.port if state else self._port

    @property
    def url(self) -> str:
        """API URL of this server, ``http://host:port/api``."""
        return api_url_for(self.host, self.port)

    @property
    def api_url(self) -> str:
        """API URL for Prefect clients (``PREFECT_API_URL``); the same as :attr:`url`."""
        return self.url

    @property
    def ui_url(self) -> str:
        """Address of the Prefect UI, ``http://host:port``."""
        return self.url.removesuffix("/api")

    @property
    def database_url(self) -> str:
        """SQLAlchemy URL of the server's database (async driver, as Prefect needs).

        ``config.prefect_database_url`` when set, else SQLite at ``<home>/prefect/prefect.db``.
        """
        if self.config.prefect_database_url:
            return self.config.prefect_database_url
        return f"sqlite+aiosqlite:///{self.directory / 'prefect.db'}"

    @property
    def database_path(self) -> Path | None:
        """File of the server's SQLite database; None for PostgreSQL."""
        url = self.database_url
        prefix = "sqlite+aiosqlite:///"
        return Path(url.removeprefix(prefix)) if url.startswith(prefix) else None

    # -- configuration ---------------------------------------------------------------

    def configure_database(self, database_url: str, *, timeout: float = 10.0) -> dict[str, Any]:
        """Use ``database_url`` for the server: validate it, connect, migrate it.

        Parameters
        ----------
        database_url : str
            ``sqlite+aiosqlite:////abs/path.db`` or ``sqlite:////abs/path.db`` (SQLite), or
            ``postgresql+asyncpg://user:password@host:5432/db`` (``postgresql://`` is read
            as asyncpg). The PostgreSQL database must exist; Prefect creates its tables.
        timeout : float
            Seconds to wait for the connection.

        Returns
        -------
        dict
            ``url`` (password masked), ``backend``, ``revision`` (now the newest of the
            installed Prefect), ``upgraded`` (whether migrations ran) and
            ``restart_needed`` (a running server still uses its old database).

        Raises
        ------
        ConfigError
            If the URL is malformed or uses a driver other than the allowed ones.
        ServerError
            If the database cannot be reached within ``timeout`` or its migration fails.
        """
        url = prefect_database_url(database_url, "database_url")
        path = Path(url.removeprefix("sqlite+aiosqlite:///")) if url.startswith("sqlite") else None
        if path is not None:
            with contextlib.suppress(OSError):  # an unusable directory is reported below
                path.parent.mkdir(parents=True, exist_ok=True)
        backend = "sqlite" if path is not None else "postgresql"
        revision = server_config.database_revision(url, timeout)
        head = server_config.head_revision(backend)
        upgraded = revision != head
        if upgraded:
            server_config.upgrade_database(url, self.directory / "migrate-home")
            revision = server_config.database_revision(url, timeout)
            if revision != head:
                raise ServerError(
                    f"the Prefect database {server_config.mask_url(url)} is at revision "
                    f"{revision} after migrating, not {head}: was it migrated by a newer Prefect?"
                )
        restart = self._live_state() is not None and url != self.database_url
        self.config = dataclasses.replace(self.config, prefect_database_url=url)
        if restart:
            logger.warning("the running Prefect server keeps its database until it restarts")
        return {
            "url": server_config.mask_url(url),
            "backend": backend,
            "revision": revision,
            "upgraded": upgraded,
            "restart_needed": restart,
        }

    def setup_authentication(
        self, auth_config: dict[str, Any], *, environ: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Turn authentication on or off, with secrets from environment variables only.

        Parameters
        ----------
        auth_config : dict
            ``enabled`` (default true); ``prefect_auth_string_env``: the variable holding
            the Prefect server's basic-auth ``user:password`` (default
            ``ASTR_PREFECT_API_AUTH_STRING``), which the server requires
            (``PREFECT_SERVER_API_AUTH_STRING``) and clients send
            (``PREFECT_API_AUTH_STRING``); ``api_tokens_env``: the variable holding the
            REST API's comma-separated bearer tokens (default ``ASTR_API_TOKENS``).
            A literal secret in the dict is refused.
        environ : mapping, optional
            Environment to read the variables from (default: this process's).

        Returns
        -------
        dict
            What is now on and where it came from (no secrets), and ``restart_needed``.

        Raises
        ------
        ConfigError
            See :func:`pipeline.workflow.server_config.resolve_auth`.
        """
        auth = server_config.resolve_auth(auth_config, os.environ if environ is None else environ)
        before = self.config.prefect_api_auth_string
        self.config = dataclasses.replace(
            self.config,
            authentication_enabled=auth.enabled,
            prefect_api_auth_string=auth.prefect_auth_string,
            api_tokens=auth.api_tokens,
        )
        restart = self._live_state() is not None and before != auth.prefect_auth_string
        return {**auth.describe(), "restart_needed": restart}

    def configure_storage(self, storage_config: StorageConfig) -> dict[str, Any]:
        """Keep artifacts and Prefect's flow results in ``storage_config``, after checking it.

        The store must pass a write, read, checksum and delete round trip. Flow results
        go to ``<store>/prefect-results`` through a filesystem block named
        ``astr-results`` made the server's default result storage, so every client and
        worker persists there; it is registered now if the server answers, else when
        :meth:`start_server` starts it.

        Parameters
        ----------
        storage_config : StorageConfig
            Local directory or S3 bucket (credentials from ``AWS_*`` variables).

        Returns
        -------
        dict
            ``url``, ``check`` (what the round trip verified), ``results`` (where flow
            results go) and ``registered`` (whether the server already has the block).

        Raises
        ------
        StorageError
            If the round trip fails; the message names the store and what to check.
        ServerError
            If the running server refuses the block.
        """
        check = server_config.storage_round_trip(storage_config)
        self.config = dataclasses.replace(self.config, storage_config=storage_config)
        registered = self.is_healthy(self._client_url())
        if registered:
            self._register_result_storage(self._client_url())
        self._results_pending = not registered
        return {
            "url": storage_config.url,
            "check": check,
            "results": server_config.result_storage_url(storage_config),
            "registered": registered,
        }

    def setup_monitoring(self, monitoring_config: dict) -> dict[str, Any]:
        """Store validated alert routes and say how runs are measured and exported.

        Every pipeline flow measures its runs and reports its failures through Prefect
        state hooks (``pipeline.workflow.monitoring``), so no Prefect automation is
        created: a failure alerts even when the server's event pipeline is behind.

        Parameters
        ----------
        monitoring_config : dict
            ``routes``: alert route tables (``name``, ``channels``, ``flow_types``
            globs, ``min_severity`` and policy keys, see ``pipeline.workflow.alerting``),
            stored in the catalogue beside the ``[alerting]`` routes of the settings;
            ``replace_routes`` (default false): forget stored routes not listed.

        Returns
        -------
        dict
            ``routes`` (alerts can take these now; empty while ``alerting_enabled`` is
            off), ``metrics`` (the Prometheus exporter to serve at ``/metrics``),
            ``hooks``, ``monitoring_enabled``, ``alerting_enabled``.

        Raises
        ------
        ConfigError
            Naming the bad key (``monitoring_config.routes[0].channels[1].url``).
        """
        from pipeline.workflow.monitoring import configure_monitoring

        return configure_monitoring(self.config, monitoring_config)

    def client_environment(self) -> dict[str, str]:
        """Variables that point a worker or the REST API at this server, with its secrets.

        Returns
        -------
        dict
            ``PREFECT_API_URL``, the ``ASTR_*`` settings this object changed (database,
            storage, authentication) and, when set, ``PREFECT_API_AUTH_STRING``,
            ``ASTR_PREFECT_API_AUTH_STRING`` and ``ASTR_API_TOKENS``. Meant for a child
            process's environment, never for a file or a log.
        """
        config = self.config
        storage = config.storage_config
        env = {
            "PREFECT_API_URL": self._client_url(),
            "ASTR_PREFECT_SERVER_URL": self._client_url(),
            "ASTR_AUTHENTICATION_ENABLED": "true" if config.authentication_enabled else "false",
            "ASTR_PREFECT_DATABASE_URL": config.prefect_database_url,
            "ASTR_STORAGE_BACKEND": storage.backend,
        }
        env["ASTR_STORAGE_ROOT"] = storage.url  # a directory, or s3://bucket/prefix
        env["ASTR_STORAGE_OPTIONS"] = json.dumps(storage.options)
        if config.prefect_api_auth_string:
            env["PREFECT_API_AUTH_STRING"] = config.prefect_api_auth_string
            env["ASTR_PREFECT_API_AUTH_STRING"] = config.prefect_api_auth_string
        if config.api_tokens:
            env["ASTR_API_TOKENS"] = ",".join(config.api_tokens)
        return env

    def _client_url(self) -> str:
        """The recorded server's URL, else the configured one (a server started elsewhere)."""
        state = self._read_state()
        return state.url if state else self.config.prefect_server_url

    def _register_result_storage(self, url: str) -> None:
        """Save the ``astr-results`` block on the server and make it the default result storage."""
        from prefect.client.orchestration import get_client

        block = server_config.result_storage_block(self.config.storage_config)
        try:
            with using_server(url, self.config.prefect_api_auth_string):
                block_id = block.save(server_config.RESULT_STORAGE_BLOCK, overwrite=True)
                with get_client(sync_client=True) as client:
                    client.update_server_default_result_storage(block_id)
        except (OSError, RuntimeError, ValueError) as exc:
            raise ServerError(
                f"the Prefect server at {url} did not accept the result storage block "
                f"{server_config.RESULT_STORAGE_BLOCK!r}: {exc}"
            ) from None
        self._results_pending = False
        logger.info("flow results go to %s", block.basepath)

    # -- start -----------------------------------------------------------------------

    def start_server(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        allow_remote: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Start the server in the background and wait until it answers.

        Parameters
        ----------
        host : str
            Address to listen on. Only loopback addresses are allowed unless
            ``allow_remote`` is true (the server has no authentication unless
            ``prefect_api_auth_string`` is set).
        port : int, optional
            Port to listen on; default: the configured URL's port. ``0`` picks a free port.
        allow_remote : bool
            Allow a non-loopback ``host`` such as ``0.0.0.0``.
        timeout : float, optional
            Seconds to wait for the health endpoint (default: ``start_timeout``).

        Raises
        ------
        ServerError
            If the host is not loopback and not allowed, if this home's server runs on
            another address, if another server already answers on the port, or if the
            server exits or does not answer in time (the message holds the log's tail).
        """
        _check_host(host, allow_remote)
        port = self._port if port is None else _check_port(port)
        wait = self.start_timeout if timeout is None else timeout
        with self._locked():
            state = self._live_state()
            if state is not None:
                self._reuse(state, host, port, wait)
                return
            if port == 0:
                port = _free_port(host)
            url = api_url_for(host, port)
            if is_healthy(url, auth_string=self.config.prefect_api_auth_string):
                raise ServerError(
                    f"a Prefect server not started from {self.directory} already answers at "
                    f"{url}: use it (ASTR_PREFECT_SERVER_URL={url}) or choose another port"
                )
            self._spawn(host, port, wait)

    def _reuse(self, state: ServerState, host: str, port: int, wait: float) -> None:
        """Accept this home's running server if it is the one asked for, else refuse."""
        if state.host != host or port not in (0, state.port):
            raise ServerError(
                f"this home's Prefect server already runs at {state.url} (pid {state.pid}); "
                f"run `astr server stop` before starting one at {api_url_for(host, port)}"
            )
        self._host, self._port = state.host, state.port
        self._wait_healthy(state.pid, state.url, wait, offset=0)
        logger.info("Prefect server already running at %s (pid %d): reused", state.url, state.pid)

    def _spawn(self, host: str, port: int, wait: float) -> None:
        """Launch ``prefect server start`` detached, record it and wait for health."""
        url = api_url_for(host, port)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        started_at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        command = [sys.executable, "-m", "prefect", "server", "start"]
        command += ["--host", host, "--port", str(port)]
        with self.log_path.open("ab") as log:
            log.write(f"=== {started_at} astr: starting {url} ===\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=self.server_environment(host, port),
                start_new_session=True,
            )
        _CHILDREN[process.pid] = process
        state = ServerState(process.pid, host, port, url, started_at)
        self._write_state(state)
        self._host, self._port = host, port
        try:
            self._wait_healthy(process.pid, url, wait, offset)
        except ServerError:
            _terminate_group(process.pid, self.stop_timeout)
            self.state_path.unlink(missing_ok=True)
            raise
        logger.info("Prefect server started at %s (pid %d)", url, process.pid)
        if self._results_pending:
            self._register_result_storage(url)

    def server_environment(self, host: str, port: int) -> dict[str, str]:
        """Environment of the server process: this one's, plus the server's own settings.

        Parameters
        ----------
        host, port
            Address the server listens on.

        Returns
        -------
        dict
            ``PREFECT_HOME``, the database's connection URL, analytics off, host and port,
            ``PREFECT_API_URL`` (the UI's API address), concurrency leases kept on disk
            (:data:`LEASE_STORAGE`, unless the environment names another storage) and,
            when configured, the basic-auth string.
        """
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.directory),
            PREFECT_SERVER_DATABASE_CONNECTION_URL=self.database_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_SERVER_API_HOST=host,
            PREFECT_SERVER_API_PORT=str(port),
            PREFECT_API_URL=api_url_for(host, port),
        )
        # Concurrency leases (the global limit's slots, deployment slots) in files under
        # PREFECT_HOME, not in the server's memory: a restarted server still knows the
        # leases of running flows, which renew and release them as before, instead of
        # failing their renewal (and cancelling them) and leaking their slots for ever.
        env.setdefault("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", LEASE_STORAGE)
        # An inherited legacy spelling must not point the server at another database.
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
        env.pop("PREFECT_SERVER_API_AUTH_STRING", None)
        if self.config.prefect_api_auth_string:
            env["PREFECT_SERVER_API_AUTH_STRING"] = self.config.prefect_api_auth_string
            env["PREFECT_API_AUTH_STRING"] = self.config.prefect_api_auth_string
        return env

    def _wait_healthy(self, pid: int, url: str, wait: float, offset: int) -> None:
        """Poll the health endpoint until it answers, the process dies or time runs out."""
        deadline = time.monotonic() + wait
        while True:
            if is_healthy(url, auth_string=self.config.prefect_api_auth_string):
                return
            if not _alive(pid):
                code = _exit_code(pid)
                raise ServerError(
                    f"the Prefect server for {url} exited during start"
                    + (f" with code {code}" if code is not None else "")
                    + self._log_tail(offset)
                )
            if time.monotonic() >= deadline:
                raise ServerError(
                    f"the Prefect server for {url} (pid {pid}) did not answer its health "
                    f"check within {wait:g} s" + self._log_tail(offset)
                )
            time.sleep(_POLL_INTERVAL)

    def _log_tail(self, offset: int) -> str:
        lines = tail_lines(self.log_path, offset, _LOG_TAIL_LINES)
        if not lines:
            return f"; its log {self.log_path} is empty"
        return f"; last lines of {self.log_path}:\n" + "\n".join(lines)

    # -- stop ------------------------------------------------------------------------

    def stop_server(self) -> None:
        """Stop this home's server (SIGTERM to its process group, SIGKILL after the grace).

        Works from any process: the pid comes from the state file. Stopping when
        nothing is recorded, or when the recorded process is already gone, only
        removes the stale state file.

        Raises
        ------
        ServerError
            If the process group survives SIGKILL.
        """
        _reap_children()
        if not self.directory.exists():
            return
        with self._locked():
            state = self._read_state()
            if state is None:
                logger.info("no Prefect server recorded under %s", self.directory)
                return
            if _alive(state.pid) and _looks_like_prefect(state.pid):
                _terminate_group(state.pid, self.stop_timeout)
                logger.info("Prefect server at %s (pid %d) stopped", state.url, state.pid)
            self.state_path.unlink(missing_ok=True)

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Describe the server: recorded process, health, version and files.

        Returns
        -------
        dict
            ``running`` (the recorded process is alive), ``healthy`` (the URL answers
            its health check), ``pid``, ``url``, ``ui_url``, ``host``, ``port``,
            ``started_at``, ``version`` (the server's, when it answers),
            ``prefect_version`` (installed here), ``database``, ``log``, ``state_file``.
        """
        state = self._live_state()
        url = state.url if state else self.url
        healthy = self.is_healthy(url)
        return {
            "running": state is not None,
            "healthy": healthy,
            "pid": state.pid if state else None,
            "url": url,
            "ui_url": url.removesuffix("/api"),
            "host": state.host if state else self.host,
            "port": state.port if state else self.port,
            "started_at": state.started_at if state else None,
            "version": self._server_version(url) if healthy else None,
            "prefect_version": _installed_prefect_version(),
            "database": str(self.database_path or server_config.mask_url(self.database_url)),
            "log": str(self.log_path),
            "state_file": str(self.state_path),
        }

    def health_check(self, *, timeout: float = 5.0) -> dict[str, Any]:
        """Check the server, its database, the worker and the storage; never raises.

        Parameters
        ----------
        timeout : float
            Seconds each network check may wait.

        Returns
        -------
        dict
            ``ok`` (all four parts ok), ``checked_at`` and one dict per part, each with
            its own ``ok`` and ``error`` (None or what to do):

            - ``server``: ``url``, ``reachable``, ``version``, ``database_ready`` (the
              server reaches its database);
            - ``database``: ``url`` (password masked), ``backend``, ``reachable``,
              ``revision``, ``head`` (newest migration of the installed Prefect),
              ``migrated``;
            - ``worker``: deployments named ``astr``, how many are READY (polled by a
              running ``astr worker``), ``not_ready``, ``last_polled``;
            - ``storage``: ``url``, ``check`` (round trip) and ``results`` (the server's
              default result storage block, if any).
        """
        url = self._client_url()
        server = self._server_health(url, timeout)
        parts = {
            "server": server,
            "database": self._database_health(timeout),
            "worker": self._worker_health(url) if server["ok"] else _skipped("server"),
            "storage": self._storage_health(url if server["ok"] else None, timeout),
        }
        return {
            "ok": all(part["ok"] for part in parts.values()),
            "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **parts,
        }

    def _server_health(self, url: str, timeout: float) -> dict[str, Any]:
        auth = self.config.prefect_api_auth_string
        health: dict[str, Any] = {
            "ok": False,
            "url": url,
            "reachable": is_healthy(url, timeout=timeout, auth_string=auth),
            "version": None,
            "database_ready": None,
            "error": None,
        }
        if not health["reachable"]:
            health["error"] = f"nothing answers at {url}/health: run `astr server start`"
            return health
        try:
            status, version = server_config.api_request(
                f"{url}/admin/version", auth_string=auth, timeout=timeout
            )
            ready, _ = server_config.api_request(f"{url}/ready", auth_string=auth, timeout=timeout)
        except OSError as exc:
            health["error"] = f"the server stopped answering: {exc}"
            return health
        if status == 401:
            health["error"] = (
                "the server refused our credentials (HTTP 401): set ASTR_PREFECT_API_AUTH_STRING "
                "to its auth string"
            )
            return health
        health["version"] = version if status == 200 else None
        health["database_ready"] = ready == 200
        health["ok"] = status == 200 and ready == 200
        if not health["ok"]:
            health["error"] = f"version answered HTTP {status}, readiness HTTP {ready}"
        return health

    def _database_health(self, timeout: float) -> dict[str, Any]:
        url = self.database_url
        backend = "sqlite" if url.startswith("sqlite") else "postgresql"
        health: dict[str, Any] = {
            "ok": False,
            "url": server_config.mask_url(url),
            "backend": backend,
            "reachable": False,
            "revision": None,
            "head": None,
            "migrated": False,
            "error": None,
        }
        try:
            health["head"] = server_config.head_revision(backend)
            health["revision"] = server_config.database_revision(url, timeout)
        except ServerError as exc:
            health["error"] = str(exc)
            return health
        health["reachable"] = True
        health["migrated"] = health["revision"] == health["head"]
        health["ok"] = health["migrated"]
        if not health["migrated"]:
            found = f"revision {health['revision']}" if health["revision"] else "no Prefect tables"
            health["error"] = (
                f"the database has {found}, not revision {health['head']}: start the server "
                "(it migrates its database) or run `astr server start` once"
            )
        return health

    def _worker_health(self, url: str) -> dict[str, Any]:
        from pipeline.workflow.deployments import DEPLOYMENT_NAME

        try:
            return server_config.worker_state(
                url, DEPLOYMENT_NAME, self.config.prefect_api_auth_string
            )
        except OSError as exc:
            return {**_skipped("server"), "error": f"listing deployments failed: {exc}"}

    def _storage_health(self, url: str | None, timeout: float) -> dict[str, Any]:
        storage = self.config.storage_config
        health: dict[str, Any] = {"ok": False, "url": storage.url, "check": None, "results": None}
        try:
            health["check"] = server_config.storage_round_trip(storage)
        except AstrError as exc:
            return {**health, "error": str(exc)}
        if url is not None:
            with contextlib.suppress(OSError):
                status, body = server_config.api_request(
                    f"{url}/admin/storage",
                    auth_string=self.config.prefect_api_auth_string,
                    timeout=timeout,
                )
                if status == 200 and isinstance(body, dict):
                    health["results"] = body.get("default_result_storage_block_id")
        return {**health, "ok": True, "error": None}

    def is_healthy(self, url: str | None = None) -> bool:
        """Whether ``url`` (default: this server's) answers the health check."""
        return is_healthy(url or self.url, auth_string=self.config.prefect_api_auth_string)

    def _server_version(self, url: str) -> str | None:
        try:
            body = _http_get(f"{url}/admin/version", 5.0, self.config.prefect_api_auth_string)
            return str(json.loads(body))
        except (OSError, ValueError):
            return None

    # -- state file ------------------------------------------------------------------

    def _read_state(self) -> ServerState | None:
        try:
            data = json.loads(self.state_path.read_text(encoding="utf-8"))
            return ServerState(
                int(data["pid"]),
                str(data["host"]),
                int(data["port"]),
                str(data["url"]),
                str(data["started_at"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _write_state(self, state: ServerState) -> None:
        tmp = self.state_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(state), indent=2) + "\n", encoding="utf-8")
        tmp.replace(self.state_path)

    def _live_state(self) -> ServerState | None:
        """The recorded server if its process is alive; a stale record is removed."""
        _reap_children()
        state = self._read_state()
        if state is None:
            return None
        if _alive(state.pid) and _looks_like_prefect(state.pid):
            return state
        with contextlib.suppress(OSError):
            self.state_path.unlink(missing_ok=True)
        return None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold an exclusive lock on ``server.lock`` (one start or stop at a time)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with self._lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


# -- clients -----------------------------------------------------------------------------


def ensure_server(
    config: WorkflowConfig | None = None, *, timeout: float = DEFAULT_START_TIMEOUT
) -> tuple[str, str]:
    """Make sure the configured Prefect server answers, starting a local one if needed.

    Parameters
    ----------
    config : WorkflowConfig, optional
        Settings (default: :func:`pipeline.config.get_config`).
    timeout : float
        Seconds to wait for a server this call starts.

    Returns
    -------
    url : str
        The API URL now in use (``config.prefect_server_url``).
    how : str
        ``"configured"`` when a server already answered there, ``"started"`` when this
        call started the local server on the URL's host and port.

    Raises
    ------
    ServerError
        If the URL does not answer and is not a local ``http://<loopback>:<port>/api``
        address this process could start a server on, or if the start fails.

    Notes
    -----
    Sets ``PREFECT_API_URL`` (and ``PREFECT_API_AUTH_STRING`` when configured) in this
    process's environment, inherited by its children, and refreshes an already-imported
    Prefect's settings (see :func:`use_server`).
    """
    config = config if config is not None else get_config()
    url = config.prefect_server_url
    auth = config.prefect_api_auth_string
    if is_healthy(url, auth_string=auth):
        how = "configured"
    else:
        host, port = _local_address(url)
        PrefectServer(config, start_timeout=timeout).start_server(host, port)
        how = "started"
    use_server(url, auth_string=auth)
    return url, how


def use_server(url: str, auth_string: str | None = None) -> None:
    """Point Prefect clients of this process, and of processes it starts, at ``url``.

    Parameters
    ----------
    url : str
        Prefect API URL, e.g. ``http://127.0.0.1:4200/api``.
    auth_string : str, optional
        Basic-auth ``user:password`` of a server started with an auth string.

    Notes
    -----
    Prefect reads its settings from the environment into a process-global settings
    context when it is first imported, so changing ``PREFECT_API_URL`` afterwards has
    no effect on its own. This function sets the variables and, when Prefect is already
    imported, rebuilds that global context. Code running inside its own Prefect
    settings context (``temporary_settings``, a test harness) keeps that context's URL.
    """
    os.environ["PREFECT_API_URL"] = url
    if auth_string:
        os.environ["PREFECT_API_AUTH_STRING"] = auth_string
    refresh_prefect_settings()


@contextlib.contextmanager
def using_server(url: str, auth_string: str | None = None) -> Iterator[str]:
    """Context manager form of :func:`use_server`; restores the previous settings on exit.

    Parameters
    ----------
    url : str
        Prefect API URL.
    auth_string : str, optional
        Basic-auth ``user:password``.

    Yields
    ------
    str
        ``url``.
    """
    names = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")
    saved = {name: os.environ.get(name) for name in names}
    use_server(url, auth_string)
    try:
        yield url
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        refresh_prefect_settings()


def refresh_prefect_settings() -> None:
    """Rebuild an imported Prefect's global settings context from the environment."""
    context = sys.modules.get("prefect.context")
    if context is None:
        return  # Prefect is not imported yet: it will read the environment then.
    refresh = getattr(context, "refresh_global_settings_context", None)
    if refresh is not None:
        refresh()
    else:  # Prefect 3 releases before the function existed
        context.GLOBAL_SETTINGS_CONTEXT = context.root_settings_context()


def _local_address(url: str) -> tuple[str, int]:
    """Host and port of a URL that a local server could serve, else a clear error."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if not is_loopback(host):
        raise ServerError(
            f"the Prefect server at {url} (prefect_server_url) does not answer its health "
            f"check at {url}/health; start it there, or point ASTR_PREFECT_SERVER_URL at a "
            "running server (a local one starts by itself when the URL is on loopback)"
        )
    if parts.scheme != "http" or parts.path.rstrip("/") != "/api" or parts.port is None:
        raise ServerError(
            f"the Prefect server at {url} does not answer, and a local server can only be "
            "started for a URL of the form http://127.0.0.1:<port>/api"
        )
    return host, parts.port


# -- small helpers -----------------------------------------------------------------------


def api_url_for(host: str, port: int) -> str:
    """API URL of a server listening on ``host:port`` (wildcard hosts map to loopback).

    Parameters
    ----------
    host : str
        Listening address; ``0.0.0.0`` and ``::`` are reached through loopback.
    port : int
        Listening port.

    Returns
    -------
    str
        ``http://host:port/api`` (IPv6 hosts in brackets).
    """
    reach = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    if ":" in reach:
        reach = f"[{reach}]"
    return f"http://{reach}:{port}/api"


def is_loopback(host: str) -> bool:
    """Whether ``host`` is ``localhost`` or a loopback IP address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_healthy(url: str, *, timeout: float = 2.0, auth_string: str | None = None) -> bool:
    """Whether a Prefect API answers ``GET <url>/health`` with ``true``.

    Parameters
    ----------
    url : str
        Prefect API URL, e.g. ``http://127.0.0.1:4200/api``.
    timeout : float
        Seconds to wait for the answer.
    auth_string : str, optional
        Basic-auth ``user:password`` (Prefect exempts the health check, but a proxy
        in front of it may not).

    Returns
    -------
    bool
    """
    try:
        return json.loads(_http_get(f"{url.rstrip('/')}/health", timeout, auth_string)) is True
    except (OSError, ValueError):
        return False


def tail_lines(path: Path, offset: int = 0, count: int = _LOG_TAIL_LINES) -> list[str]:
    """The last ``count`` non-empty lines of a file after byte ``offset`` (none if absent)."""
    try:
        with path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = [line.rstrip() for line in text.splitlines() if line.strip()]
    return lines[-count:]


def _http_get(url: str, timeout: float, auth_string: str | None) -> bytes:
    request = urllib.request.Request(url, method="GET")
    if auth_string:
        token = base64.b64encode(auth_string.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    handlers = []
    if is_loopback(urlsplit(url).hostname or ""):
        handlers.append(urllib.request.ProxyHandler({}))  # never send loopback via a proxy
    opener = urllib.request.build_opener(*handlers)
    with opener.open(request, timeout=timeout) as response:
        return response.read()


def _check_host(host: str, allow_remote: bool) -> None:
    if not host:
        raise ServerError("the server host is empty; give e.g. 127.0.0.1")
    if not allow_remote and not is_loopback(host):
        raise ServerError(
            f"refusing to start the Prefect server on {host}: it is not a loopback address "
            "and the server would be reachable from the network (without authentication "
            "unless ASTR_PREFECT_API_AUTH_STRING is set); pass allow_remote=True "
            "(astr server start --allow-remote) to do it anyway"
        )


def _check_port(port: int) -> int:
    if not 0 <= port <= 65535:
        raise ServerError(f"port {port} is outside 0-65535 (0 picks a free port)")
    return port


def _free_port(host: str) -> int:
    """A port on ``host`` that nothing listens on right now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _reap_children() -> None:
    """Forget servers this process started that have exited (another process may stop them)."""
    for pid, child in list(_CHILDREN.items()):
        if child.poll() is not None:
            _CHILDREN.pop(pid, None)


def _alive(pid: int) -> bool:
    """Whether a process exists and has not exited (zombies count as exited)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None
    return pid_alive(pid)


def _exit_code(pid: int) -> int | None:
    child = _CHILDREN.get(pid)
    return None if child is None else child.poll()


def _looks_like_prefect(pid: int) -> bool:
    """Guard against a recycled pid: the process's command line mentions prefect."""
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc (macOS): trust the record
    except OSError:
        return True


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _terminate_group(pid: int, grace: float) -> None:
    """SIGTERM the group led by ``pid``; SIGKILL what is left after ``grace`` seconds."""
    signal_group(pid, signal.SIGTERM)
    if not _wait_gone(pid, grace):
        signal_group(pid, signal.SIGKILL)
        if not _wait_gone(pid, 10.0):
            raise ServerError(f"the Prefect server process {pid} survived SIGKILL")
    if _group_exists(pid):  # stragglers of the group outlived their leader
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        child.wait(timeout=10.0)


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _skipped(needed: str) -> dict[str, Any]:
    return {"ok": False, "error": f"not checked: the {needed} is not healthy"}


def _installed_prefect_version() -> str | None:
    try:
        return metadata.version("prefect")
    except metadata.PackageNotFoundError:
        return None
