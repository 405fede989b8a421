"""The Docker files' structure: services, health checks, ports and settings agree with prod.toml.

No Docker engine runs here, so the compose file is read as YAML, its ``${VAR}``
references are filled from ``.env.example`` the way compose would, and the pipeline
services' ``ASTR_*`` variables go through :func:`pipeline.config.load_config`.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pipeline.config import load_config

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "environments" / "docker"
PIPELINE_SERVICES = ("worker", "api")
SERVICES = {
    "postgres",
    "minio",
    "minio-buckets",
    "prefect-server",
    "mlflow",
    "worker",
    "api",
    "prometheus",
}
_REFERENCE = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
_SECRET_NAME = re.compile(r"PASSWORD|TOKEN|AUTH_STRING|SECRET|ACCESS_KEY|ROOT_USER")


def _env_example() -> dict[str, str]:
    values = {}
    for line in (DOCKER / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Fill ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` as compose does."""

    def fill(match: re.Match[str]) -> str:
        name, operator, argument = match.groups()
        if env.get(name):
            return env[name]
        if operator and operator.endswith("-"):
            return argument
        if operator and operator.endswith("?"):
            raise AssertionError(f"compose would stop: {argument}")
        return ""

    return _REFERENCE.sub(fill, value.replace("$$", "\0")).replace("\0", "$")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((DOCKER / "compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = _env_example()
    return {k: _interpolate(str(v), env) for k, v in service.get("environment", {}).items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _option(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _container_ports(service: dict[str, Any]) -> set[int]:
    return {int(str(mapping).rsplit(":", 1)[1]) for mapping in service.get("ports", [])}


def _prod() -> dict[str, Any]:
    return tomllib.loads((REPO / "environments" / "prod.toml").read_text())


def test_every_service_is_there(services: dict[str, Any]) -> None:
    assert set(services) == SERVICES
    for name in ("prefect-server", "mlflow", "worker", "api"):
        assert services[name]["build"]["dockerfile"] == "environments/docker/Dockerfile"
        # compose resolves the build context against the compose file's directory
        assert (DOCKER / services[name]["build"]["context"]).resolve() == REPO.resolve()


def test_every_service_has_a_health_check(services: dict[str, Any]) -> None:
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
        assert check.get("disable") is not True, name
        for key in ("interval", "timeout", "retries"):
            assert key in check, f"{name} healthcheck lacks {key}"


def test_dependencies_wait_for_health(services: dict[str, Any]) -> None:
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on must give conditions"
        for other, rule in depends.items():
            assert other in services, f"{name} depends on unknown {other}"
            one_shot = services[other].get("restart") == "no"
            expected = "service_completed_successfully" if one_shot else "service_healthy"
            assert rule == {"condition": expected}, f"{name} -> {other}"
    # Everything the pipeline needs is up before it starts.
    for name in PIPELINE_SERVICES:
        assert {"prefect-server", "postgres", "minio-buckets"} <= set(services[name]["depends_on"])
    assert "minio" in services["minio-buckets"]["depends_on"]
    assert "api" in services["prometheus"]["depends_on"]


@pytest.mark.parametrize("name", PIPELINE_SERVICES)
def test_pipeline_services_load_as_prod_settings(
    services: dict[str, Any], name: str, tmp_path: Path
) -> None:
    env = _environment(services[name])
    astr = {k: v for k, v in env.items() if k.startswith("ASTR_")}
    config = load_config(astr, config_dir=REPO / "environments", cwd=tmp_path)
    assert config.environment == "prod" and config.authentication_enabled
    assert config.prefect_api_auth_string == _env_example()["ASTR_PREFECT_API_AUTH_STRING"]

    # The Prefect server: same port as prod.toml's URL, reached by its service name.
    server = urlsplit(config.prefect_server_url)
    prod_port = urlsplit(_prod()["prefect_server_url"]).port
    command = _command(services["prefect-server"])
    assert (server.hostname, server.port, server.path) == ("prefect-server", prod_port, "/api")
    assert int(_option(command, "--port")) == prod_port
    assert prod_port in _container_ports(services["prefect-server"])
    assert f":{prod_port}/api/" in " ".join(services["prefect-server"]["healthcheck"]["test"])

    # The databases: PostgreSQL in the postgres service, databases that exist there.
    server_env = _environment(services["prefect-server"])
    assert config.prefect_database_url == server_env["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    created = set(re.findall(r"CREATE DATABASE (\w+)", (DOCKER / "postgres-init.sql").read_text()))
    created.add(services["postgres"]["environment"]["POSTGRES_DB"])
    for url in (config.prefect_database_url, config.database_url, config.optuna_storage_url):
        parts = urlsplit(url)
        assert parts.scheme.startswith("postgresql") and parts.hostname == "postgres", url
        assert parts.path.strip("/") in created, url
        assert parts.password == _env_example()["POSTGRES_PASSWORD"]

    # Artifacts in MinIO's bucket, which the one-shot service creates.
    storage = config.storage_config
    assert storage.backend == "s3" and storage.prefix == "prod"
    buckets_script = " ".join(services["minio-buckets"]["entrypoint"])
    assert f"mb --ignore-existing astr/{storage.bucket}" in buckets_script
    endpoint = urlsplit(storage.options["endpoint_url"])
    assert endpoint.hostname == "minio" and endpoint.port == 9000
    assert env["AWS_ACCESS_KEY_ID"] == _env_example()["MINIO_ROOT_USER"]

    # MLflow at the mlflow service's port.
    tracking = urlsplit(config.mlflow_tracking_uri)
    mlflow_command = _command(services["mlflow"])
    assert tracking.hostname == "mlflow"
    assert tracking.port == int(_option(mlflow_command, "--port"))
    assert "mlflow:5000" in _option(mlflow_command, "--allowed-hosts").split(",")


def test_mlflow_uses_postgres_and_s3_artifacts(services: dict[str, Any]) -> None:
    env = _environment(services["mlflow"])
    backend = urlsplit(env["MLFLOW_BACKEND_STORE_URI"])
    assert backend.scheme.startswith("postgresql") and backend.hostname == "postgres"
    bucket = urlsplit(env["MLFLOW_ARTIFACTS_DESTINATION"]).netloc
    assert f"astr/{bucket}" in " ".join(services["minio-buckets"]["entrypoint"])
    assert urlsplit(env["MLFLOW_S3_ENDPOINT_URL"]).hostname == "minio"
    assert "--serve-artifacts" in _command(services["mlflow"])


def test_api_port_and_metrics_scrape_agree(services: dict[str, Any]) -> None:
    api = services["api"]
    command = _command(api)
    assert command[:2] == ["astr", "api"] and _option(command, "--host") == "0.0.0.0"
    port = int(_option(command, "--port"))
    assert port in _container_ports(api)
    assert f"127.0.0.1:{port}/health" in " ".join(api["healthcheck"]["test"])

    prometheus = yaml.safe_load((DOCKER / "prometheus.yml").read_text())
    (job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "astr-api"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"][0]["targets"] == [f"api:{port}"]
    # /metrics needs a bearer token: a compose secret that is one of the API's tokens.
    (secret,) = services["prometheus"]["secrets"]
    assert job["authorization"] == {
        "type": "Bearer",
        "credentials_file": f"/run/secrets/{secret}",
    }
    source = yaml.safe_load((DOCKER / "compose.yml").read_text())["secrets"][secret]
    example = _env_example()
    assert example[source["environment"]] in example["ASTR_API_TOKENS"].split(",")
    mounted = {v.split(":")[1] for v in services["prometheus"]["volumes"] if ":" in v}
    assert "/etc/prometheus/prometheus.yml" in mounted

    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"EXPOSE {port}" in dockerfile
    assert f'"--port", "{port}"' in dockerfile


def test_no_literal_secrets_in_compose(compose: dict[str, Any]) -> None:
    text = (DOCKER / "compose.yml").read_text()
    for value in _env_example().values():
        if len(value) >= 8 and not value.startswith("http"):
            assert value not in text, "a value of .env.example is written into compose.yml"

    def check(name: str, value: str, where: str) -> None:
        if _SECRET_NAME.search(name):
            assert _REFERENCE.fullmatch(value), f"{where}: {name} must be a ${{VARIABLE}}"
        password = urlsplit(value).password if "://" in value else None
        if password is not None:
            assert _REFERENCE.fullmatch(password), f"{where}: {name} holds a literal password"

    blocks = [("x-astr-environment", compose["x-astr-environment"])]
    blocks += [(n, s.get("environment", {})) for n, s in compose["services"].items()]
    for where, environment in blocks:
        for name, value in environment.items():
            check(name, str(value), where)


def test_env_file_is_an_example_only() -> None:
    text = (DOCKER / "compose.yml").read_text()
    example = _env_example()
    required = {m.group(1) for m in _REFERENCE.finditer(text) if m.group(2) != ":-"}
    assert required <= set(example), f"missing from .env.example: {required - set(example)}"
    tracked = subprocess.run(
        ["git", "ls-files", "environments/docker"], cwd=REPO, capture_output=True, text=True
    )
    if tracked.returncode == 0:
        assert not any(Path(f).name == ".env" for f in tracked.stdout.split())
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "environments/docker/.env"], cwd=REPO, check=False
    )
    assert ignored.returncode in (0, 128)  # 0: ignored; 128: not a git checkout
    dockerignore = (REPO / ".dockerignore").read_text().split()
    assert ".env" in dockerignore and "**/.env" in dockerignore and ".git" in dockerignore


def test_dockerfile() -> None:
    lines = [
        line.strip()
        for line in (DOCKER / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]
    assert lines[0] == "FROM python:3.11-slim"
    (torch,) = [line for line in lines if "torch==" in line]
    assert "torch==2.13.0" in torch and "download.pytorch.org/whl/cpu" in torch
    assert re.search(r'pip install "?\.\[s3\]', " ".join(lines))
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")
    assert any(line.startswith("HEALTHCHECK ") and " CMD " in line for line in lines)
    assert lines[-1].startswith("CMD ")
    for line in lines:
        if line.startswith("ENV "):
            assert not _SECRET_NAME.search(line), line


def test_prefect_server_keeps_concurrency_leases_on_disk(services: dict[str, Any]) -> None:
    # In memory, a restarted server forgets the slots of running flows and they are
    # terminated; PrefectServer sets the same storage for servers it starts itself.
    from pipeline.workflow.prefect_server import LEASE_STORAGE

    environment = services["prefect-server"]["environment"]
    assert environment["PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE"] == LEASE_STORAGE
    assert environment["PREFECT_HOME"].startswith("/")
