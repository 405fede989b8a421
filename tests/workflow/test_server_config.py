"""Configuring the Prefect server: database, authentication, storage and the health check.

The integration tests use a throwaway PostgreSQL cluster (``tests/pg.py``), an S3
protocol server (moto) and real Prefect servers on free loopback ports.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pg  # tests/pg.py (tests/ is on the path through its conftest.py)
import pytest
from procs import free_port

from pipeline.config import StorageConfig, describe, load_config, prefect_database_url
from pipeline.errors import ConfigError, ServerError, StorageError
from pipeline.workflow import server_config
from pipeline.workflow.prefect_server import PrefectServer, using_server

integration = pytest.mark.integration
PREFECT_START_TIMEOUT = 180.0
AUTH_STRING = "admin:correct-horse-battery"
TOKEN = "tok-0123456789abcdef-xyz"


def _server(home: Path) -> PrefectServer:
    # a port of its own: a Prefect server the user left running on the default port
    # (4200) would otherwise answer for this one before it starts
    config = dataclasses.replace(
        load_config(environ={}),
        home=home,
        prefect_server_url=f"http://127.0.0.1:{free_port()}/api",
    )
    return PrefectServer(config, start_timeout=PREFECT_START_TIMEOUT)


# -- database URL ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("sqlite:////data/prefect.db", "sqlite+aiosqlite:////data/prefect.db"),
        ("sqlite+aiosqlite:////data/prefect.db", "sqlite+aiosqlite:////data/prefect.db"),
        ("postgresql://p:pw@db:5432/prefect", "postgresql+asyncpg://p:pw@db:5432/prefect"),
        ("postgresql+asyncpg://p:pw@db/prefect", "postgresql+asyncpg://p:pw@db/prefect"),
    ],
)
def test_database_url_gets_its_async_driver(given: str, expected: str) -> None:
    assert prefect_database_url(given) == expected


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql+psycopg://p:hunter2@db/prefect", "needs an asyncio driver"),
        ("mysql://p:hunter2@db/prefect", "allowed: sqlite\\+aiosqlite"),
        ("sqlite:///relative.db", "relative path"),
        ("sqlite://", "names no database file"),
        ("postgresql+asyncpg://p:hunter2@/prefect", "needs a host and a database"),
        ("not a url", "is not a database URL"),
    ],
)
def test_bad_database_urls_are_refused_with_the_password_masked(url: str, message: str) -> None:
    server = PrefectServer(load_config(environ={}))
    with pytest.raises(ConfigError, match=message) as failure:
        server.configure_database(url)
    assert "hunter2" not in str(failure.value)
    assert server.config.prefect_database_url == ""  # nothing changed


def test_database_setting_per_environment(tmp_path: Path) -> None:
    default = load_config({}, cwd=tmp_path)
    assert default.prefect_database_url == ""
    assert PrefectServer(default).database_url.endswith(".astr/prefect/prefect.db")
    url = "postgresql://prefect:hunter2@db:5432/prefect"
    config = load_config({"ASTR_ENV": "prod", "ASTR_PREFECT_DATABASE_URL": url}, cwd=tmp_path)
    assert config.prefect_database_url == "postgresql+asyncpg://prefect:hunter2@db:5432/prefect"
    assert "hunter2" not in repr(config) and "hunter2" not in json.dumps(describe(config))
    server = PrefectServer(config)
    assert server.database_path is None
    assert server.server_environment("127.0.0.1", 4200)[
        "PREFECT_SERVER_DATABASE_CONNECTION_URL"
    ] == (config.prefect_database_url)
    with pytest.raises(ConfigError, match="ASTR_PREFECT_DATABASE_URL"):
        load_config({"ASTR_PREFECT_DATABASE_URL": "postgresql+psycopg2://db/x"}, cwd=tmp_path)


def test_head_revision_agrees_with_alembic() -> None:
    from alembic.script import ScriptDirectory

    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None
    root = Path(spec.origin).parent / "server" / "database" / "_migrations"
    for backend in ("sqlite", "postgresql"):
        script = ScriptDirectory(str(root), version_locations=[str(root / "versions" / backend)])
        assert server_config.head_revision(backend) == script.get_current_head()
        assert len(server_config.migration_revisions(backend)) > 50


@integration
def test_sqlite_database_is_migrated_once_and_used(tmp_path: Path) -> None:
    server = _server(tmp_path / "home")
    path = tmp_path / "elsewhere" / "prefect.db"
    first = server.configure_database(f"sqlite:///{path}")
    head = server_config.head_revision("sqlite")
    assert first == {
        "url": f"sqlite+aiosqlite:///{path}",
        "backend": "sqlite",
        "revision": head,
        "upgraded": True,
        "restart_needed": False,
    }
    assert path.is_file() and server.database_path == path
    assert server.configure_database(f"sqlite:///{path}")["upgraded"] is False
    environment = server.server_environment("127.0.0.1", 4200)
    assert environment["PREFECT_SERVER_DATABASE_CONNECTION_URL"] == f"sqlite+aiosqlite:///{path}"

    # The health check reads the same revision; an unmigrated file is reported as such.
    assert server._database_health(5.0)["migrated"] is True
    other = _server(tmp_path / "other")
    health = other._database_health(5.0)
    assert health["reachable"] is False and "does not exist" in health["error"]
    assert not (tmp_path / "other" / "prefect" / "prefect.db").exists()  # looking creates nothing


# -- PostgreSQL --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[pg.PostgresCluster]:
    with pg.running_cluster() as cluster:
        yield cluster


@integration
def test_postgres_database_is_checked_and_migrated(
    postgres: pg.PostgresCluster, tmp_path: Path
) -> None:
    url = postgres.create_database("prefect_migrate")
    server = _server(tmp_path / "home")
    result = server.configure_database(url.replace("+asyncpg", ""))  # plain postgresql://
    assert result["backend"] == "postgresql" and result["upgraded"] is True
    assert result["revision"] == server_config.head_revision("postgresql")
    assert postgres.password not in json.dumps(result)
    assert server.database_url == url and server.database_path is None
    assert server.status()["database"] == server_config.mask_url(url)
    assert server_config.database_revision(url) == result["revision"]
    assert server.configure_database(url)["upgraded"] is False


@integration
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"database": "missing"}, 'database "missing" does not exist'),
        ({"password": "wrong-password"}, "password authentication failed"),
        ({"port": "closed"}, "Connect call failed"),
    ],
)
def test_unreachable_postgres_is_a_clear_error(
    postgres: pg.PostgresCluster, tmp_path: Path, change: dict[str, str], message: str
) -> None:
    port = free_port() if change.get("port") else postgres.port
    password = change.get("password", postgres.password)
    database = change.get("database", "postgres")
    url = f"postgresql+asyncpg://{postgres.user}:{password}@127.0.0.1:{port}/{database}"
    server = _server(tmp_path / "home")
    with pytest.raises(ServerError, match=message) as failure:
        server.configure_database(url, timeout=5)
    text = str(failure.value)
    assert "cannot connect to the Prefect database" in text and "check that PostgreSQL" in text
    assert password not in text and f"127.0.0.1:{port}/{database}" in text
    assert server.config.prefect_database_url == ""


def test_silent_host_times_out(tmp_path: Path) -> None:
    # A socket that accepts connections but never speaks PostgreSQL's protocol.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(ServerError, match="cannot connect"):
            _server(tmp_path / "h").configure_database(
                f"postgresql+asyncpg://astr:pw@127.0.0.1:{port}/prefect", timeout=1.5
            )
        assert time.monotonic() - started < 10


def _astr(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ASTR_")}
    exe = shutil.which("astr", path=str(Path(sys.executable).parent)) or "astr"
    return subprocess.run(
        [exe, *args], capture_output=True, text=True, env={**clean, **env}, timeout=120
    )


def test_cli_start_checks_the_database_and_authentication(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    url = f"http://127.0.0.1:{free_port()}/api"
    closed = f"postgresql+asyncpg://astr:hunter2@127.0.0.1:{free_port()}/prefect"
    refused = _astr(
        {"ASTR_HOME": home, "ASTR_PREFECT_SERVER_URL": url, "ASTR_PREFECT_DATABASE_URL": closed},
        "server", "start",
    )  # fmt: skip
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "cannot connect to the Prefect database" in refused.stderr
    assert "hunter2" not in refused.stderr

    unsecured = _astr(
        {"ASTR_HOME": home, "ASTR_PREFECT_SERVER_URL": url, "ASTR_AUTHENTICATION_ENABLED": "1"},
        "server", "start",
    )  # fmt: skip
    assert unsecured.returncode == 2
    assert "ASTR_PREFECT_API_AUTH_STRING is not set" in unsecured.stderr
    assert not (tmp_path / "home" / "prefect" / "server.json").exists()  # nothing started


# -- authentication ----------------------------------------------------------------------

GOOD_ENV = {"ASTR_PREFECT_API_AUTH_STRING": AUTH_STRING, "ASTR_API_TOKENS": f"{TOKEN},{TOKEN}2"}


def test_authentication_from_named_variables() -> None:
    auth = server_config.resolve_auth({"enabled": True}, GOOD_ENV)
    assert auth.prefect_auth_string == AUTH_STRING
    assert auth.api_tokens == (TOKEN, f"{TOKEN}2")
    assert AUTH_STRING not in repr(auth) and TOKEN not in repr(auth)

    custom = {"PREFECT_BASIC": "ops:another-long-password", "SURVEY_TOKENS": TOKEN}
    auth = server_config.resolve_auth(
        {"prefect_auth_string_env": "PREFECT_BASIC", "api_tokens_env": "SURVEY_TOKENS"}, custom
    )
    assert auth.enabled and auth.prefect_auth_string == "ops:another-long-password"
    assert auth.describe() == {
        "enabled": True,
        "prefect_auth_string_env": "PREFECT_BASIC",
        "prefect_auth": True,
        "api_tokens_env": "SURVEY_TOKENS",
        "api_tokens": 1,
    }
    off = server_config.resolve_auth({"enabled": False}, GOOD_ENV)
    assert off.prefect_auth_string is None and off.api_tokens == ()


@pytest.mark.parametrize(
    ("auth_config", "environ", "message"),
    [
        ({"auth_string": AUTH_STRING}, GOOD_ENV, "looks like a literal secret"),
        ({"api_tokens": [TOKEN]}, GOOD_ENV, "looks like a literal secret"),
        ({"prefect_auth_string_env": AUTH_STRING}, GOOD_ENV, "must name an environment variable"),
        ({"api_tokens_env": TOKEN}, GOOD_ENV, "must name an environment variable"),
        ({"enabled": "yes"}, GOOD_ENV, "must be true or false"),
        ({"mode": "strict"}, GOOD_ENV, "unknown key 'mode'"),
        ({}, {"ASTR_API_TOKENS": TOKEN}, "ASTR_PREFECT_API_AUTH_STRING is not set"),
        ({}, {**GOOD_ENV, "ASTR_API_TOKENS": " , "}, "ASTR_API_TOKENS holds no token"),
        ({}, {**GOOD_ENV, "ASTR_API_TOKENS": f"{TOKEN},short"}, "number 2 are shorter"),
        ({}, {**GOOD_ENV, "ASTR_PREFECT_API_AUTH_STRING": "admin:pw"}, "at least 12"),
        ({}, {**GOOD_ENV, "ASTR_PREFECT_API_AUTH_STRING": "no-colon-here-at-all"}, "user:pass"),
    ],
)
def test_bad_authentication_configs(auth_config: dict, environ: dict, message: str) -> None:
    server = PrefectServer(load_config(environ={}))
    with pytest.raises(ConfigError, match=message) as failure:
        server.setup_authentication(auth_config, environ=environ)
    for secret in (AUTH_STRING, TOKEN, "no-colon-here-at-all"):
        assert secret not in str(failure.value)
    assert server.config.prefect_api_auth_string is None


def test_authentication_reaches_the_server_and_its_clients() -> None:
    server = PrefectServer(load_config(environ={}))
    shown = server.setup_authentication({}, environ=GOOD_ENV)
    assert shown["enabled"] and shown["api_tokens"] == 2 and not shown["restart_needed"]
    assert AUTH_STRING not in json.dumps(shown)
    env = server.server_environment("127.0.0.1", 4200)
    assert env["PREFECT_SERVER_API_AUTH_STRING"] == AUTH_STRING
    assert env["PREFECT_API_AUTH_STRING"] == AUTH_STRING
    clients = server.client_environment()
    assert clients["PREFECT_API_AUTH_STRING"] == AUTH_STRING
    assert clients["ASTR_API_TOKENS"] == f"{TOKEN},{TOKEN}2"
    # The variables it hands a worker or the API are settings our loader accepts.
    loaded = load_config({k: v for k, v in clients.items() if k.startswith("ASTR_")})
    assert loaded.authentication_enabled and loaded.api_tokens == (TOKEN, f"{TOKEN}2")

    server.setup_authentication({"enabled": False}, environ=GOOD_ENV)
    env = server.server_environment("127.0.0.1", 4200)
    assert "PREFECT_SERVER_API_AUTH_STRING" not in env
    assert not server.config.authentication_enabled and server.config.api_tokens == ()


# -- storage -----------------------------------------------------------------------------


def test_local_storage_round_trip(tmp_path: Path) -> None:
    # A URL nothing answers on: the block is left for the server's start.
    url = f"http://127.0.0.1:{free_port()}/api"
    server = PrefectServer(load_config(environ={"ASTR_PREFECT_SERVER_URL": url}))
    storage = StorageConfig("local", str(tmp_path / "artifacts"))
    result = server.configure_storage(storage)
    assert result == {
        "url": str(tmp_path / "artifacts"),
        "check": "write, read, sha256 and delete ok",
        "results": f"{tmp_path / 'artifacts'}/prefect-results",
        "registered": False,  # no server answers: registered when it starts
    }
    assert server.config.storage_config == storage
    assert list((tmp_path / "artifacts").rglob("*.txt")) == []  # the probe is gone

    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(StorageError, match="failed its open check") as failure:
        server.configure_storage(StorageConfig("local", str(tmp_path / "file" / "artifacts")))
    assert "writable directory" in str(failure.value)
    assert server.config.storage_config == storage  # unchanged after a failure


def _bucket(endpoint: str, name: str) -> StorageConfig:
    import s3fs

    options = {"endpoint_url": endpoint, "skip_instance_cache": True}
    fs = s3fs.S3FileSystem(**options)
    if not fs.exists(name):
        fs.mkdir(name)
    return StorageConfig("s3", bucket=name, prefix="astr/prod", options=options)


@integration
def test_s3_storage_round_trip(s3_endpoint: str, aws_env: None) -> None:
    server = PrefectServer(load_config(environ={}))
    storage = _bucket(s3_endpoint, "survey")
    result = server.configure_storage(storage)
    assert result["check"] == "write, read, sha256 and delete ok"
    assert result["results"] == "s3://survey/astr/prod/prefect-results"
    import s3fs

    # the check object is gone (moto's servers in one process share their buckets, so
    # other tests' objects may be in this one)
    assert s3fs.S3FileSystem(endpoint_url=s3_endpoint).find("survey/astr/prod/_health") == []

    missing = dataclasses.replace(storage, bucket="no-such-bucket")
    with pytest.raises(StorageError, match="failed its write check") as failure:
        server.configure_storage(missing)
    assert "bucket 'no-such-bucket' exists" in str(failure.value)
    assert s3_endpoint in str(failure.value)


# -- a secured server on PostgreSQL with S3 results --------------------------------------


@pytest.fixture(scope="module")
def secured(
    postgres: pg.PostgresCluster,
    s3_endpoint: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[PrefectServer]:
    """A Prefect server on PostgreSQL with basic auth and results in an S3 bucket."""
    root = tmp_path_factory.mktemp("secured")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_DEFAULT_REGION", "us-east-1")
        patch.setenv("PREFECT_HOME", str(root / "client"))
        patch.delenv("PREFECT_API_AUTH_STRING", raising=False)
        server = _server(root / "home")
        server.configure_database(postgres.create_database("prefect_secured"))
        server.setup_authentication({"enabled": True}, environ=GOOD_ENV)
        assert server.configure_storage(_bucket(s3_endpoint, "results"))["registered"] is False
        server.start_server("127.0.0.1", 0)
        try:
            yield server
        finally:
            server.stop_server()


def _status(url: str, auth_string: str | None) -> int:
    request = urllib.request.Request(url)
    if auth_string:
        token = base64.b64encode(auth_string.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code


@integration
def test_server_with_auth_refuses_clients_without_it(secured: PrefectServer) -> None:
    url = secured.url
    assert _status(f"{url}/admin/version", None) == 401
    assert _status(f"{url}/admin/version", "admin:wrong-password-here") == 401
    assert _status(f"{url}/admin/version", AUTH_STRING) == 200
    assert _status(f"{url}/health", None) == 200  # probes stay open

    from prefect.client.orchestration import get_client
    from prefect.exceptions import PrefectHTTPStatusError

    with (
        using_server(url, None),
        get_client(sync_client=True) as client,
        pytest.raises(PrefectHTTPStatusError, match="401"),
    ):
        client.read_flows(limit=1)
    with using_server(url, AUTH_STRING), get_client(sync_client=True) as client:
        assert isinstance(client.read_flows(limit=1), list)


@integration
def test_health_results_in_s3_and_the_worker(
    secured: PrefectServer, s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing")):
        monkeypatch.setenv(name, value)
    report = secured.health_check()
    assert report["server"]["ok"] and report["server"]["version"] == _prefect_version()
    assert report["server"]["database_ready"] is True
    assert report["database"]["ok"] and report["database"]["backend"] == "postgresql"
    assert report["database"]["revision"] == server_config.head_revision("postgresql")
    assert report["storage"]["ok"] and report["storage"]["results"] is not None
    assert report["worker"] == {
        "ok": False,
        "deployments": 0,
        "ready": 0,
        "not_ready": [],
        "last_polled": None,
        "error": "no deployment named 'astr' on the server: start `astr worker`",
    }
    assert report["ok"] is False
    cli = _astr_health(secured, s3_endpoint)
    assert cli.returncode == 1 and json.loads(cli.stdout)["worker"]["ok"] is False

    # A flow's result goes to the bucket through the server's default block.
    from prefect import flow

    @flow(name="astr-result-check", persist_result=True)
    def answer() -> int:
        return 42

    with using_server(secured.url, AUTH_STRING):
        state = answer(return_state=True)
    assert state.result() == 42
    import s3fs

    stored = s3fs.S3FileSystem(endpoint_url=s3_endpoint).find("results/astr/prod/prefect-results")
    assert len(stored) >= 1

    worker = _serve_a_deployment(secured, tmp_path)
    try:
        report = _wait_for_worker(secured, timeout=90)
        assert report["worker"]["ok"], report["worker"]
        assert report["worker"]["deployments"] == report["worker"]["ready"] == 1
        assert report["ok"] is True
        cli = _astr_health(secured, s3_endpoint)
        assert cli.returncode == 0, cli.stdout + cli.stderr
        shown = json.loads(cli.stdout)
        assert shown["ok"] and shown["database"]["url"] == report["database"]["url"]
        assert AUTH_STRING not in cli.stdout and secured.config.api_tokens[0] not in cli.stdout
    finally:
        worker.terminate()
        worker.wait(timeout=30)


def _prefect_version() -> str:
    from importlib import metadata

    return metadata.version("prefect")


def _serve_a_deployment(server: PrefectServer, directory: Path) -> subprocess.Popen[bytes]:
    """A real runner serving one flow as a deployment named ``astr`` (as ``astr worker`` does)."""
    script = directory / "served.py"
    script.write_text(
        textwrap.dedent(
            """
            from prefect import flow, serve

            from pipeline.workflow.deployments import DEPLOYMENT_NAME


            @flow(name="astr-served-check")
            def served() -> int:
                return 1


            if __name__ == "__main__":
                serve(served.to_deployment(name=DEPLOYMENT_NAME))
            """
        )
    )
    env = {
        **os.environ,
        "PREFECT_API_URL": server.url,
        "PREFECT_API_AUTH_STRING": AUTH_STRING,
        "PREFECT_RUNNER_POLL_FREQUENCY": "2",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with (directory / "served.log").open("wb") as log:
        return subprocess.Popen(
            [sys.executable, str(script)], cwd=directory, env=env, stdout=log, stderr=log
        )


def _wait_for_worker(server: PrefectServer, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        report = server.health_check()
        if report["worker"]["ok"] or time.monotonic() > deadline:
            return report
        time.sleep(1.0)


def _astr_health(server: PrefectServer, endpoint: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASTR_")}
    env.update(
        ASTR_HOME=str(server.config.home),
        ASTR_PREFECT_SERVER_URL=server.url,
        ASTR_PREFECT_DATABASE_URL=server.database_url,
        ASTR_PREFECT_API_AUTH_STRING=AUTH_STRING,
        ASTR_STORAGE_ROOT="s3://results/astr/prod",
        ASTR_STORAGE_OPTIONS=json.dumps({"endpoint_url": endpoint}),
    )
    exe = shutil.which("astr", path=str(Path(sys.executable).parent)) or "astr"
    return subprocess.run(
        [exe, "server", "health", "--json"], capture_output=True, text=True, env=env, timeout=120
    )
