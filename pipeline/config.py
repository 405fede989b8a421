"""Settings: embedded defaults, then ``environments/<env>.toml``, then ``ASTR_*`` variables.

Every setting has an embedded default, so nothing needs to be installed or written
before the pipeline runs. One project home directory (``./.astr`` unless ``ASTR_HOME``
says otherwise) holds the SQLite files and the artifacts. ``ASTR_ENV`` (``dev``,
``test`` or ``prod``; default ``dev``) chooses the settings file, and each field can
be overridden by ``ASTR_<FIELD>``. Secrets (API tokens, the Prefect auth string,
object-store keys, alert channel passwords and webhook URLs) are read from the
environment only: a settings file that holds one is rejected.

The ``[alerting]`` table (or ``ASTR_ALERTING`` as a JSON object) holds alert routes;
``pipeline.workflow.alerting`` validates it. A channel names its secret
(``password_secret = "smtp"``) and the value comes from ``ASTR_ALERT_SECRET_SMTP``.
"""

from __future__ import annotations

import functools
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from pipeline.errors import ConfigError

__all__ = [
    "ALERT_SECRET_PREFIX",
    "DATABASE_DRIVERS",
    "ENVIRONMENTS",
    "LOG_LEVELS",
    "PREFECT_DATABASE_DRIVERS",
    "STORAGE_BACKENDS",
    "StorageConfig",
    "TaskRunnerSpec",
    "WorkflowConfig",
    "describe",
    "get_config",
    "load_config",
    "prefect_database_url",
    "task_runner_spec",
]

ENVIRONMENTS = ("dev", "test", "prod")
STORAGE_BACKENDS = ("local", "s3")
DATABASE_DRIVERS = (
    "sqlite",
    "postgresql",
    "postgresql+psycopg",
    "postgresql+psycopg2",
    "postgresql+asyncpg",
)
PREFECT_DATABASE_DRIVERS = ("sqlite+aiosqlite", "sqlite", "postgresql+asyncpg", "postgresql")
"""Drivers of the Prefect server's database; it runs on asyncio, so plain names map to
``sqlite+aiosqlite`` and ``postgresql+asyncpg``."""
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_TASK_RUNNER_EXAMPLES = '"threads", "dask", "dask:4" or "dask:tcp://scheduler:8786"'

_PREFIX = "ASTR_"
_MASK = "****"
# Variables that steer loading itself or carry secrets; not fields of a settings file.
_CONTROL_VARS = ("ENV", "HOME", "CONFIG_DIR")
_SECRET_VARS = {"API_TOKENS": "api_tokens", "PREFECT_API_AUTH_STRING": "prefect_api_auth_string"}
#: ``ASTR_ALERT_SECRET_<NAME>`` holds the secret an alert channel names (``*_secret = "name"``).
ALERT_SECRET_PREFIX = "ASTR_ALERT_SECRET_"
_SECRET_WORDS = ("secret", "password", "token", "key", "credential", "auth")


@dataclass(frozen=True)
class StorageConfig:
    """Where artifacts live.

    Parameters
    ----------
    backend : str
        ``"local"`` (a directory) or ``"s3"`` (an S3-compatible bucket).
    root : str
        Absolute directory of the local backend.
    bucket : str
        Bucket of the S3 backend.
    prefix : str
        Key prefix inside the bucket (may be empty).
    options : dict
        Keyword arguments for the fsspec filesystem (``endpoint_url``, ``client_kwargs``...).
        Credentials come from the usual ``AWS_*`` variables, never from here.
    """

    backend: str = "local"
    root: str = ""
    bucket: str = ""
    prefix: str = ""
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Root of the store as a URL (``s3://bucket/prefix``) or an absolute path."""
        if self.backend == "s3":
            return f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        return self.root


@dataclass(frozen=True, repr=False)
class WorkflowConfig:
    """Effective settings of one process, loaded once by :func:`get_config`.

    Its ``repr`` masks secrets (tokens, passwords in URLs), so it is safe to log.
    """

    prefect_server_url: str
    database_url: str
    storage_config: StorageConfig
    authentication_enabled: bool
    monitoring_enabled: bool
    alerting_enabled: bool
    max_concurrent_flows: int
    flow_timeout: int
    retry_attempts: int
    environment: str = "dev"
    home: Path = Path(".astr")
    mlflow_tracking_uri: str = ""
    optuna_storage_url: str = ""
    log_level: str = "INFO"
    prefect_database_url: str = ""
    task_runner: str = "threads"
    api_tokens: tuple[str, ...] = field(default=(), repr=False)
    prefect_api_auth_string: str | None = field(default=None, repr=False)
    alerting: dict[str, Any] = field(default_factory=dict)
    alert_secrets: dict[str, str] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in describe(self).items())
        return f"WorkflowConfig({shown})"


_DEFAULTS: dict[str, Any] = {
    "prefect_server_url": "http://127.0.0.1:4200/api",
    "database_url": "sqlite:///{home}/catalogue.db",
    "authentication_enabled": False,
    "monitoring_enabled": True,
    "alerting_enabled": False,
    "max_concurrent_flows": 4,
    "flow_timeout": 3600,
    "retry_attempts": 2,
    "mlflow_tracking_uri": "sqlite:///{home}/mlflow.db",
    "optuna_storage_url": "sqlite:///{home}/optuna.db",
    "log_level": "INFO",
    "alerting": {},
    "prefect_database_url": "",
    "task_runner": "threads",
}
_STORAGE_DEFAULTS: dict[str, Any] = {
    "backend": "local",
    "root": "{home}/artifacts",
    "bucket": "",
    "prefix": "",
    "options": {},
}
_INT_RANGES = {
    "max_concurrent_flows": (1, 1000),
    "flow_timeout": (1, 7 * 24 * 3600),
    "retry_attempts": (0, 20),
}
_BOOL_FIELDS = ("authentication_enabled", "monitoring_enabled", "alerting_enabled")
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def load_config(
    environ: Mapping[str, str] | None = None,
    config_dir: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> WorkflowConfig:
    """Load the settings from defaults, the environment's TOML file and ``ASTR_*`` variables.

    Parameters
    ----------
    environ : mapping, optional
        Environment variables (default: ``os.environ``).
    config_dir : path, optional
        Directory holding ``dev.toml``, ``test.toml`` and ``prod.toml``. Default:
        ``ASTR_CONFIG_DIR``, else ``./environments``, else the one beside the package.
    cwd : path, optional
        Directory that relative paths are resolved against (default: the current one).

    Returns
    -------
    WorkflowConfig

    Raises
    ------
    ConfigError
        If a setting is unknown, malformed or outside its allowed values; the message
        names the key, where it came from and what is allowed.
    """
    env = dict(os.environ if environ is None else environ)
    base = Path(cwd) if cwd is not None else Path.cwd()
    _reject_unknown_variables(env)
    environment = _choice("ASTR_ENV", env.get("ASTR_ENV", "dev"), ENVIRONMENTS)
    home = _resolve(base, env.get("ASTR_HOME", ".astr"))

    explicit_dir = config_dir if config_dir is not None else env.get("ASTR_CONFIG_DIR")
    file_values, source = _read_settings_file(environment, explicit_dir, base)

    flat = {**_DEFAULTS, **{f"storage.{k}": v for k, v in _STORAGE_DEFAULTS.items()}}
    origin = dict.fromkeys(flat, "default")
    for key, value in file_values.items():
        flat[key], origin[key] = value, source
    for key in list(flat):
        var = _variable_name(key)
        if var in env:
            flat[key], origin[key] = env[var], f"environment variable {var}"

    values = {key: _expand_home(value, home) for key, value in flat.items()}
    return _build(values, origin, environment, home, base, env)


@functools.cache
def get_config() -> WorkflowConfig:
    """Return this process's settings, loaded once from the environment.

    Call ``get_config.cache_clear()`` after changing ``ASTR_*`` variables in-process.
    """
    return load_config()


def describe(config: WorkflowConfig) -> dict[str, Any]:
    """Return the settings as plain data with every secret masked.

    Parameters
    ----------
    config : WorkflowConfig

    Returns
    -------
    dict
        JSON-serialisable settings; passwords in URLs, tokens and secret storage
        options are replaced by ``****``.
    """
    data = asdict(config)
    data["home"] = str(config.home)
    for key in (
        "database_url",
        "mlflow_tracking_uri",
        "optuna_storage_url",
        "prefect_server_url",
        "prefect_database_url",
    ):
        data[key] = _mask_url(data[key])
    data["api_tokens"] = [_MASK] * len(config.api_tokens)
    data["prefect_api_auth_string"] = _MASK if config.prefect_api_auth_string else None
    data["alert_secrets"] = dict.fromkeys(config.alert_secrets, _MASK)
    data["storage_config"]["options"] = _mask_options(config.storage_config.options)
    data["storage_config"]["url"] = config.storage_config.url
    return data


def _build(
    values: dict[str, Any],
    origin: dict[str, str],
    environment: str,
    home: Path,
    base: Path,
    env: Mapping[str, str],
) -> WorkflowConfig:
    """Validate the merged raw values and assemble a WorkflowConfig."""

    def where(key: str) -> str:
        return f"{key} (from {origin[key]})"

    storage = _build_storage(values, where, base)
    kwargs: dict[str, Any] = {
        "prefect_server_url": _http_url(where("prefect_server_url"), values["prefect_server_url"]),
        "database_url": _database_url(where("database_url"), values["database_url"]),
        "storage_config": storage,
        "mlflow_tracking_uri": _tracking_uri(
            where("mlflow_tracking_uri"), values["mlflow_tracking_uri"]
        ),
        "optuna_storage_url": _database_url(
            where("optuna_storage_url"), values["optuna_storage_url"]
        ),
        "log_level": _choice(where("log_level"), str(values["log_level"]).upper(), LOG_LEVELS),
        "alerting": _alerting_table(where("alerting"), values["alerting"], home),
        "prefect_database_url": prefect_database_url(
            values["prefect_database_url"], where("prefect_database_url")
        )
        if values["prefect_database_url"]
        else "",
        "task_runner": str(values["task_runner"]).strip(),
    }
    task_runner_spec(kwargs["task_runner"], where("task_runner"))  # refuse a bad value now
    for key in _BOOL_FIELDS:
        kwargs[key] = _as_bool(where(key), values[key])
    for key, (low, high) in _INT_RANGES.items():
        kwargs[key] = _as_int(where(key), values[key], low, high)
    tokens = tuple(t.strip() for t in env.get("ASTR_API_TOKENS", "").split(",") if t.strip())
    return WorkflowConfig(
        **kwargs,
        environment=environment,
        home=home,
        api_tokens=tokens,
        prefect_api_auth_string=env.get("ASTR_PREFECT_API_AUTH_STRING") or None,
        alert_secrets={
            name.removeprefix(ALERT_SECRET_PREFIX).lower(): value
            for name, value in env.items()
            if name.startswith(ALERT_SECRET_PREFIX) and value
        },
    )


def _alerting_table(where: str, value: Any, home: Path) -> dict[str, Any]:
    """The ``[alerting]`` table: a table (or JSON object) holding no secret itself."""
    value = _json_object(
        where, value, '{"routes": [{"name": "team", "channels": [{"type": "log"}]}]}'
    )
    _reject_alert_secrets(where, value)
    return _expand_home_deep(value, home)


def _json_object(where: str, value: Any, example: str) -> dict[str, Any]:
    """A table from a settings file, or the JSON object an environment variable holds."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else {}
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{where} is not valid JSON ({exc.msg}): give a JSON object, e.g. {example}"
            ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table / JSON object, e.g. {example}")
    return value


def _reject_alert_secrets(where: str, value: Any, path: str = "alerting") -> None:
    """Alert settings may be committed: a password or token must be named, not given."""
    if isinstance(value, dict):
        for key, item in value.items():
            lowered = str(key).lower()
            if any(w in lowered for w in _SECRET_WORDS) and not lowered.endswith("_secret"):
                raise ConfigError(
                    f"{where}: {path}.{key} looks like a secret; put the value in "
                    f'{ALERT_SECRET_PREFIX}<NAME> and write {key}_secret = "<name>" instead'
                )
            _reject_alert_secrets(where, item, f"{path}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_alert_secrets(where, item, f"{path}[{index}]")


def _expand_home_deep(value: Any, home: Path) -> Any:
    if isinstance(value, dict):
        return {key: _expand_home_deep(item, home) for key, item in value.items()}
    if isinstance(value, list):
        return [_expand_home_deep(item, home) for item in value]
    return _expand_home(value, home)


def _build_storage(values: dict[str, Any], where: Any, base: Path) -> StorageConfig:
    """Validate the ``storage.*`` values; an ``s3://`` root selects the S3 backend."""
    backend = _choice(where("storage.backend"), values["storage.backend"], STORAGE_BACKENDS)
    root, bucket, prefix = (str(values[f"storage.{k}"]) for k in ("root", "bucket", "prefix"))
    options = _json_object(
        where("storage.options"),
        values["storage.options"],
        '{"endpoint_url": "http://127.0.0.1:9000"}',
    )
    _reject_secret_options(where("storage.options"), options)
    if root.startswith("s3://"):
        parts = urlsplit(root)
        backend, bucket, prefix = "s3", parts.netloc, parts.path.strip("/")
    if backend == "s3":
        if not bucket:
            raise ConfigError(
                f"{where('storage.bucket')} is empty but the backend is s3: set "
                "ASTR_STORAGE_BUCKET or ASTR_STORAGE_ROOT=s3://bucket/prefix"
            )
        return StorageConfig("s3", "", bucket, prefix.strip("/"), options)
    if "://" in root:
        raise ConfigError(
            f"{where('storage.root')}={root!r} is a URL but the backend is local: "
            "give a directory, or an s3://bucket/prefix URL for the s3 backend"
        )
    if not root:
        raise ConfigError(f"{where('storage.root')} is empty: give the artifact directory")
    return StorageConfig("local", str(_resolve(base, root)), "", "", options)


def _read_settings_file(
    environment: str, explicit_dir: str | os.PathLike[str] | None, base: Path
) -> tuple[dict[str, Any], str]:
    """Read ``<dir>/<environment>.toml`` into flat ``key`` / ``storage.key`` values."""
    if explicit_dir is not None:
        directory = _resolve(base, explicit_dir)
        if not (directory / f"{environment}.toml").is_file():
            raise ConfigError(
                f"ASTR_CONFIG_DIR={str(explicit_dir)!r}: no {environment}.toml there; "
                f"expected one of {', '.join(e + '.toml' for e in ENVIRONMENTS)}"
            )
    else:
        candidates = [base / "environments", Path(__file__).resolve().parents[1] / "environments"]
        directory = next((d for d in candidates if (d / f"{environment}.toml").is_file()), None)
        if directory is None:
            return {}, "default"
    path = directory / f"{environment}.toml"
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    return _flatten_file(data, str(path)), str(path)


def _flatten_file(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Check a settings file's keys and flatten its ``[storage]`` table."""
    allowed = sorted([*_DEFAULTS, "storage"])
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in _SECRET_VARS.values():
            raise ConfigError(
                f"{source}: {key} is a secret and must not be in a settings file; "
                f"set ASTR_{key.upper()} in the environment instead"
            )
        if key == "storage":
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: storage must be a table ([storage])")
            for sub, sub_value in value.items():
                if sub not in _STORAGE_DEFAULTS:
                    raise ConfigError(
                        f"{source}: unknown setting storage.{sub}; allowed: "
                        + ", ".join(f"storage.{k}" for k in _STORAGE_DEFAULTS)
                    )
                flat[f"storage.{sub}"] = sub_value
        elif key in _DEFAULTS:
            flat[key] = value
        else:
            raise ConfigError(f"{source}: unknown setting {key}; allowed: {', '.join(allowed)}")
    return flat


def _reject_unknown_variables(env: Mapping[str, str]) -> None:
    """Fail on a misspelt ``ASTR_*`` variable instead of silently ignoring it."""
    known = {_variable_name(k) for k in _DEFAULTS}
    known |= {_variable_name(f"storage.{k}") for k in _STORAGE_DEFAULTS}
    known |= {_PREFIX + name for name in (*_CONTROL_VARS, *_SECRET_VARS)}
    for name in env:
        if name.startswith(ALERT_SECRET_PREFIX):
            continue
        if name.startswith(_PREFIX) and name not in known:
            raise ConfigError(
                f"environment variable {name} is not a setting; known: {', '.join(sorted(known))}"
            )


def _reject_secret_options(where: str, options: dict[str, Any]) -> None:
    """Storage options may be committed, so they must not carry credentials."""
    for key in options:
        if any(word in key.lower() for word in _SECRET_WORDS) and key != "endpoint_url":
            raise ConfigError(
                f"{where}: option {key!r} looks like a credential; give object-store "
                "credentials through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY instead"
            )


def _variable_name(key: str) -> str:
    return _PREFIX + key.replace(".", "_").upper()


def _expand_home(value: Any, home: Path) -> Any:
    return value.replace("{home}", str(home)) if isinstance(value, str) else value


def _resolve(base: Path, path: str | os.PathLike[str]) -> Path:
    resolved = Path(path).expanduser()
    return (resolved if resolved.is_absolute() else base / resolved).resolve()


def _choice(where: str, value: Any, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{where}={value!r} is not allowed; choose one of: {', '.join(allowed)}")
    return value


def _as_bool(where: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(
        f"{where}={value!r} is not a boolean; use one of: {', '.join(_TRUE + _FALSE)}"
    )


def _as_int(where: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool):
        number = None
    elif isinstance(value, int):
        number = value
    else:
        try:
            number = int(str(value).strip())
        except ValueError:
            number = None
    if number is None or not low <= number <= high:
        raise ConfigError(f"{where}={value!r} must be an integer from {low} to {high}")
    return number


def _http_url(where: str, value: Any) -> str:
    parts = urlsplit(str(value))
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            f"{where}={value!r} is not an http(s) URL; give e.g. http://127.0.0.1:4200/api"
        )
    return str(value).rstrip("/")


def _database_url(where: str, value: Any) -> str:
    try:
        url = make_url(str(value))
    except ArgumentError:
        raise ConfigError(
            f"{where}={value!r} is not a database URL; give e.g. sqlite:////path/catalogue.db "
            "or postgresql+psycopg://user@host/db"
        ) from None
    if url.drivername not in DATABASE_DRIVERS:
        raise ConfigError(
            f"{where} uses driver {url.drivername!r}; allowed: {', '.join(DATABASE_DRIVERS)}"
        )
    return str(value)


def prefect_database_url(value: Any, where: str = "prefect database URL") -> str:
    """Check a Prefect server database URL and give it its async driver.

    Parameters
    ----------
    value : str
        ``sqlite+aiosqlite:////abs/path.db``, ``sqlite:////abs/path.db``,
        ``postgresql+asyncpg://user:password@host:port/db`` or ``postgresql://...``.
    where : str
        Name of the setting, for the error message.

    Returns
    -------
    str
        The URL with ``sqlite+aiosqlite`` or ``postgresql+asyncpg`` as its driver.

    Raises
    ------
    ConfigError
        If the URL does not parse, uses another driver, or lacks a database (a file path
        for SQLite, a host and database name for PostgreSQL); the message masks the password.
    """
    try:
        url = make_url(str(value))
    except ArgumentError:
        raise ConfigError(
            f"{where}={_mask_url(str(value))!r} is not a database URL; give e.g. "
            "sqlite+aiosqlite:////path/prefect.db or postgresql+asyncpg://user@host:5432/prefect"
        ) from None
    shown = url.render_as_string(hide_password=True)
    if url.drivername not in PREFECT_DATABASE_DRIVERS:
        raise ConfigError(
            f"{where}={shown!r} uses driver {url.drivername!r}, but the Prefect server needs an "
            f"asyncio driver; allowed: {', '.join(PREFECT_DATABASE_DRIVERS)} "
            "(e.g. postgresql+asyncpg://user@host:5432/prefect)"
        )
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ConfigError(
                f"{where}={shown!r} names no database file; give sqlite+aiosqlite:////abs/path.db "
                "(an in-memory database would vanish with the server)"
            )
        if not Path(url.database).is_absolute():
            raise ConfigError(
                f"{where}={shown!r} is a relative path; give an absolute one "
                "(sqlite+aiosqlite:////abs/path.db), or leave the setting empty for SQLite "
                "under the project home"
            )
        return url.set(drivername="sqlite+aiosqlite").render_as_string(hide_password=False)
    if not url.host or not url.database:
        raise ConfigError(
            f"{where}={shown!r} needs a host and a database name: "
            "postgresql+asyncpg://user:password@host:5432/prefect"
        )
    return url.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def _tracking_uri(where: str, value: Any) -> str:
    scheme = urlsplit(str(value)).scheme
    if scheme in ("http", "https"):
        return _http_url(where, value)
    if scheme in ("file", "databricks"):
        return str(value)
    return _database_url(where, value)


def _mask_url(value: str) -> str:
    try:
        url = make_url(value)
    except ArgumentError:
        parts = urlsplit(value)
        if parts.password:
            return value.replace(f":{parts.password}@", f":{_MASK}@")
        return value
    return url.render_as_string(hide_password=True) if url.password else value


def _mask_options(options: dict[str, Any]) -> dict[str, Any]:
    return {
        k: (_MASK if any(w in k.lower() for w in _SECRET_WORDS) and k != "endpoint_url" else v)
        for k, v in options.items()
    }


@dataclass(frozen=True)
class TaskRunnerSpec:
    """How ``observation_batch_flow`` runs its pairs, parsed from the ``task_runner`` setting.

    Parameters
    ----------
    kind : str
        ``"threads"``: each pair is a run of the ``observation_pipeline`` deployment, taken
        by any ``astr worker``; ``"dask"``: each pair runs as a task on a Dask cluster.
    workers : int or None
        Worker processes of the local Dask cluster the batch starts (``None``: as many
        as ``max_concurrent_flows``); ``None`` with ``address``.
    address : str or None
        Scheduler of an existing Dask cluster (``tcp://scheduler:8786``).
    """

    kind: str
    workers: int | None = None
    address: str | None = None


def task_runner_spec(value: str, where: str = "task_runner") -> TaskRunnerSpec:
    """Parse the ``task_runner`` setting.

    Parameters
    ----------
    value : str
        ``"threads"``, ``"dask"`` (a local cluster), ``"dask:N"`` (a local cluster of N
        worker processes) or ``"dask:<scheme>://host:port"`` (an existing scheduler).
    where : str
        Name of the setting and where it came from, for the error message.

    Returns
    -------
    TaskRunnerSpec

    Raises
    ------
    ConfigError
        If the value is none of those forms.
    """
    text = str(value).strip()
    if text == "threads":
        return TaskRunnerSpec("threads")
    if text == "dask":
        return TaskRunnerSpec("dask")
    if text.startswith("dask:"):
        rest = text.removeprefix("dask:")
        if rest.isdigit() and 1 <= int(rest) <= 256:
            return TaskRunnerSpec("dask", workers=int(rest))
        parts = urlsplit(rest)
        if parts.scheme in ("tcp", "tls", "ucx", "inproc", "ws", "wss") and parts.hostname:
            if parts.port is None and parts.scheme != "inproc":
                raise ConfigError(
                    f"{where}={value!r} names no port: give the scheduler's address with "
                    "its port, e.g. dask:tcp://scheduler:8786"
                )
            return TaskRunnerSpec("dask", address=rest)
    raise ConfigError(
        f"{where}={value!r} is not a task runner; use one of {_TASK_RUNNER_EXAMPLES} "
        "(dask:N starts a local cluster of N worker processes, dask:<address> uses "
        "an existing scheduler)"
    )
