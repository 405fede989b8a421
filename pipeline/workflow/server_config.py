"""What the Prefect server runs with: its database, authentication, result storage and health.

Small functions used by :class:`pipeline.workflow.prefect_server.PrefectServer`:

- the database: connect with a timeout and read its migration revision
  (:func:`database_revision`), Prefect's newest revision for that backend
  (:func:`head_revision`), and Prefect's own migrations (:func:`upgrade_database`);
- authentication: which environment variables hold the server's basic-auth string and
  the REST API's tokens (:func:`resolve_auth`); a literal secret is refused;
- storage: a write, read and delete round trip (:func:`storage_round_trip`) and the
  Prefect block that holds flow results there (:func:`result_storage_block`);
- health: the deployments that ``astr worker`` serves (:func:`worker_state`) and small
  HTTP calls to the server's API (:func:`api_request`).

Prefect is imported only by :func:`result_storage_block` and :func:`upgrade_database`
(in a subprocess), so checking a database or a worker stays quick.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import importlib.util
import json
import os
import re
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pipeline.config import StorageConfig
from pipeline.errors import ConfigError, ServerError, StorageError

__all__ = [
    "AUTH_KEYS",
    "DEFAULT_API_TOKENS_ENV",
    "DEFAULT_AUTH_STRING_ENV",
    "RESULT_STORAGE_BLOCK",
    "AuthSettings",
    "api_request",
    "database_revision",
    "head_revision",
    "mask_url",
    "migration_revisions",
    "resolve_auth",
    "result_storage_block",
    "result_storage_url",
    "storage_round_trip",
    "upgrade_database",
    "worker_state",
]

DEFAULT_AUTH_STRING_ENV = "ASTR_PREFECT_API_AUTH_STRING"
"""Variable holding the Prefect server's basic-auth ``user:password`` unless told otherwise."""
DEFAULT_API_TOKENS_ENV = "ASTR_API_TOKENS"
"""Variable holding the REST API's bearer tokens (comma-separated) unless told otherwise."""
AUTH_KEYS = ("enabled", "prefect_auth_string_env", "api_tokens_env")
"""Keys an ``auth_config`` may have."""
RESULT_STORAGE_BLOCK = "astr-results"
"""Name of the filesystem block that holds flow results (the server's default)."""

MIN_TOKEN_LENGTH = 16
MIN_PASSWORD_LENGTH = 12
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
_SECRET_WORDS = ("secret", "password", "token", "auth", "key", "credential")
_MIGRATE_TIMEOUT = 300.0
_T = TypeVar("_T")


# -- database ------------------------------------------------------------------------------


def mask_url(url: str) -> str:
    """A database URL with its password replaced by ``***`` (unparsable input returned as is)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def database_revision(url: str, timeout: float = 10.0) -> str | None:
    """Connect to a Prefect database and read its migration revision.

    Parameters
    ----------
    url : str
        ``sqlite+aiosqlite:////abs/path.db`` or ``postgresql+asyncpg://...`` (as returned
        by :func:`pipeline.config.prefect_database_url`).
    timeout : float
        Seconds to wait for the connection.

    Returns
    -------
    str or None
        The ``alembic_version`` of the database; None when it has no Prefect tables yet
        (or, for SQLite, no file yet).

    Raises
    ------
    ServerError
        If the database cannot be reached; the message masks the password and says
        what to check.
    """
    parsed = make_url(url)
    try:
        if parsed.get_backend_name() == "sqlite":
            return _sqlite_revision(Path(parsed.database or ""), timeout)
        return _run(_postgres_revision(parsed.set(drivername="postgresql"), timeout))
    except (OSError, TimeoutError, sqlite3.Error) as exc:
        raise ServerError(_unreachable(url, exc)) from None
    except Exception as exc:
        if type(exc).__module__.startswith("asyncpg"):
            raise ServerError(_unreachable(url, exc)) from None
        raise


def _unreachable(url: str, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    hint = (
        "check that the directory exists and is writable"
        if url.startswith("sqlite")
        else "check that PostgreSQL runs there and that the user, password and database exist"
    )
    return f"cannot connect to the Prefect database {mask_url(url)}: {reason}; {hint}"


def _sqlite_revision(path: Path, timeout: float) -> str | None:
    if not path.parent.is_dir():
        raise FileNotFoundError(f"directory {path.parent} does not exist")
    if not path.exists():
        return None  # a new database: Prefect's migrations create it
    uri = f"{path.as_uri()}?mode=rw"  # never create a file just by looking
    with contextlib.closing(sqlite3.connect(uri, timeout=timeout, uri=True)) as connection:
        try:
            row = connection.execute("SELECT version_num FROM alembic_version").fetchone()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return None
            raise
    return row[0] if row else None


async def _postgres_revision(url: Any, timeout: float) -> str | None:
    import asyncpg  # installed with Prefect

    connection = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=timeout)
    try:
        exists = await connection.fetchval("SELECT to_regclass('alembic_version') IS NOT NULL")
        if not exists:
            return None
        return await connection.fetchval("SELECT version_num FROM alembic_version LIMIT 1")
    finally:
        await connection.close(timeout=timeout)


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a coroutine to completion, also when called from inside a running event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def migration_revisions(backend: str) -> dict[str, str | None]:
    """Prefect's migrations for a backend: revision -> the revision it follows.

    Parameters
    ----------
    backend : str
        ``"sqlite"`` or ``"postgresql"``.

    Returns
    -------
    dict
        Read from the installed Prefect's migration files without importing Prefect.
    """
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise ServerError("Prefect is not installed: pip install 'prefect>=3'")
    versions = Path(spec.origin).parent / "server" / "database" / "_migrations" / "versions"
    graph: dict[str, str | None] = {}
    for path in sorted((versions / backend).glob("*.py")):
        text = path.read_text(encoding="utf-8")
        revision = re.search(r'^revision\s*=\s*"(\w+)"', text, re.MULTILINE)
        down = re.search(r'^down_revision\s*=\s*(?:"(\w+)"|None)', text, re.MULTILINE)
        if revision and down:
            graph[revision.group(1)] = down.group(1)
    return graph


def head_revision(backend: str) -> str:
    """The newest of Prefect's migrations for ``backend`` (the one nothing follows).

    Raises
    ------
    ServerError
        If the installed Prefect has no migrations for it, or more than one head.
    """
    graph = migration_revisions(backend)
    heads = sorted(set(graph) - {down for down in graph.values() if down})
    if len(heads) != 1:
        raise ServerError(
            f"cannot tell the newest Prefect migration for {backend} (heads: {heads}); "
            "reinstall Prefect"
        )
    return heads[0]


def upgrade_database(url: str, prefect_home: Path, *, timeout: float = _MIGRATE_TIMEOUT) -> None:
    """Apply Prefect's migrations with ``prefect server database upgrade -y``.

    Parameters
    ----------
    url : str
        Async database URL.
    prefect_home : Path
        ``PREFECT_HOME`` of the command (its profiles and logs).
    timeout : float
        Seconds the migration may take.

    Raises
    ------
    ServerError
        If the command fails or times out; the message holds its output, password masked.
    """
    env = dict(os.environ)
    env.pop("PREFECT_API_DATABASE_CONNECTION_URL", None)
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_DATABASE_CONNECTION_URL=url,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
    )
    prefect_home.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"]
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, env=env, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired:
        raise ServerError(
            f"migrating the Prefect database {mask_url(url)} took longer than {timeout:g} s"
        ) from None
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip().splitlines()[-20:]
        text = "\n".join(output)
        password = make_url(url).password
        if password:
            text = text.replace(str(password), "***")
        raise ServerError(
            f"migrating the Prefect database {mask_url(url)} failed "
            f"(exit {result.returncode}):\n{text}"
        )


# -- authentication ------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class AuthSettings:
    """Authentication resolved from the environment.

    Attributes
    ----------
    enabled : bool
        Whether the Prefect server and the REST API require credentials.
    prefect_auth_string : str or None
        Basic-auth ``user:password`` of the Prefect server and its clients.
    api_tokens : tuple of str
        Bearer tokens the REST API accepts.
    prefect_auth_string_env, api_tokens_env : str
        Names of the variables they came from.
    """

    enabled: bool
    prefect_auth_string: str | None
    api_tokens: tuple[str, ...]
    prefect_auth_string_env: str = DEFAULT_AUTH_STRING_ENV
    api_tokens_env: str = DEFAULT_API_TOKENS_ENV

    def __repr__(self) -> str:
        return f"AuthSettings({self.describe()})"

    def describe(self) -> dict[str, Any]:
        """Plain data without the secrets: what is on and where it comes from."""
        return {
            "enabled": self.enabled,
            "prefect_auth_string_env": self.prefect_auth_string_env,
            "prefect_auth": self.prefect_auth_string is not None,
            "api_tokens_env": self.api_tokens_env,
            "api_tokens": len(self.api_tokens),
        }


def resolve_auth(auth_config: Mapping[str, Any], environ: Mapping[str, str]) -> AuthSettings:
    """Read the secrets that ``auth_config`` points at from the environment.

    Parameters
    ----------
    auth_config : mapping
        ``enabled`` (bool, default true), ``prefect_auth_string_env`` (name of the
        variable holding the server's ``user:password``, default
        ``ASTR_PREFECT_API_AUTH_STRING``) and ``api_tokens_env`` (name of the variable
        holding comma-separated API tokens, default ``ASTR_API_TOKENS``).
    environ : mapping
        The environment to read them from.

    Returns
    -------
    AuthSettings
        With no secrets when ``enabled`` is false.

    Raises
    ------
    ConfigError
        If ``auth_config`` holds an unknown key, a literal secret or a value that is not
        a variable name, or if authentication is enabled but a variable is unset or its
        value is too weak.
    """
    if not isinstance(auth_config, Mapping):
        raise ConfigError(f"auth_config must be a dict, got {type(auth_config).__name__}")
    for key in auth_config:
        _check_auth_key(str(key))
    enabled = auth_config.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"auth_config['enabled'] must be true or false, got {enabled!r}")
    string_env = _variable(auth_config, "prefect_auth_string_env", DEFAULT_AUTH_STRING_ENV)
    tokens_env = _variable(auth_config, "api_tokens_env", DEFAULT_API_TOKENS_ENV)
    if not enabled:
        return AuthSettings(False, None, (), string_env, tokens_env)
    auth_string = _auth_string(environ.get(string_env, ""), string_env)
    tokens = _tokens(environ.get(tokens_env, ""), tokens_env)
    return AuthSettings(True, auth_string, tokens, string_env, tokens_env)


def _check_auth_key(key: str) -> None:
    if key in AUTH_KEYS:
        return
    if any(word in key.lower() for word in _SECRET_WORDS):
        raise ConfigError(
            f"auth_config[{key!r}] looks like a literal secret; secrets come from the "
            "environment only: put it in an environment variable and give that variable's "
            "name as 'prefect_auth_string_env' or 'api_tokens_env'"
        )
    raise ConfigError(f"auth_config has unknown key {key!r}; allowed: {', '.join(AUTH_KEYS)}")


def _variable(auth_config: Mapping[str, Any], key: str, default: str) -> str:
    name = auth_config.get(key, default)
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise ConfigError(
            f"auth_config[{key!r}] must name an environment variable (upper case letters, "
            "digits, '_'); the value given is not one (a literal secret is never accepted "
            "here: put it in a variable and name the variable)"
        )
    return name


def _auth_string(value: str, variable: str) -> str:
    user, _, password = value.partition(":")
    if not value:
        raise ConfigError(
            f"authentication is enabled but {variable} is not set: set it to the Prefect "
            "server's basic-auth 'user:password'"
        )
    if not user or len(password) < MIN_PASSWORD_LENGTH:
        raise ConfigError(
            f"{variable} must be 'user:password' with a password of at least "
            f"{MIN_PASSWORD_LENGTH} characters"
        )
    return value


def _tokens(value: str, variable: str) -> tuple[str, ...]:
    tokens = tuple(token.strip() for token in value.split(",") if token.strip())
    if not tokens:
        raise ConfigError(
            f"authentication is enabled but {variable} holds no token: set it to one or more "
            "comma-separated tokens, e.g. from "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    short = [i for i, token in enumerate(tokens, 1) if len(token) < MIN_TOKEN_LENGTH]
    if short:
        raise ConfigError(
            f"{variable}: token(s) number {', '.join(map(str, short))} are shorter than "
            f"{MIN_TOKEN_LENGTH} characters; use random tokens, e.g. secrets.token_urlsafe(32)"
        )
    return tokens


# -- storage -------------------------------------------------------------------------------


def storage_round_trip(storage: StorageConfig) -> str:
    """Write, read back, compare and delete a small object in the artifact store.

    Parameters
    ----------
    storage : StorageConfig

    Returns
    -------
    str
        What was checked, e.g. ``"write, read, sha256 and delete ok"``.

    Raises
    ------
    StorageError
        If any step fails or the bytes read back differ; the message names the store
        and what to check.
    """
    from pipeline.store.storage import ArtifactStore

    key = f"_health/{uuid.uuid4().hex}.txt"
    payload = f"astr storage check {key}\n".encode()
    step = "open"
    try:
        store = ArtifactStore(storage)
        step = "write"
        stored = store.put(key, payload)
        step = "read"
        same = store.read_bytes(key) == payload and store.checksum(key) == stored.sha256
        step = "delete"
        store.delete(key)
        gone = not store.exists(key)
    except (OSError, ValueError, TypeError, StorageError) as exc:
        raise StorageError(_storage_failure(storage, step, exc)) from None
    if not same:
        raise StorageError(f"artifact storage {storage.url}: the bytes read back differ")
    if not gone:
        raise StorageError(f"artifact storage {storage.url}: a deleted object is still there")
    return "write, read, sha256 and delete ok"


def _storage_failure(storage: StorageConfig, step: str, exc: BaseException) -> str:
    reason = str(exc) or type(exc).__name__
    if storage.backend == "s3":
        hint = (
            f"check that bucket {storage.bucket!r} exists, that AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY allow writing to it, and storage.options' endpoint_url "
            f"({storage.options.get('endpoint_url', 'AWS default')})"
        )
    else:
        hint = f"check that {storage.root} is a writable directory"
    return f"artifact storage {storage.url} failed its {step} check ({reason}); {hint}"


def result_storage_url(storage: StorageConfig) -> str:
    """Where Prefect keeps flow results: ``<storage root>/prefect-results``."""
    return f"{storage.url.rstrip('/')}/prefect-results"


def result_storage_block(storage: StorageConfig) -> Any:
    """The Prefect filesystem block for flow results in ``storage`` (not saved).

    Returns
    -------
    prefect.filesystems.LocalFileSystem or prefect.filesystems.RemoteFileSystem
        ``RemoteFileSystem`` goes through fsspec with ``storage.options`` (e.g.
        ``endpoint_url``); credentials come from the ``AWS_*`` variables of the process
        that writes results, never from the block.
    """
    from prefect.filesystems import LocalFileSystem, RemoteFileSystem

    if storage.backend == "local":
        return LocalFileSystem(basepath=result_storage_url(storage))
    return RemoteFileSystem(basepath=result_storage_url(storage), settings=dict(storage.options))


# -- health --------------------------------------------------------------------------------


def api_request(
    url: str,
    *,
    auth_string: str | None,
    body: Any = None,
    timeout: float = 5.0,
) -> tuple[int, Any]:
    """Call the Prefect API: GET, or POST with a JSON body; return status and decoded JSON.

    Parameters
    ----------
    url : str
        Full endpoint URL, e.g. ``http://127.0.0.1:4200/api/admin/version``.
    auth_string : str, optional
        Basic-auth ``user:password``.
    body : object, optional
        JSON body; given, the request is a POST.
    timeout : float
        Seconds to wait.

    Returns
    -------
    status : int
        HTTP status (an error status is returned, not raised).
    payload : object
        Decoded JSON, or None when the body is not JSON.

    Raises
    ------
    OSError
        If the server cannot be reached.
    """
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if auth_string:
        token = base64.b64encode(auth_string.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    host = urlsplit(url).hostname or ""
    handlers = (
        [urllib.request.ProxyHandler({})] if host in ("127.0.0.1", "localhost", "::1") else []
    )
    try:
        with urllib.request.build_opener(*handlers).open(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as error:
        status, raw = error.code, error.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, None


def worker_state(api_url: str, deployment_name: str, auth_string: str | None) -> dict[str, Any]:
    """Whether a runner serves the pipeline's deployments (status READY, recently polled).

    Parameters
    ----------
    api_url : str
        Prefect API URL.
    deployment_name : str
        Name every pipeline deployment has (``astr``).
    auth_string : str, optional
        Basic-auth ``user:password``.

    Returns
    -------
    dict
        ``ok`` (at least one deployment and all READY), ``deployments``, ``ready``,
        ``not_ready`` (flow names), ``last_polled`` (newest, ISO 8601) and ``error``.
    """
    base = api_url.rstrip("/")
    query = {"deployments": {"name": {"any_": [deployment_name]}}, "limit": 200}
    status, deployments = api_request(
        f"{base}/deployments/filter", auth_string=auth_string, body=query
    )
    if status != 200 or not isinstance(deployments, list):
        return _worker_failure(f"listing deployments answered HTTP {status}")
    status, flows = api_request(f"{base}/flows/filter", auth_string=auth_string, body=query)
    names = {f["id"]: f["name"] for f in flows} if status == 200 and isinstance(flows, list) else {}
    ready = [d for d in deployments if d.get("status") == "READY"]
    polled = [d["last_polled"] for d in deployments if d.get("last_polled")]
    state: dict[str, Any] = {
        "ok": bool(deployments) and len(ready) == len(deployments),
        "deployments": len(deployments),
        "ready": len(ready),
        "not_ready": sorted(
            names.get(d["flow_id"], d["flow_id"]) for d in deployments if d not in ready
        ),
        "last_polled": max(polled) if polled else None,
        "error": None,
    }
    if not deployments:
        state["error"] = (
            f"no deployment named {deployment_name!r} on the server: start `astr worker`"
        )
    elif not state["ok"]:
        state["error"] = (
            f"{len(deployments) - len(ready)} deployment(s) not polled recently: is `astr worker` "
            "running and pointed at this server?"
        )
    return state


def _worker_failure(error: str) -> dict[str, Any]:
    return {
        "ok": False,
        "deployments": 0,
        "ready": 0,
        "not_ready": [],
        "last_polled": None,
        "error": error,
    }
