"""The model flows: training through the training notebook, deployment by alias.

Datasets are files ``<home>/datasets/<dataset_id>.npz`` (``store_dataset`` puts one
there); models are versions of the registered MLflow model ``realbogus``, and a
``model_id`` is a version number. The notebook trains and evaluates; the flow owns the
side effects: logging to MLflow, registering, moving aliases.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow, get_run_logger

from pipeline.config import WorkflowConfig, get_config
from pipeline.errors import AstrError
from pipeline.flows.runtime import get_runner
from pipeline.ml.data import CandidateDataset, load_dataset, save_dataset
from pipeline.ml.evaluate import Evaluation
from pipeline.ml.registry import ModelRegistry
from pipeline.ml.train import TrainConfig, load_model

__all__ = [
    "DatasetNotFoundError",
    "dataset_path",
    "model_deployment_flow",
    "model_training_flow",
    "store_dataset",
]


class DatasetNotFoundError(AstrError, LookupError):
    """No stored dataset has the given id."""


def datasets_dir(config: WorkflowConfig) -> Path:
    """Where datasets are kept: ``<home>/datasets``."""
    return Path(config.home) / "datasets"


def store_dataset(data: CandidateDataset, config: WorkflowConfig | None = None) -> str:
    """Keep a dataset under its content id; returns the ``dataset_id``."""
    config = config or get_config()
    save_dataset(data, datasets_dir(config) / f"{data.dataset_id}.npz")
    return data.dataset_id


def dataset_path(dataset_id: str, config: WorkflowConfig | None = None) -> Path:
    """The file of a stored dataset; raises DatasetNotFoundError naming what exists."""
    config = config or get_config()
    folder = datasets_dir(config)
    path = folder / f"{dataset_id}.npz"
    if not dataset_id or "/" in dataset_id or not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []
        raise DatasetNotFoundError(
            f"no dataset {dataset_id!r} in {folder} (stored: {known or 'none'}); "
            "build one with pipeline.ml.data and store it with store_dataset()"
        )
    return path


def _notebook(name: str) -> Path:
    path = Path(__file__).resolve().parents[2] / "notebooks" / "ml" / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run from a checkout of the project (pip install -e .)"
        )
    return path


def _registry(config: WorkflowConfig) -> ModelRegistry:
    return ModelRegistry(config.mlflow_tracking_uri)


@flow(name="model_training", log_prints=True)
def model_training_flow(dataset_id: str, config: dict) -> dict:
    """Train, calibrate and evaluate on a stored dataset; log and register the model.

    Returns ``model_id`` (the new version of ``realbogus``), the MLflow ``run_id``,
    the test metrics and the report.
    """
    settings = get_config()
    TrainConfig.from_dict(config)  # a bad setting fails here, before any kernel starts
    path = dataset_path(dataset_id, settings)
    logger = get_run_logger()
    result = get_runner(settings).run(
        _notebook("training"),
        {"dataset_path": str(path), "config": dict(config)},
        inputs={"dataset": path},
        on_text=lambda cell, text: logger.info("[training.ipynb cell %d] %s", cell, text.rstrip()),
    )
    products = result.outputs["products"]
    model = load_model(result.output_dir / products["model"])
    evaluation = Evaluation(**json.loads((result.output_dir / products["evaluation"]).read_text()))
    registry = _registry(settings)
    version = registry.log_model(
        model,
        evaluation=evaluation,
        run_name=f"train-{dataset_id}",
        extra_artifacts=(result.html_report,),
    )
    record = registry.client.get_model_version("realbogus", str(version))
    logger.info("model version %d (run %s): test AUC %.4f", version, record.run_id, evaluation.auc)
    return {
        "model_id": str(version),
        "run_id": record.run_id,
        "dataset_id": dataset_id,
        "metrics": evaluation.metrics(),
        "report": str(result.html_report),
        "cached": result.cached,
    }


@flow(name="model_deployment", log_prints=True)
def model_deployment_flow(model_id: str, environment: str) -> dict:
    """Move ``environment`` to model version ``model_id`` if it beats the current holder.

    The comparison uses the test split of the dataset the model was trained on.
    """
    settings = get_config()
    registry = _registry(settings)
    try:
        version = int(model_id)
    except ValueError:
        raise AstrError(
            f"model_id must be a version number of realbogus, got {model_id!r}"
        ) from None
    model = registry.load(version)
    test = load_dataset(dataset_path(model.dataset_id, settings)).subset("test")
    outcome = registry.deploy(version, environment, test)
    get_run_logger().info("%s: %s", environment, outcome.reason)
    return {
        "environment": outcome.environment,
        "model_id": str(outcome.version),
        "replaced": None if outcome.replaced is None else str(outcome.replaced),
        "deployed": outcome.deployed,
        "reason": outcome.reason,
    }
