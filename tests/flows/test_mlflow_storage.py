"""Where MLflow keeps model artifacts for each storage setting, and how it reaches S3.

The end-to-end proof (MLflow on PostgreSQL logging to and loading from a real S3
server) is ``tests/cluster/test_postgres_s3.py``; these check the wiring per setting.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import StorageConfig, load_config
from pipeline.flows.runtime import (
    MLFLOW_S3_ENDPOINT_VARIABLE,
    mlflow_artifact_root,
    model_registry,
    s3_endpoint,
    use_storage_for_mlflow,
)
from pipeline.ml.registry import ModelRegistry

S3 = StorageConfig("s3", bucket="survey", prefix="astr/prod", options={})
PG = "postgresql+psycopg://astr:pw@db:5432/mlflow"


@pytest.mark.parametrize(
    ("storage", "tracking_uri", "expected"),
    [
        (S3, PG, "s3://survey/astr/prod/mlflow"),
        (S3, "sqlite:////data/mlflow.db", "s3://survey/astr/prod/mlflow"),
        (StorageConfig("s3", bucket="survey"), PG, "s3://survey/mlflow"),
        (StorageConfig("local", root="/data/artifacts"), PG, "/data/artifacts/mlflow"),
        (StorageConfig("local", root="/data/artifacts"), "sqlite:////data/mlflow.db", None),
    ],
)
def test_artifact_root_follows_the_storage(
    storage: StorageConfig, tracking_uri: str, expected: str | None
) -> None:
    assert mlflow_artifact_root(storage, tracking_uri) == expected


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"endpoint_url": "http://minio:9000"}, "http://minio:9000"),
        ({"client_kwargs": {"endpoint_url": "http://minio:9000"}}, "http://minio:9000"),
        ({}, None),  # AWS itself: boto finds the endpoint
    ],
)
def test_s3_endpoint_from_the_storage_options(options: dict, expected: str | None) -> None:
    assert s3_endpoint(StorageConfig("s3", bucket="b", options=options)) == expected
    local = StorageConfig("local", root="/a", options={"endpoint_url": "http://x"})
    assert s3_endpoint(local) is None


def test_endpoint_reaches_mlflow_only_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(MLFLOW_S3_ENDPOINT_VARIABLE, "http://given-by-hand:9000")
    use_storage_for_mlflow(StorageConfig("s3", bucket="b", options={}))
    assert MLFLOW_S3_ENDPOINT_VARIABLE == "MLFLOW_S3_ENDPOINT_URL"
    assert os.environ[MLFLOW_S3_ENDPOINT_VARIABLE] == "http://given-by-hand:9000"
    use_storage_for_mlflow(StorageConfig("s3", bucket="b", options={"endpoint_url": "http://m:1"}))
    assert os.environ[MLFLOW_S3_ENDPOINT_VARIABLE] == "http://m:1"


def test_flows_registry_from_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MLFLOW_S3_ENDPOINT_VARIABLE, raising=False)
    config = load_config(
        environ={
            "ASTR_HOME": str(tmp_path),
            "ASTR_STORAGE_ROOT": "s3://survey/night",
            "ASTR_STORAGE_OPTIONS": json.dumps({"endpoint_url": "http://127.0.0.1:9000"}),
        }
    )
    registry = model_registry(config)
    assert registry.artifact_root == "s3://survey/night/mlflow"
    assert registry.tracking_uri == f"sqlite:///{tmp_path}/mlflow.db"
    assert os.environ[MLFLOW_S3_ENDPOINT_VARIABLE] == "http://127.0.0.1:9000"

    # the embedded default is unchanged: artifacts beside the SQLite tracking file
    local = model_registry(load_config(environ={"ASTR_HOME": str(tmp_path)}))
    assert local.artifact_root == (tmp_path / "mlartifacts").as_uri()


def test_registry_takes_a_directory_or_a_url(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert ModelRegistry(uri, artifact_root="s3://b/p/mlflow/").artifact_root == "s3://b/p/mlflow"
    assert ModelRegistry(uri, artifact_root=tmp_path / "a").artifact_root == (
        (tmp_path / "a").as_uri()
    )
    assert ModelRegistry(uri).artifact_root == (tmp_path / "mlartifacts").as_uri()
