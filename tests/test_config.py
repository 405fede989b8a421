"""Settings: layering of defaults, TOML file and environment, and every invalid-setting error."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.config import (
    ENVIRONMENTS,
    StorageConfig,
    WorkflowConfig,
    describe,
    get_config,
    load_config,
)
from pipeline.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _write(directory: Path, name: str, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def test_embedded_defaults_without_any_file(tmp_path: Path) -> None:
    config = load_config({}, cwd=tmp_path)
    # no environments/ in tmp_path, but the repository's dev.toml is found beside the package
    assert config.environment == "dev"
    assert config.home == tmp_path / ".astr"
    assert config.database_url == f"sqlite:///{tmp_path / '.astr' / 'catalogue.db'}"
    assert config.storage_config == StorageConfig("local", str(tmp_path / ".astr" / "artifacts"))
    assert config.mlflow_tracking_uri == f"sqlite:///{tmp_path / '.astr' / 'mlflow.db'}"
    assert config.max_concurrent_flows == 4
    assert config.authentication_enabled is False
    assert config.api_tokens == ()


def test_dataclass_has_the_required_fields() -> None:
    names = list(WorkflowConfig.__dataclass_fields__)
    assert names[:9] == [
        "prefect_server_url",
        "database_url",
        "storage_config",
        "authentication_enabled",
        "monitoring_enabled",
        "alerting_enabled",
        "max_concurrent_flows",
        "flow_timeout",
        "retry_attempts",
    ]


@pytest.mark.parametrize("env", ENVIRONMENTS)
def test_committed_environment_files_load(env: str, tmp_path: Path) -> None:
    config = load_config({"ASTR_ENV": env}, config_dir=REPO / "environments", cwd=tmp_path)
    assert config.environment == env
    assert config.storage_config.backend == "local"


def test_prod_turns_authentication_and_alerting_on(tmp_path: Path) -> None:
    config = load_config({"ASTR_ENV": "prod"}, config_dir=REPO / "environments", cwd=tmp_path)
    assert config.authentication_enabled and config.alerting_enabled
    assert config.max_concurrent_flows == 8


def test_file_overrides_defaults_and_environment_overrides_file(tmp_path: Path) -> None:
    _write(
        tmp_path / "cfg",
        "test",
        'max_concurrent_flows = 7\nflow_timeout = 99\n[storage]\nroot = "/data/astr"\n',
    )
    environ = {"ASTR_ENV": "test", "ASTR_CONFIG_DIR": str(tmp_path / "cfg")}
    from_file = load_config(environ, cwd=tmp_path)
    assert from_file.max_concurrent_flows == 7
    assert from_file.flow_timeout == 99
    assert from_file.storage_config.root == "/data/astr"
    assert from_file.retry_attempts == 2  # untouched: embedded default

    overridden = load_config(
        {**environ, "ASTR_MAX_CONCURRENT_FLOWS": "3", "ASTR_STORAGE_ROOT": "rel/art"},
        cwd=tmp_path,
    )
    assert overridden.max_concurrent_flows == 3
    assert overridden.flow_timeout == 99
    assert overridden.storage_config.root == str(tmp_path / "rel" / "art")


def test_environments_dir_in_working_directory_is_used(tmp_path: Path) -> None:
    _write(tmp_path / "environments", "dev", "retry_attempts = 5\n")
    assert load_config({}, cwd=tmp_path).retry_attempts == 5


def test_home_placeholder_and_astr_home(tmp_path: Path) -> None:
    config = load_config({"ASTR_HOME": str(tmp_path / "h")}, cwd=tmp_path)
    assert config.home == tmp_path / "h"
    assert config.database_url == f"sqlite:///{tmp_path / 'h' / 'catalogue.db'}"
    assert config.optuna_storage_url == f"sqlite:///{tmp_path / 'h' / 'optuna.db'}"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("1", True),
        ("YES", True),
        ("on", True),
        ("false", False),
        ("0", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_boolean_spellings(value: str, expected: bool, tmp_path: Path) -> None:
    config = load_config({"ASTR_ALERTING_ENABLED": value}, cwd=tmp_path)
    assert config.alerting_enabled is expected


def test_s3_root_url_selects_s3_backend(tmp_path: Path) -> None:
    config = load_config(
        {
            "ASTR_STORAGE_ROOT": "s3://survey/astr/prod/",
            "ASTR_STORAGE_OPTIONS": '{"endpoint_url": "http://127.0.0.1:9000"}',
        },
        cwd=tmp_path,
    )
    storage = config.storage_config
    assert (storage.backend, storage.bucket, storage.prefix) == ("s3", "survey", "astr/prod")
    assert storage.url == "s3://survey/astr/prod"
    assert storage.options == {"endpoint_url": "http://127.0.0.1:9000"}


def test_secrets_come_from_environment_and_are_masked(tmp_path: Path) -> None:
    config = load_config(
        {
            "ASTR_API_TOKENS": "tok-one, tok-two,",
            "ASTR_PREFECT_API_AUTH_STRING": "admin:pa55",
            "ASTR_DATABASE_URL": "postgresql+psycopg://astr:hunter2@db:5432/astr",
        },
        cwd=tmp_path,
    )
    assert config.api_tokens == ("tok-one", "tok-two")
    assert config.prefect_api_auth_string == "admin:pa55"
    shown = describe(config)
    text = repr(shown) + repr(config)
    for secret in ("tok-one", "tok-two", "pa55", "hunter2"):
        assert secret not in text
    assert shown["api_tokens"] == ["****", "****"]
    assert shown["database_url"].startswith("postgresql+psycopg://astr:***@db")


def test_get_config_is_loaded_once_and_reads_the_process_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ASTR_RETRY_ATTEMPTS", "4")
    first = get_config()
    monkeypatch.setenv("ASTR_RETRY_ATTEMPTS", "6")
    assert get_config() is first and first.retry_attempts == 4
    get_config.cache_clear()
    assert get_config().retry_attempts == 6


# -- invalid settings: every error names the key, where it came from and what is allowed --

INVALID_ENV = [
    ({"ASTR_ENV": "staging"}, ["ASTR_ENV", "staging", "dev, test, prod"]),
    (
        {"ASTR_MAX_CONCURRENT_FLOWS": "abc"},
        ["max_concurrent_flows", "ASTR_MAX_CONCURRENT_FLOWS", "1 to 1000"],
    ),
    ({"ASTR_MAX_CONCURRENT_FLOWS": "0"}, ["max_concurrent_flows", "1 to 1000"]),
    ({"ASTR_FLOW_TIMEOUT": "-5"}, ["flow_timeout", "1 to 604800"]),
    ({"ASTR_RETRY_ATTEMPTS": "2.5"}, ["retry_attempts", "0 to 20"]),
    ({"ASTR_RETRY_ATTEMPTS": "21"}, ["retry_attempts", "0 to 20"]),
    (
        {"ASTR_AUTHENTICATION_ENABLED": "maybe"},
        ["authentication_enabled", "maybe", "true", "false"],
    ),
    ({"ASTR_MONITORING_ENABLED": ""}, ["monitoring_enabled", "not a boolean"]),
    ({"ASTR_PREFECT_SERVER_URL": "localhost:4200"}, ["prefect_server_url", "http(s) URL"]),
    ({"ASTR_DATABASE_URL": "not a url"}, ["database_url", "not a database URL"]),
    (
        {"ASTR_DATABASE_URL": "mysql://u@h/db"},
        ["database_url", "mysql", "sqlite", "postgresql+asyncpg"],
    ),
    ({"ASTR_OPTUNA_STORAGE_URL": "oracle://h/db"}, ["optuna_storage_url", "oracle"]),
    ({"ASTR_MLFLOW_TRACKING_URI": "ftp://h/x"}, ["mlflow_tracking_uri", "ftp"]),
    ({"ASTR_LOG_LEVEL": "LOUD"}, ["log_level", "LOUD", "DEBUG, INFO"]),
    ({"ASTR_STORAGE_BACKEND": "gcs"}, ["storage.backend", "gcs", "local, s3"]),
    ({"ASTR_STORAGE_BACKEND": "s3"}, ["storage.bucket", "ASTR_STORAGE_BUCKET"]),
    ({"ASTR_STORAGE_ROOT": ""}, ["storage.root", "empty"]),
    ({"ASTR_STORAGE_ROOT": "gs://bucket/x"}, ["storage.root", "is a URL"]),
    ({"ASTR_STORAGE_OPTIONS": "{oops"}, ["storage.options", "not valid JSON"]),
    ({"ASTR_STORAGE_OPTIONS": "[1, 2]"}, ["storage.options", "JSON object"]),
    (
        {"ASTR_STORAGE_OPTIONS": '{"secret": "x"}'},
        ["storage.options", "'secret'", "AWS_SECRET_ACCESS_KEY"],
    ),
    (
        {"ASTR_MAX_CONCURENT_FLOWS": "3"},
        ["ASTR_MAX_CONCURENT_FLOWS", "not a setting", "ASTR_MAX_CONCURRENT_FLOWS"],
    ),
]


@pytest.mark.parametrize(("environ", "needles"), INVALID_ENV)
def test_invalid_environment_values_fail_with_a_clear_message(
    environ: dict[str, str], needles: list[str], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(environ, cwd=tmp_path)
    for needle in needles:
        assert needle in str(info.value)


INVALID_FILES = [
    ("max_concurrent_flows = 'many'\n", ["max_concurrent_flows", "dev.toml", "1 to 1000"]),
    ("retry_attempts = true\n", ["retry_attempts", "0 to 20"]),
    ("alerting_enabled = 3\n", ["alerting_enabled", "not a boolean"]),
    ("colour = 'blue'\n", ["unknown setting colour", "allowed:", "max_concurrent_flows"]),
    ("storage = 'x'\n", ["storage must be a table"]),
    ("[storage]\nregion = 'eu'\n", ["unknown setting storage.region", "storage.bucket"]),
    ("api_tokens = 'abc'\n", ["api_tokens is a secret", "ASTR_API_TOKENS"]),
    ("prefect_api_auth_string = 'u:p'\n", ["secret", "ASTR_PREFECT_API_AUTH_STRING"]),
    ("[storage]\noptions = { aws_secret_access_key = 'x' }\n", ["looks like a credential"]),
    ("max_concurrent_flows = \n", ["not valid TOML"]),
]


@pytest.mark.parametrize(("text", "needles"), INVALID_FILES)
def test_invalid_settings_files_fail_with_a_clear_message(
    text: str, needles: list[str], tmp_path: Path
) -> None:
    _write(tmp_path / "cfg", "dev", text)
    with pytest.raises(ConfigError) as info:
        load_config({"ASTR_CONFIG_DIR": str(tmp_path / "cfg")}, cwd=tmp_path)
    for needle in needles:
        assert needle in str(info.value)


def test_explicit_config_dir_without_the_file_fails(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"no prod\.toml there"):
        load_config({"ASTR_ENV": "prod", "ASTR_CONFIG_DIR": str(tmp_path / "empty")}, cwd=tmp_path)


def test_environment_override_fixes_a_bad_file_value(tmp_path: Path) -> None:
    _write(tmp_path / "cfg", "dev", "flow_timeout = 0\n")
    environ = {"ASTR_CONFIG_DIR": str(tmp_path / "cfg"), "ASTR_FLOW_TIMEOUT": "30"}
    assert load_config(environ, cwd=tmp_path).flow_timeout == 30
