"""The model flows: training, search, evaluation, deployment, rollback and retraining.

Datasets are files ``<home>/datasets/<dataset_id>.npz`` (``store_dataset`` puts one
there); models are versions of the registered MLflow model ``realbogus``, and a
``model_id`` is a version number. The notebooks (``notebooks/ml``) train, search and
measure; the flows own the side effects: logging to MLflow, registering, moving
aliases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from pipeline.config import WorkflowConfig, get_config
from pipeline.errors import AstrError
from pipeline.flows.runtime import get_runner, model_registry
from pipeline.ml.data import CandidateDataset, load_dataset, save_dataset
from pipeline.ml.evaluate import Evaluation
from pipeline.ml.merge import merge_datasets
from pipeline.ml.registry import ENVIRONMENTS, DatasetRecord, ModelRegistry, RegistryError
from pipeline.ml.search import validate_search_space
from pipeline.ml.train import TrainConfig, load_model
from pipeline.runner import NotebookResult
from pipeline.workflow.monitoring import monitoring_hooks

__all__ = [
    "MODEL_TYPES",
    "DatasetNotFoundError",
    "candidate_dataset_flow",
    "dataset_path",
    "hyperparameter_optimization_flow",
    "latest_dataset",
    "model_deployment_flow",
    "model_evaluation_flow",
    "model_retraining_flow",
    "model_rollback_flow",
    "model_training_flow",
    "store_dataset",
    "train_starter_model",
]

#: Architectures a search can tune (the braai-like CNN of ``pipeline.ml.model``).
MODEL_TYPES = ("cnn",)


class DatasetNotFoundError(AstrError, LookupError):
    """No stored dataset has the given id."""


def datasets_dir(config: WorkflowConfig) -> Path:
    """Where datasets are kept: ``<home>/datasets``."""
    return Path(config.home) / "datasets"


def store_dataset(data: CandidateDataset, config: WorkflowConfig | None = None) -> str:
    """Keep a dataset under its content id; returns the ``dataset_id``."""
    config = config or get_config()
    target = datasets_dir(config) / f"{data.dataset_id}.npz"
    if not target.is_file():
        save_dataset(data, target)
    return data.dataset_id


def _keep_dataset_file(path: Path, dataset_id: str, config: WorkflowConfig) -> Path:
    """Put a dataset file the notebook wrote under its id, without reading it again.

    Hard-linked when it can be (datasets reach a gigabyte), copied otherwise; the name
    appears only once the file is complete. ``load_dataset`` checks the content hash
    against the id whenever the file is read.
    """
    target = datasets_dir(config) / f"{dataset_id}.npz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    tmp.unlink(missing_ok=True)
    try:
        os.link(path, tmp)
    except OSError:
        shutil.copyfile(path, tmp)
    tmp.replace(target)
    return target


def dataset_path(dataset_id: str, config: WorkflowConfig | None = None) -> Path:
    """The file of a stored dataset; raises DatasetNotFoundError naming what exists."""
    config = config or get_config()
    folder = datasets_dir(config)
    path = folder / f"{dataset_id}.npz"
    if not dataset_id or "/" in dataset_id or not path.is_file():
        known = sorted(p.stem for p in folder.glob("*.npz")) if folder.is_dir() else []
        raise DatasetNotFoundError(
            f"no dataset {dataset_id!r} in {folder} (stored: {known or 'none'}); "
            "build one with `astr dataset simulate` (or pipeline.ml.data and store_dataset())"
        )
    return path


def latest_dataset(config: WorkflowConfig | None = None) -> str:
    """The id of the most recently stored dataset."""
    config = config or get_config()
    folder = datasets_dir(config)
    found = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime) if folder.is_dir() else []
    if not found:
        raise DatasetNotFoundError(
            f"no dataset stored in {folder}: build one with `astr dataset simulate`"
        )
    return found[-1].stem


def _notebook(name: str) -> Path:
    path = Path(__file__).resolve().parents[2] / "notebooks" / "ml" / f"{name}.ipynb"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: run from a checkout of the project (pip install -e .)"
        )
    return path


def _registry(config: WorkflowConfig) -> ModelRegistry:
    return model_registry(config)


def _version(model_id: str) -> int:
    try:
        return int(str(model_id).removeprefix("v"))
    except ValueError:
        raise AstrError(
            f"model_id must be a version number of realbogus (e.g. '3'), got {model_id!r}"
        ) from None


def _run(name: str, params: dict[str, Any], inputs: dict[str, Path]) -> NotebookResult:
    logger = get_run_logger()
    return get_runner(get_config()).run(
        _notebook(name),
        params,
        inputs=inputs,
        on_text=lambda cell, text: logger.info("[%s.ipynb cell %d] %s", name, cell, text.rstrip()),
    )


def _train(
    dataset_id: str,
    config: Mapping[str, Any],
    *,
    initial_model: Path | None = None,
    run_name: str,
    tags: Mapping[str, str] | None = None,
) -> dict:
    """Training notebook, then MLflow: run, dataset input, plots, report, version."""
    settings = get_config()
    TrainConfig.from_dict(config)  # a bad setting fails here, before any kernel starts
    path = dataset_path(dataset_id, settings)
    inputs = {"dataset": path}
    params: dict[str, Any] = {"dataset_path": str(path), "config": dict(config)}
    if initial_model is not None:
        params["initial_model_path"] = str(initial_model)
        inputs["initial_model"] = initial_model
    result = _run("training", params, inputs)
    outputs = result.outputs
    products = outputs["products"]
    model = load_model(result.output_dir / products["model"])
    evaluation = Evaluation(**json.loads((result.output_dir / products["evaluation"]).read_text()))
    plots = tuple(
        result.output_dir / name for name in products.values() if str(name).endswith(".png")
    )
    registry = _registry(settings)
    version = registry.log_model(
        model,
        evaluation=evaluation,
        run_name=run_name,
        extra_artifacts=(result.html_report,),
        plots=plots,
        dataset=DatasetRecord(dataset_id, path, outputs["counts"]),  # no second read
        score_reference=outputs.get("score_histogram"),
        tags=tags,
    )
    record = registry.client.get_model_version("realbogus", str(version))
    get_run_logger().info(
        "model version %d (run %s): test AUC %.4f, FPR %.4f at FNR %.3f",
        version,
        record.run_id,
        evaluation.auc,
        evaluation.fpr,
        evaluation.fnr,
    )
    return {
        "model_id": str(version),
        "run_id": record.run_id,
        "dataset_id": dataset_id,
        "metrics": evaluation.metrics(),
        "report": str(result.html_report),
        "cached": result.cached,
    }


@flow(name="candidate_dataset", log_prints=True, **monitoring_hooks())
def candidate_dataset_flow(
    pairs: int = 24,
    size: int = 512,
    first_seed: int = 0,
    vary: bool = True,
    real_pairs: list[dict] | None = None,
) -> dict:
    """Build a labelled candidate dataset (``dataset.ipynb``) and store it under its id.

    Parameters
    ----------
    pairs, size, first_seed, vary :
        Simulated pairs: how many, their side, the first seed, and whether each pair's
        observing conditions are drawn from its seed.
    real_pairs : list of dict, optional
        Real pairs with injected fakes: ``{"science": path, "reference": path,
        "split": "test", "trials": 10}`` each.
    """
    if pairs < 3 and not real_pairs:
        raise AstrError(f"pairs must be at least 3 (one image per split), got {pairs}")
    inputs: dict[str, Path] = {}
    for i, spec in enumerate(real_pairs or []):
        for key in ("science", "reference"):
            if not isinstance(spec, Mapping) or not Path(str(spec.get(key, ""))).is_file():
                raise AstrError(f"real_pairs[{i}][{key!r}]: not an existing FITS file: {spec!r}")
            inputs[f"{key}{i}"] = Path(spec[key])
    result = _run(
        "dataset",
        {
            "pairs": int(pairs),
            "size": int(size),
            "first_seed": int(first_seed),
            "vary": bool(vary),
            "real_pairs": [dict(spec) for spec in real_pairs or []],
        },
        inputs,
    )
    outputs = result.outputs
    dataset_id = outputs["dataset_id"]
    _keep_dataset_file(result.output_dir / outputs["products"]["dataset"], dataset_id, get_config())
    get_run_logger().info("dataset %s: %d candidates", dataset_id, outputs["metrics"]["candidates"])
    return {
        "dataset_id": dataset_id,
        "candidates": outputs["metrics"]["candidates"],
        "counts": outputs["counts"],
        "report": str(result.html_report),
    }


@flow(name="model_training", log_prints=True, **monitoring_hooks())
def model_training_flow(dataset_id: str, config: dict) -> dict:
    """Train, calibrate and evaluate on a stored dataset; log and register the model.

    Returns ``model_id`` (the new version of ``realbogus``), the MLflow ``run_id``,
    the test metrics and the report.
    """
    return _train(dataset_id, config, run_name=f"train-{dataset_id}")


@flow(name="hyperparameter_optimization", log_prints=True, **monitoring_hooks())
def hyperparameter_optimization_flow(
    model_type: str,
    search_space: dict,
    dataset_id: str | None = None,
    n_trials: int = 20,
    timeout_s: float | None = None,
    base_config: dict | None = None,
    train_best: bool = True,
    n_workers: int = 1,
) -> dict:
    """Optuna search over ``search_space`` on a stored dataset; train the best settings.

    Parameters
    ----------
    model_type : str
        The architecture to tune: ``cnn``.
    search_space : dict
        Setting -> ``{"type": "float"|"int"|"categorical", ...}``
        (``pipeline.ml.search.validate_search_space``).
    dataset_id : str, optional
        Default: the most recently stored dataset.
    n_trials, timeout_s :
        Finished trials wanted; no new trial after ``timeout_s`` seconds.
    base_config : dict, optional
        Settings every trial shares (``epochs``, ``patience``...).
    train_best : bool
        Hand the best parameters to ``model_training_flow`` (a registered version).
    n_workers : int
        Processes working on the study on this machine, the cores shared among them
        (``pipeline.ml.search_workers``). With the default SQLite storage a study of
        more than one process lives in a journal file next to it (``optuna.journal``).

    The study is named from the model type, dataset and space, and kept in the
    configured Optuna storage: running the flow again after an interruption resumes
    it, running only the missing trials. Workers on other hosts join it with
    ``astr hpo-worker --study <study_name>`` (the summary names the study).
    """
    if model_type not in MODEL_TYPES:
        raise AstrError(f"unknown model_type {model_type!r}; expected one of {MODEL_TYPES}")
    space = validate_search_space(search_space)
    base = dict(base_config or {})
    TrainConfig.from_dict(base)
    if n_trials < 1:
        raise AstrError(f"n_trials must be at least 1, got {n_trials}")
    if n_workers < 1:
        raise AstrError(f"n_workers must be at least 1, got {n_workers}")
    settings = get_config()
    dataset_id = dataset_id or latest_dataset(settings)
    path = dataset_path(dataset_id, settings)
    digest = hashlib.sha256(
        json.dumps({"space": space, "base": base}, sort_keys=True).encode()
    ).hexdigest()[:8]
    study_name = f"{model_type}-{dataset_id}-{digest}"
    result = _run(
        "hpo",
        {
            "dataset_path": str(path),
            "search_space": space,
            "base_config": base,
            "n_trials": int(n_trials),
            "timeout_s": float(timeout_s or 0.0),
            "study_name": study_name,
            "storage_url": settings.optuna_storage_url,
            "tracking_uri": settings.mlflow_tracking_uri,
            "n_workers": int(n_workers),
        },
        {"dataset": path},
    )
    outputs = result.outputs
    best = dict(outputs["best_params"])
    get_run_logger().info(
        "study %s: best validation loss %.4f with %s (%s)",
        study_name,
        outputs["best_value"],
        best,
        {k: v for k, v in outputs["metrics"].items() if k.startswith("n_")},
    )
    summary = {
        "study_name": study_name,
        "storage_url": outputs["storage_url"],
        "dataset_id": dataset_id,
        "n_workers": int(n_workers),
        "best_params": best,
        "best_value": outputs["best_value"],
        "trials": {k: v for k, v in outputs["metrics"].items() if k.startswith("n_")},
        "report": str(result.html_report),
    }
    if train_best:
        summary["training"] = model_training_flow(dataset_id, {**base, **best})
        summary["model_id"] = summary["training"]["model_id"]
    return summary


@flow(name="model_evaluation", log_prints=True, **monitoring_hooks())
def model_evaluation_flow(
    model_id: str, test_dataset: str, baseline: str | None = "production"
) -> dict:
    """Measure model version ``model_id`` on stored dataset ``test_dataset``.

    The test split is used (all candidates when the dataset has none). With
    ``baseline`` (an environment or a version number) that model is measured on the
    same candidates. Metrics go to the model's MLflow run as
    ``eval_<dataset>_<metric>``, the report and figures under ``evaluations/``.
    """
    settings = get_config()
    registry = _registry(settings)
    version = _version(model_id)
    path = dataset_path(test_dataset, settings)
    model_file = _model_file(registry, version, settings)
    params: dict[str, Any] = {"model_path": str(model_file), "dataset_path": str(path)}
    inputs = {"dataset": path, "model": model_file}
    base_version = _baseline_version(registry, baseline)
    if base_version is not None and base_version != version:
        params["baseline_path"] = str(_model_file(registry, base_version, settings))
        inputs["baseline"] = Path(params["baseline_path"])
    else:
        base_version = None
    result = _run("evaluation", params, inputs)
    outputs = result.outputs
    run_id = registry.client.get_model_version("realbogus", str(version)).run_id
    prefix = f"eval_{test_dataset}_"
    for key, value in outputs["metrics"].items():
        if key != "seconds":
            registry.client.log_metric(run_id, prefix + key, float(value))
    where = f"evaluations/{test_dataset}"
    registry.client.log_artifact(run_id, str(result.html_report), artifact_path=where)
    for name in outputs["products"].values():
        registry.client.log_artifact(run_id, str(result.output_dir / name), artifact_path=where)
    metrics = {k: v for k, v in outputs["metrics"].items() if k != "seconds"}
    get_run_logger().info(
        "v%d on %s: AUC %.4f, FPR %.4f at FNR %.3f, ECE %.4f",
        version,
        test_dataset,
        metrics["auc"],
        metrics["fpr"],
        metrics["fnr"],
        metrics["ece"],
    )
    return {
        "model_id": str(version),
        "test_dataset": test_dataset,
        "n_candidates": outputs["n_candidates"],
        "metrics": metrics,
        "baseline": None if base_version is None else str(base_version),
        "baseline_metrics": outputs.get("baseline_metrics"),
        "report": str(result.html_report),
    }


@flow(name="model_deployment", log_prints=True, **monitoring_hooks())
def model_deployment_flow(model_id: str, environment: str, force: bool = False) -> dict:
    """Move ``environment`` to model version ``model_id`` if it beats the current holder.

    The comparison uses the test split of the dataset the model was trained on; with
    ``force`` the version is deployed whatever it says.
    """
    settings = get_config()
    registry = _registry(settings)
    version = _version(model_id)
    model = registry.load(version)
    test = load_dataset(dataset_path(model.dataset_id, settings)).subset("test")
    outcome = registry.deploy(version, environment, test, force=force)
    get_run_logger().info("%s: %s", environment, outcome.reason)
    return _deployment(outcome)


@flow(name="model_rollback", log_prints=True, **monitoring_hooks())
def model_rollback_flow(environment: str) -> dict:
    """Give ``environment`` back to the version its current holder replaced."""
    outcome = _registry(get_config()).rollback(environment)
    get_run_logger().info("%s: %s", environment, outcome.reason)
    return _deployment(outcome)


@flow(name="model_retraining", log_prints=True, **monitoring_hooks())
def model_retraining_flow(
    model_id: str,
    new_data: str,
    config: dict | None = None,
    fine_tune: bool = True,
    environment: str = "production",
) -> dict:
    """Retrain model ``model_id`` on its data plus stored dataset ``new_data``.

    The merged dataset keeps every image's split (images already in the model's data
    are not added twice). With ``fine_tune`` training starts from the model's weights
    (its settings, overridden by ``config``); otherwise from scratch. The new version
    then goes to ``environment`` only if it beats the model there on the merged test
    set (the same candidates for both).
    """
    if environment not in ENVIRONMENTS:
        raise RegistryError(f"unknown environment {environment!r}; expected one of {ENVIRONMENTS}")
    settings = get_config()
    registry = _registry(settings)
    version = _version(model_id)
    base = registry.load(version)
    try:
        base_path = dataset_path(base.dataset_id, settings)
    except DatasetNotFoundError as exc:
        raise DatasetNotFoundError(
            f"v{version} was trained on dataset {base.dataset_id}, which is not stored here "
            f"({exc}); retrain from scratch with model_training_flow on new data instead"
        ) from None
    merged = merge_datasets(load_dataset(base_path), load_dataset(dataset_path(new_data, settings)))
    merged_id = store_dataset(merged.data, settings)
    logger = get_run_logger()
    logger.info(
        "dataset %s = %s + %d candidates of %s%s",
        merged_id,
        base.dataset_id,
        merged.added,
        new_data,
        f" (dropped images already present: {list(merged.dropped_images)})"
        if merged.dropped_images
        else "",
    )
    train_config = {**base.config.to_dict(), **dict(config or {})}
    initial = _model_file(registry, version, settings) if fine_tune else None
    trained = _train(
        merged_id,
        train_config,
        initial_model=initial,
        run_name=f"retrain-v{version}-{merged_id}",
        tags={"retrained_from": str(version), "new_data": new_data},
    )
    test = merged.data.subset("test")
    outcome = registry.deploy(int(trained["model_id"]), environment, test)
    logger.info("%s: %s", environment, outcome.reason)
    return {
        "model_id": trained["model_id"],
        "retrained_from": str(version),
        "fine_tuned": fine_tune,
        "dataset_id": merged_id,
        "added_candidates": merged.added,
        "metrics": trained["metrics"],
        "deployment": _deployment(outcome),
        "promoted": outcome.deployed,
        "report": trained["report"],
    }


def train_starter_model(
    *,
    pairs: int = 24,
    size: int = 1024,
    config: Mapping[str, Any] | None = None,
    environment: str = "production",
) -> dict:
    """Simulate a dataset, train on it and deploy the model (``astr demo``).

    For a project with no model yet: the pipeline's candidates then carry a real
    ``rb_score`` from the first night. The pairs' observing conditions vary (seeing,
    sky, depth, artefacts), so the model has seen more than one kind of night. A
    survey replaces it with a model trained on its own data.
    """
    built = candidate_dataset_flow(pairs=pairs, size=size, first_seed=900, vary=True)
    trained = model_training_flow(built["dataset_id"], dict(config or {}))
    deployment = model_deployment_flow(trained["model_id"], environment)
    return {**trained, "deployment": deployment, "candidates": built["candidates"]}


def _deployment(outcome: Any) -> dict:
    return {
        "environment": outcome.environment,
        "model_id": str(outcome.version),
        "replaced": None if outcome.replaced is None else str(outcome.replaced),
        "deployed": outcome.deployed,
        "reason": outcome.reason,
    }


def _baseline_version(registry: ModelRegistry, baseline: str | None) -> int | None:
    if not baseline:
        return None
    if baseline in ENVIRONMENTS:
        return registry.holder(baseline)
    return _version(baseline)


def _model_file(registry: ModelRegistry, version: int, config: WorkflowConfig) -> Path:
    """A local file of a version's model (in place for a local artifact store)."""
    from pipeline.ml.serving import model_file

    return model_file(registry, version, Path(config.home) / "models")
