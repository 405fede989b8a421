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
