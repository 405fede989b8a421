"""MLflow (real, on a SQLite file): versions, deployment only when better, rollback."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from pipeline.ml.evaluate import evaluate
from pipeline.ml.model import ModelConfig, RealBogusNet, seed_everything
from pipeline.ml.registry import MODEL_NAME, ModelRegistry, RegistryError
from pipeline.ml.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def models(candidate_night):
    # the night test_model trains on (built once per session): 6 images were too few,
    # and a small pipeline change left a model trained on them worse than chance
    data = candidate_night(8, (0.6, 0.2, 0.2))
    config = TrainConfig(epochs=12, patience=4, batch_size=32, model=ModelConfig(width=8, dense=32))
    good = train_model(data, config)
    test = data.subset("test")
    assert evaluate(good.predict_proba(test.triplets), test).auc > 0.8, "the model did not learn"
    seed_everything(123)  # the same architecture, never trained: a worse model
    untrained = dataclasses.replace(good, net=RealBogusNet(config.model).eval(), history=[])
    return data, good, untrained


def test_log_deploy_refuse_force_and_rollback(models, tmp_path):
    data, good, untrained = models
    test = data.subset("test")
    registry = ModelRegistry(f"sqlite:///{tmp_path}/mlflow.db")
    v1 = registry.log_model(good, evaluation=evaluate(good.predict_proba(test.triplets), test))
    v2 = registry.log_model(untrained)
    assert (v1, v2) == (1, 2)

    # the run holds parameters, per-epoch metrics and the model, loadable as our class
    record = registry.client.get_model_version(MODEL_NAME, "1")
    run = registry.client.get_run(record.run_id)
    assert run.data.params["dataset_id"] == data.dataset_id and run.data.params["width"] == "8"
    history = registry.client.get_metric_history(record.run_id, "val_loss")
    assert [m.step for m in history] == [h["epoch"] for h in good.history]
    assert "test_auc" in run.data.metrics
    np.testing.assert_allclose(
        registry.load(v1).predict_proba(test.triplets),
        good.predict_proba(test.triplets),
        rtol=1e-5,
        atol=1e-6,
    )

    first = registry.deploy(v1, "production", test, who="tester")
    assert first.deployed and first.replaced is None and registry.holder("production") == 1
    refused = registry.deploy(v2, "production", test, who="tester")
    assert not refused.deployed and refused.reason.startswith("refused")
    assert registry.holder("production") == 1
    forced = registry.deploy(v2, "production", test, force=True, who="tester")
    assert forced.deployed and forced.replaced == 1 and registry.holder("production") == 2
    tags = registry.client.get_model_version(MODEL_NAME, "2").tags
    assert (
        tags["production.replaced"] == "1"
        and "by tester (deployed (forced))" in tags["production.deployed"]
    )
    assert (
        registry.client.get_model_version(MODEL_NAME, "1")
        .tags["production.replaced_by"]
        .startswith("v2")
    )
    assert registry.holder("staging") is None  # environments are independent

    back = registry.rollback("production", who="tester")
    assert back.version == 1 and registry.holder("production") == 1
    with pytest.raises(RegistryError, match="no earlier holder"):
        registry.rollback("production")
    with pytest.raises(RegistryError, match="nothing is deployed to staging"):
        registry.rollback("staging")
    with pytest.raises(RegistryError, match="unknown environment 'prod'"):
        registry.deploy(v1, "prod", test)
    with pytest.raises(RegistryError, match="no version 9"):
        registry.deploy(9, "staging", test)
    version, model = registry.load_environment("production")
    assert version == 1 and model.dataset_id == data.dataset_id
