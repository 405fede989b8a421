"""Optuna search in an RDB study: validated spaces, resumed studies, nested MLflow runs."""

from __future__ import annotations

import pytest

from pipeline.ml.search import SearchSpaceError, run_search, validate_search_space
from pipeline.ml.train import training_inputs

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


def test_one_process_normalises_the_dataset_once_for_all_its_trials(
    tmp_path, candidate_night, monkeypatch
):
    import pipeline.ml.search as search

    made = []

    def counted(data, model):
        made.append((data.dataset_id, model.channels, model.orient))
        return training_inputs(data, model)

    monkeypatch.setattr(search, "training_inputs", counted)
    result = run_search(
        candidate_night(4),
        {"learning_rate": SPACE["learning_rate"]},
        storage_url=f"sqlite:///{tmp_path}/optuna.db",
        study_name="once",
        n_trials=3,
        base={"epochs": 1, "dense": 16, "width": 4},
    )
    assert result.n_complete + result.n_pruned + result.n_failed == 3 and not result.n_failed
    assert len(made) == 1


def _study_with_complete_trials(curves):
    """An in-memory study holding complete trials with these per-epoch losses."""
    import optuna

    from pipeline.ml.search import _pruner

    study = optuna.create_study(direction="minimize", pruner=_pruner())
    for losses in curves:
        study.add_trial(
            optuna.trial.create_trial(
                value=min(losses),
                intermediate_values=dict(enumerate(losses, start=1)),
                state=optuna.trial.TrialState.COMPLETE,
            )
        )
    return study


def test_pruner_keeps_trials_at_or_under_the_median_after_the_warm_up_epoch():
    import optuna

    # losses at epoch 2 of four complete trials: 0.20, 0.30, 0.40, 0.50 (median 0.35)
    study = _study_with_complete_trials(
        [[0.9, 0.20, 0.1], [0.9, 0.30, 0.1], [0.9, 0.40, 0.1], [0.9, 0.50, 0.1]]
    )

    def pruned(losses):
        trial = study.ask()
        for epoch, loss in enumerate(losses, start=1):
            trial.report(loss, epoch)
        verdict = trial.should_prune()
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        return verdict

    assert not pruned([5.0])  # the first epoch is the warm-up: never pruned there
    assert pruned([0.5, 0.36])
    assert not pruned([0.5, 0.34])
    assert not pruned([0.5, 0.34, 0.1])  # epoch 3: 0.1 is the median
    assert pruned([0.5, 0.34, 0.2])


def test_pruner_waits_for_two_complete_trials():
    study = _study_with_complete_trials([[0.9, 0.2, 0.1]])
    trial = study.ask()
    trial.report(0.9, 1)
    trial.report(5.0, 2)
    assert not trial.should_prune()
