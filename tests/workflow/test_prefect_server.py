"""The local Prefect server, started for real on loopback ports under temporary homes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from procs import free_port

from pipeline.config import get_config
from pipeline.errors import ServerError
from pipeline.workflow.prefect_server import (
    PrefectServer,
    api_url_for,
    ensure_server,
    is_healthy,
    is_loopback,
    refresh_prefect_settings,
    tail_lines,
    using_server,
)

integration = pytest.mark.integration
# Generous: a loaded CI machine can take well over 15 s to start a server.
PREFECT_START_TIMEOUT = 180.0


def _astr(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("astr", path=str(Path(sys.executable).parent)) or "astr"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )


def _gone(pid: int) -> bool:
    """No process is left in the group that ``pid`` led."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.fixture
def server() -> Iterator[PrefectServer]:
    """A server object for this test's home; stopped at the end whatever happened."""
    srv = PrefectServer(get_config(), start_timeout=PREFECT_START_TIMEOUT)
    yield srv
    srv.stop_server()


@pytest.fixture
def prefect_env() -> Iterator[None]:
    """Restore the Prefect client variables (and Prefect's settings) after the test."""
    names = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    refresh_prefect_settings()


def _run_trivial_flow(marker: str) -> uuid.UUID:
    from prefect import flow, get_run_logger

    @flow(name="astr-server-check")
    def trivial(word: str) -> str:
        get_run_logger().info("checking %s", word)
        return word.upper()

    state = trivial(marker, return_state=True)
    assert state.is_completed()
    assert state.result() == marker.upper()
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    return flow_run_id


def _read_back(flow_run_id: uuid.UUID) -> tuple[str, list[str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id]))
        )
    return run.state_type.value, [log.message for log in logs]


@integration
def test_start_run_a_flow_status_stop(server: PrefectServer, tmp_path: Path) -> None:
    server.start_server("127.0.0.1", 0)
    url = server.url
    assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
    assert server.port != 0 and is_healthy(url)
    assert server.database_path.is_file()

    recorded = json.loads(server.state_path.read_text())
    pid = recorded["pid"]
    assert recorded["url"] == url and recorded["port"] == server.port
    status = server.status()
    assert status["running"] and status["healthy"] and status["pid"] == pid
    assert status["version"] == status["prefect_version"]
    assert status["ui_url"] == url.removesuffix("/api")

    # Starting again is a no-op that keeps the same process.
    server.start_server("127.0.0.1", 0)
    assert json.loads(server.state_path.read_text())["pid"] == pid
    # This home's server on another port, or a foreign server on this one, is refused.
    with pytest.raises(ServerError, match="already runs at"):
        server.start_server("127.0.0.1", free_port())
    other = PrefectServer(dataclasses.replace(server.config, home=tmp_path / "other"))
    with pytest.raises(ServerError, match="already answers"):
        other.start_server("127.0.0.1", server.port)

    with using_server(server.api_url):
        flow_run_id = _run_trivial_flow("supernova")
        state_type, messages = _read_back(flow_run_id)
    assert state_type == "COMPLETED"
    assert "checking supernova" in messages

    server.stop_server()
    assert _gone(pid) and not is_healthy(url)
    assert not server.state_path.exists()
    assert not server.status()["running"]
    server.stop_server()  # a second stop is a no-op


@integration
def test_ensure_server_and_the_cli(
    server: PrefectServer, monkeypatch: pytest.MonkeyPatch, prefect_env: None
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    monkeypatch.setenv("ASTR_PREFECT_SERVER_URL", url)
    get_config.cache_clear()

    # Nothing answers on the configured loopback URL: ensure_server starts it.
    assert ensure_server(timeout=PREFECT_START_TIMEOUT) == (url, "started")
    assert os.environ["PREFECT_API_URL"] == url
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        assert client.api_healthcheck() is None
        assert str(client.api_url).rstrip("/") == url
    assert ensure_server() == (url, "configured")

    # Another process sees it and stops it.
    shown = _astr("server", "status", "--json")
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert status["running"] and status["healthy"] and status["url"] == url
    stopped = _astr("server", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped" in stopped.stdout
    assert not server.status()["running"]  # also reaps our child
    assert _gone(status["pid"]) and not is_healthy(url)
    again = _astr("server", "stop")
    assert again.returncode == 0 and "no Prefect server was running" in again.stdout

    # The CLI starts it on the configured port; it outlives the command.
    started = _astr("server", "start", "--timeout", str(PREFECT_START_TIMEOUT))
    assert started.returncode == 0, started.stderr
    assert f"http://127.0.0.1:{port}" in started.stdout
    assert is_healthy(url) and server.status()["running"]
    assert ensure_server() == (url, "configured")
    stopped = _astr("server", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not is_healthy(url)


@integration
def test_busy_port_fails_with_the_log_tail(server: PrefectServer) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServerError, match="exited during start") as failure:
            server.start_server("127.0.0.1", port)
    assert "already in use" in str(failure.value)
    assert str(server.log_path) in str(failure.value)
    assert not server.state_path.exists()


def test_non_loopback_host_is_refused(server: PrefectServer) -> None:
    with pytest.raises(ServerError, match="not a loopback address"):
        server.start_server("0.0.0.0", 0)
    assert not server.state_path.exists()
    result = _astr("server", "start", "--host", "0.0.0.0")
    assert result.returncode == 2
    assert "--allow-remote" in result.stderr and "Traceback" not in result.stderr


def test_unreachable_remote_url_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    # 192.0.2.0/24 is reserved for documentation: nothing answers there.
    monkeypatch.setenv("ASTR_PREFECT_SERVER_URL", "http://192.0.2.1:4200/api")
    get_config.cache_clear()
    with pytest.raises(ServerError, match=r"http://192\.0\.2\.1:4200/api"):
        ensure_server()


def test_status_without_a_server(server: PrefectServer) -> None:
    status = server.status()
    assert not status["running"] and status["pid"] is None
    assert status["database"].endswith("prefect/prefect.db")
    server.stop_server()  # nothing to stop


def test_addresses_and_log_tail(tmp_path: Path) -> None:
    assert api_url_for("127.0.0.1", 4200) == "http://127.0.0.1:4200/api"
    assert api_url_for("0.0.0.0", 4200) == "http://127.0.0.1:4200/api"
    assert api_url_for("::1", 4200) == "http://[::1]:4200/api"
    assert is_loopback("localhost") and is_loopback("127.0.0.2") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.org")
    log = tmp_path / "server.log"
    log.write_text("old start\n" + "\n".join(f"line {i}" for i in range(100)) + "\n\n")
    assert tail_lines(log, count=3) == ["line 97", "line 98", "line 99"]
    assert tail_lines(log, offset=len("old start\n"), count=200)[0] == "line 0"
    assert tail_lines(tmp_path / "missing.log") == []


def test_server_keeps_concurrency_leases_on_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """Leases in the server's memory die with it: a restart would cancel running flows."""
    from pipeline.workflow.prefect_server import LEASE_STORAGE

    monkeypatch.delenv("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", raising=False)
    env = PrefectServer(get_config()).server_environment("127.0.0.1", 4200)
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == LEASE_STORAGE
    assert LEASE_STORAGE.endswith(".filesystem")
    monkeypatch.setenv("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE", "prefect_redis.lease_storage")
    env = PrefectServer(get_config()).server_environment("127.0.0.1", 4200)
    assert env["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == "prefect_redis.lease_storage"


@integration
def test_session_fixture_points_prefect_at_its_server(prefect_server: str) -> None:
    from prefect.settings import get_current_settings

    assert os.environ["PREFECT_API_URL"] == prefect_server
    assert get_current_settings().api.url == prefect_server
    flow_run_id = _run_trivial_flow("transient")
    state_type, messages = _read_back(flow_run_id)
    assert state_type == "COMPLETED" and "checking transient" in messages


def test_server_url_fixture_sets_the_astr_setting(
    prefect_server_url: str, prefect_env: None
) -> None:
    assert get_config().prefect_server_url == prefect_server_url
    assert ensure_server() == (prefect_server_url, "configured")
