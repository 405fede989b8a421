"""The model flows against a real Prefect server and MLflow on a SQLite file."""

from __future__ import annotations

import pytest

from pipeline.config import get_config
from pipeline.flows.training import (
    DatasetNotFoundError,
    model_deployment_flow,
    model_training_flow,
    store_dataset,
)
from pipeline.ml.registry import ModelRegistry

pytestmark = pytest.mark.integration

SMALL = {"epochs": 3, "width": 4, "dense": 16}


def test_train_register_and_deploy(prefect_server_url, candidate_night):
    data = candidate_night(4)
    dataset_id = store_dataset(data)
    trained = model_training_flow(dataset_id, SMALL)
    assert trained["model_id"] == "1" and trained["dataset_id"] == dataset_id
    assert 0.0 <= trained["metrics"]["auc"] <= 1.0

    registry = ModelRegistry(get_config().mlflow_tracking_uri)
    artifacts = {a.path for a in registry.client.list_artifacts(trained["run_id"], "reports")}
    assert artifacts == {"reports/training.html"}
    assert registry.load(1).dataset_id == dataset_id

    first = model_deployment_flow("1", "staging")
    assert first["deployed"] and first["replaced"] is None
    again = model_deployment_flow("1", "staging")
    assert not again["deployed"] and again["reason"] == "already deployed"
    assert registry.holder("staging") == 1 and registry.holder("production") is None


def test_unknown_dataset_and_bad_settings_fail_before_training(prefect_server_url):
    with pytest.raises(DatasetNotFoundError, match="no dataset 'nope'"):
        model_training_flow("nope", SMALL)
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['lr'\]"):
        model_training_flow("nope", {"lr": 0.1})
