"""Optuna search in an RDB study: validated spaces, resumed studies, nested MLflow runs."""

from __future__ import annotations

import pytest

from pipeline.ml.search import SearchSpaceError, run_search, validate_search_space

SPACE = {
    "learning_rate": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True},
    "width": {"type": "int", "low": 4, "high": 8},
    "batch_size": {"type": "categorical", "choices": [32, 64]},
}


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({}, "non-empty mapping"),
        ({"lr": {"type": "float", "low": 0.1, "high": 1}}, r"search_space\['lr'\]: not a tunable"),
        ({"width": {"low": 1, "high": 2}}, r"search_space\['width'\] needs a 'type'"),
        ({"width": {"type": "int", "low": 8, "high": 4}}, "needs low < high"),
        ({"width": {"type": "int", "low": 1.5, "high": 4}}, "must be int numbers"),
        ({"learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}, "log scale"),
        ({"batch_size": {"type": "categorical", "choices": []}}, "non-empty list"),
    ],
)
def test_malformed_search_spaces_are_named(space, message):
    with pytest.raises(SearchSpaceError, match=message):
        validate_search_space(space)


def test_search_runs_resumes_and_nests_trials_in_mlflow(tmp_path, candidate_night):
    data = candidate_night(4)
    common = {
        "storage_url": f"sqlite:///{tmp_path}/optuna.db",
        "study_name": "rb-test",
        "base": {"epochs": 3, "patience": 3, "dense": 16},
        "tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
    }
    first = run_search(data, SPACE, n_trials=3, **common)
    assert first.n_complete + first.n_pruned + first.n_failed == 3 and first.n_complete >= 1
    assert set(first.best_params) == set(SPACE)
    assert 3e-4 <= first.best_params["learning_rate"] <= 3e-3

    resumed = run_search(data, SPACE, n_trials=5, **common)  # only the 2 missing trials
    assert resumed.n_complete + resumed.n_pruned + resumed.n_failed == 5
    assert resumed.best_value <= first.best_value
    again = run_search(data, SPACE, n_trials=5, **common)  # nothing left to run
    assert again == resumed

    # each finished trial's value is the validation loss of the epoch its model keeps
    import optuna

    from pipeline.ml.search import KEPT_EPOCH_ATTR, close_storage, open_storage

    storage = open_storage(common["storage_url"], "rb-test")
    trials = optuna.load_study(study_name="rb-test", storage=storage).get_trials()
    close_storage(storage)
    for trial in trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            kept = trial.user_attrs[KEPT_EPOCH_ATTR]
            assert trial.value == pytest.approx(trial.intermediate_values[kept])

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=common["tracking_uri"])
    experiment = client.get_experiment_by_name("realbogus-search")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 3 and len(children) == 5
    assert {r.data.tags["mlflow.parentRunId"] for r in children} <= {p.info.run_id for p in parents}
    assert all("val_loss" in r.data.metrics for r in children)
