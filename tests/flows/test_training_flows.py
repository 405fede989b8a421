"""The model flows against a real Prefect server, MLflow on a SQLite file and Optuna storage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import optuna
import pytest
from astropy.table import Table

from pipeline.config import get_config
from pipeline.errors import AstrError
from pipeline.flows.drift import score_drift_flow
from pipeline.flows.observations import observation_pipeline_flow
from pipeline.flows.training import (
    DatasetNotFoundError,
    candidate_dataset_flow,
    hyperparameter_optimization_flow,
    model_deployment_flow,
    model_evaluation_flow,
    model_retraining_flow,
    model_rollback_flow,
    model_training_flow,
    store_dataset,
)
from pipeline.ml.data import load_dataset, simulated_dataset
from pipeline.ml.drift import score_histogram
from pipeline.ml.evaluate import evaluate
from pipeline.ml.registry import MODEL_NAME, ModelRegistry
from pipeline.ml.search import SearchSpaceError

pytestmark = pytest.mark.integration

SMALL = {"epochs": 3, "width": 4, "dense": 16}
#: Long enough to learn on a few images whatever the seed: with 6 epochs and patience 3,
#: a slow start (seed 0 on these images) stopped at a test AUC of 0.5-0.65.
GOOD = {"epochs": 12, "patience": 6, "width": 8, "dense": 32, "learning_rate": 2e-3, "seed": 0}
#: One epoch at a learning rate that moves nothing: a model no better than its start.
BAD = {"epochs": 1, "width": 2, "dense": 2, "learning_rate": 1e-7, "seed": 5}
# (retraining starts from the old model's settings: GOOD overrides every one BAD sets)
DECAM = Path(__file__).resolve().parents[1] / "data" / "decam"


def _registry() -> ModelRegistry:
    return ModelRegistry(get_config().mlflow_tracking_uri)


def test_train_register_and_deploy(prefect_server_url, candidate_night):
    data = candidate_night(4)
    dataset_id = store_dataset(data)
    trained = model_training_flow(dataset_id, SMALL)
    assert trained["model_id"] == "1" and trained["dataset_id"] == dataset_id
    assert 0.0 <= trained["metrics"]["auc"] <= 1.0

    registry = _registry()
    client = registry.client
    assert {a.path for a in client.list_artifacts(trained["run_id"], "reports")} == {
        "reports/training.html"
    }
    plots = {a.path for a in client.list_artifacts(trained["run_id"], "plots")}
    assert plots == {"plots/loss_curves.png", "plots/test_roc_reliability_recall.png"}
    run = client.get_run(trained["run_id"])
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == dataset_id
    assert json.loads(dataset_input.dataset.schema)["counts"] == data.counts()
    # the drift reference: the model's scores on its training candidates, all of them
    tag = client.get_model_version(MODEL_NAME, "1").tags["score_histogram"]
    assert sum(json.loads(tag)) == len(data.subset("train"))
    assert registry.load(1).dataset_id == dataset_id

    first = model_deployment_flow("1", "staging")
    assert first["deployed"] and first["replaced"] is None
    again = model_deployment_flow("1", "staging")
    assert not again["deployed"] and again["reason"] == "already deployed"
    assert registry.holder("staging") == 1 and registry.holder("production") is None


def test_dataset_flow_builds_labels_and_stores_a_dataset(prefect_server_url, tmp_path):
    built = candidate_dataset_flow(pairs=3, size=512, first_seed=10, vary=False)
    stored = load_dataset(get_config().home / "datasets" / f"{built['dataset_id']}.npz")
    assert stored.dataset_id == built["dataset_id"] and len(stored) == built["candidates"]
    assert stored.counts() == built["counts"]
    assert set(stored.split) == {"train", "validation", "test"}  # one image each
    assert built["report"].endswith("dataset.html")
    with pytest.raises(AstrError, match=r"real_pairs\[0\]\['science'\]"):
        candidate_dataset_flow(real_pairs=[{"science": str(tmp_path / "no.fits")}])


def test_unknown_dataset_and_bad_settings_fail_before_training(prefect_server_url):
    with pytest.raises(DatasetNotFoundError, match="no dataset 'nope'"):
        model_training_flow("nope", SMALL)
    with pytest.raises(ValueError, match=r"unknown training setting\(s\) \['lr'\]"):
        model_training_flow("nope", {"lr": 0.1})
    with pytest.raises(AstrError, match="model_id must be a version number"):
        model_deployment_flow("latest", "production")


def test_evaluation_against_production_on_the_same_candidates(prefect_server_url, candidate_night):
    data = candidate_night(4)
    dataset_id = store_dataset(data)
    model_training_flow(dataset_id, BAD)
    model_deployment_flow("1", "production")
    model_training_flow(dataset_id, SMALL)

    result = model_evaluation_flow("2", dataset_id)
    assert result["baseline"] == "1" and result["n_candidates"] == len(data.subset("test"))
    registry = _registry()
    test = data.subset("test")
    for version, metrics in ((2, result["metrics"]), (1, result["baseline_metrics"])):
        expected = evaluate(registry.load(version).predict_proba(test.triplets), test, 0.01)
        assert metrics["auc"] == pytest.approx(expected.auc, abs=1e-9)
        assert metrics["fpr"] == pytest.approx(expected.fpr, abs=1e-9)
    run_id = registry.client.get_model_version(MODEL_NAME, "2").run_id
    logged = registry.client.get_run(run_id).data.metrics
    assert logged[f"eval_{dataset_id}_auc"] == pytest.approx(result["metrics"]["auc"])
    files = {a.path for a in registry.client.list_artifacts(run_id, f"evaluations/{dataset_id}")}
    assert {
        f"evaluations/{dataset_id}/evaluation.html",
        f"evaluations/{dataset_id}/worst_false_positives.png",
        f"evaluations/{dataset_id}/baseline_evaluation.json",
    } <= files


def test_retraining_promotes_only_a_better_model(prefect_server_url, candidate_night):
    base = candidate_night(4)
    base_id = store_dataset(base)
    new = candidate_night(6)  # its first images are base's
    new_id = store_dataset(new)
    model_training_flow(base_id, BAD)
    model_deployment_flow("1", "production")

    better = model_retraining_flow("1", new_id, config=GOOD, fine_tune=False)
    assert better["model_id"] == "2" and better["promoted"]
    assert better["deployment"]["replaced"] == "1"
    merged = load_dataset(get_config().home / "datasets" / f"{better['dataset_id']}.npz")
    assert len(merged) == len(base) + better["added_candidates"]
    assert set(merged.image) == set(new.image) | set(base.image)
    assert len(merged) == len(new)  # base's images were not added twice
    registry = _registry()
    assert registry.holder("production") == 2
    assert registry.client.get_model_version(MODEL_NAME, "2").tags["retrained_from"] == "1"

    with pytest.raises(ValueError, match="adds nothing"):  # v2 has all of new_id already
        model_retraining_flow("2", new_id, config=BAD, fine_tune=False)
    more = store_dataset(
        simulated_dataset([20, 21], shape=(512, 512), n_stars=150, n_galaxies=40, n_transients=30)
    )
    worse = model_retraining_flow("2", more, config=BAD, fine_tune=False)
    assert worse["model_id"] == "3" and not worse["promoted"]
    assert worse["deployment"]["reason"].startswith("refused")
    assert registry.holder("production") == 2

    tuned = model_retraining_flow("2", more, config={"epochs": 1})  # fine-tunes v2
    assert tuned["fine_tuned"] and tuned["model_id"] == "4"


def test_search_is_resumed_and_its_best_settings_trained(prefect_server_url, candidate_night):
    dataset_id = store_dataset(candidate_night(4))
    space = {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2, "log": True}}
    base = {"epochs": 2, "width": 4, "dense": 8}
    with pytest.raises(SearchSpaceError, match="learning_rate"):
        hyperparameter_optimization_flow("cnn", {"learning_rate": {"type": "float", "low": 1}})
    with pytest.raises(AstrError, match="unknown model_type"):
        hyperparameter_optimization_flow("transformer", space)

    first = hyperparameter_optimization_flow(
        "cnn", space, dataset_id=dataset_id, n_trials=2, base_config=base, train_best=False
    )
    assert sum(first["trials"].values()) == 2 and "model_id" not in first
    # run again asking for three: the same study, one more trial
    second = hyperparameter_optimization_flow(
        "cnn", space, dataset_id=dataset_id, n_trials=3, base_config=base
    )
    assert second["study_name"] == first["study_name"]
    study = optuna.load_study(study_name=second["study_name"], storage=second["storage_url"])
    assert len(study.trials) == 3
    assert second["best_params"] == study.best_params
    assert second["model_id"] == "1"
    run = _registry().client.get_run(second["training"]["run_id"])
    assert float(run.data.params["learning_rate"]) == pytest.approx(
        study.best_params["learning_rate"]
    )


def test_rollback_then_the_pipeline_scores_with_the_restored_model(
    prefect_server_url, candidate_night, tmp_path
):
    dataset_id = store_dataset(candidate_night(4))
    model_training_flow(dataset_id, SMALL)
    model_training_flow(dataset_id, BAD)
    model_deployment_flow("1", "production")
    assert model_deployment_flow("2", "production", force=True)["deployed"]
    rolled = model_rollback_flow("production")
    assert rolled["model_id"] == "1" and _registry().holder("production") == 1

    result = observation_pipeline_flow(
        {
            "science_path": str(DECAM / "DEC-OBS04a.mini.fits"),
            "reference_path": str(DECAM / "Stack-DEC-OBS18.fits"),
            "output_dir": str(tmp_path / "out"),
        }
    )
    assert result["rb_model"]["version"] == "1"
    assert result["drift"]["n_scores"] == result["metrics"]["candidates"]["n_candidates"]
    table = Table.read(tmp_path / "out" / "candidates.ecsv", format="ascii.ecsv")
    scores = np.asarray(table["rb_score"], dtype=float)
    assert len(scores) and np.all((scores >= 0) & (scores <= 1))
    low = scores < 0.5
    assert all("rb" in str(r).split(",") for r in table["reject_reason"][low])
    assert not np.any(np.asarray(table["passed"])[low])

    # the night's drift check counts exactly the candidates v1 scored, and records it on v1
    drift = score_drift_flow()
    assert drift["model_id"] == "1" and drift["n_scores"] == len(scores)
    assert drift["histogram"] == score_histogram(scores).tolist()
    run_id = _registry().client.get_model_version(MODEL_NAME, "1").run_id
    logged = _registry().client.get_metric_history(run_id, "drift_n_scores")
    assert [m.value for m in logged] == [float(len(scores))]
    with pytest.raises(AstrError, match="not an ISO 8601 time"):
        score_drift_flow(since="yesterday")


def test_the_worker_serves_every_model_flow_with_its_parameters():
    from pipeline.workflow.deployments import model_deployments

    found = {d.flow_name: d for d in model_deployments()}
    assert set(found) == {
        "score_drift",
        "candidate_dataset",
        "model_training",
        "hyperparameter_optimization",
        "model_evaluation",
        "model_deployment",
        "model_rollback",
        "model_retraining",
    }
    assert all(d.entrypoint.startswith("pipeline/flows/") for d in found.values())
    # the signatures the issue fixes: what a caller of the deployments must pass
    from prefect.utilities.callables import parameter_schema

    required = {
        name: set(parameter_schema(flow).required)
        for name, flow in (
            ("training", model_training_flow),
            ("search", hyperparameter_optimization_flow),
            ("evaluation", model_evaluation_flow),
            ("deployment", model_deployment_flow),
            ("retraining", model_retraining_flow),
        )
    }
    assert required == {
        "training": {"dataset_id", "config"},
        "search": {"model_type", "search_space"},
        "evaluation": {"model_id", "test_dataset"},
        "deployment": {"model_id", "environment"},
        "retraining": {"model_id", "new_data"},
    }
