"""The training notebook, run headless as a flow will run it."""

from __future__ import annotations

import json
from pathlib import Path

import papermill as pm
import pytest

from pipeline.ml.data import load_dataset, save_dataset
from pipeline.ml.train import load_model

pytestmark = pytest.mark.integration

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks" / "ml"


def test_training_notebook_writes_a_loadable_model_and_its_evaluation(tmp_path, candidate_night):
    data = candidate_night(4)
    dataset_path = save_dataset(data, tmp_path / "data.npz")
    out = tmp_path / "out"
    pm.execute_notebook(
        str(NOTEBOOKS / "training.ipynb"),
        str(tmp_path / "training.executed.ipynb"),
        parameters={
            "dataset_path": str(dataset_path),
            "config": {"epochs": 3, "width": 4, "dense": 16},
            "output_dir": str(out),
        },
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
    )
    outputs = json.loads((out / "outputs.json").read_text())
    assert outputs["dataset_id"] == data.dataset_id and outputs["config"]["width"] == 4
    model = load_model(out / outputs["products"]["model"])
    assert model.dataset_id == data.dataset_id and len(model.history) <= 3
    evaluation = json.loads((out / outputs["products"]["evaluation"]).read_text())
    assert evaluation["n_real"] + evaluation["n_bogus"] == len(
        load_dataset(dataset_path).subset("test")
    )
    assert evaluation["auc"] == pytest.approx(outputs["metrics"]["auc"])
    executed = (tmp_path / "training.executed.ipynb").read_text()
    assert "image/png" in executed  # the loss, ROC and reliability figures are there


def _execute(name: str, tmp_path: Path, parameters: dict) -> Path:
    pm.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"),
        str(tmp_path / f"{name}.executed.ipynb"),
        parameters=parameters,
        cwd=str(NOTEBOOKS),
        kernel_name="python3",
        progress_bar=False,
    )
    return tmp_path / f"{name}.executed.ipynb"


def test_evaluation_notebook_measures_a_model_against_a_baseline(tmp_path, candidate_night):
    from pipeline.ml.evaluate import evaluate
    from pipeline.ml.train import TrainConfig, train_model

    data = candidate_night(4)
    dataset_path = save_dataset(data, tmp_path / "data.npz")
    models = {}
    for name, seed in (("model", 0), ("baseline", 1)):
        trained = train_model(data, TrainConfig.from_dict({"epochs": 2, "width": 4, "seed": seed}))
        models[name] = trained.save(tmp_path / f"{name}.pt")
    out = tmp_path / "out"
    executed = _execute(
        "evaluation",
        tmp_path,
        {
            "model_path": str(models["model"]),
            "baseline_path": str(models["baseline"]),
            "dataset_path": str(dataset_path),
            "gallery": 4,
            "output_dir": str(out),
        },
    )
    outputs = json.loads((out / "outputs.json").read_text())
    test = data.subset("test")
    assert outputs["n_candidates"] == len(test)
    for name, key in (("model", "metrics"), ("baseline", "baseline_metrics")):
        expected = evaluate(load_model(models[name]).predict_proba(test.triplets), test, 0.01)
        assert outputs[key]["auc"] == pytest.approx(expected.auc, abs=1e-9)
        assert outputs[key]["ece"] == pytest.approx(expected.ece, abs=1e-9)
    for product in ("worst_false_positives", "worst_false_negatives", "roc_reliability"):
        assert (out / outputs["products"][product]).stat().st_size > 1000
    assert "bogus scored most real" in executed.read_text()


def test_search_notebook_runs_and_resumes_its_study(tmp_path, candidate_night):
    dataset_path = save_dataset(candidate_night(4), tmp_path / "data.npz")
    params = {
        "dataset_path": str(dataset_path),
        "search_space": {"learning_rate": {"type": "float", "low": 1e-3, "high": 1e-2}},
        "base_config": {"epochs": 2, "width": 4, "dense": 8},
        "n_trials": 2,
        "study_name": "nb-test",
        "output_dir": str(tmp_path / "out"),
    }
    _execute("hpo", tmp_path, params)
    outputs = json.loads((tmp_path / "out" / "outputs.json").read_text())
    first = outputs["metrics"]
    assert first["n_complete"] + first["n_pruned"] + first["n_failed"] == 2
    _execute("hpo", tmp_path, {**params, "n_trials": 3})  # same study: one more trial
    outputs = json.loads((tmp_path / "out" / "outputs.json").read_text())
    counts = outputs["metrics"]
    assert counts["n_complete"] + counts["n_pruned"] + counts["n_failed"] == 3
    assert len((tmp_path / "out" / "trials.csv").read_text().strip().splitlines()) == 1 + 3
    assert set(outputs["best_params"]) == {"learning_rate"}
