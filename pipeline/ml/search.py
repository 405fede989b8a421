"""Hyper-parameter search with Optuna: TPE, pruning on per-epoch validation loss.

The study lives in an RDB storage (SQLite by default, any SQLAlchemy URL), so an
interrupted search is resumed by running it again with the same name: it only runs
the trials still missing. With a tracking URI every trial is an MLflow run nested
under one run for the search.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.errors import AstrError
from pipeline.ml.data import CandidateDataset
from pipeline.ml.train import TrainConfig, train_model

__all__ = ["SearchResult", "SearchSpaceError", "run_search", "validate_search_space"]

_TYPES = ("float", "int", "categorical")


class SearchSpaceError(AstrError, ValueError):
    """A malformed ``search_space``: the message names the parameter and the problem."""


@dataclass(frozen=True)
class SearchResult:
    """What a search found."""

    study_name: str
    best_params: dict[str, Any]
    best_value: float
    n_complete: int
    n_pruned: int
    n_failed: int


def validate_search_space(search_space: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check a search space; returns it with defaults filled in.

    Each entry maps a training setting (see ``TrainConfig.from_dict``) to one of
    ``{"type": "float", "low": a, "high": b, "log": bool}``,
    ``{"type": "int", "low": a, "high": b, "log": bool}`` or
    ``{"type": "categorical", "choices": [...]}``.

    Raises
    ------
    SearchSpaceError
    """
    if not isinstance(search_space, Mapping) or not search_space:
        raise SearchSpaceError("search_space must be a non-empty mapping of setting -> spec")
    known = set(TrainConfig().to_dict()) - {"device", "seed", "epochs"}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in search_space.items():
        where = f"search_space[{name!r}]"
        if name not in known:
            raise SearchSpaceError(f"{where}: not a tunable setting; choose from {sorted(known)}")
        if not isinstance(spec, Mapping) or spec.get("type") not in _TYPES:
            raise SearchSpaceError(f"{where} needs a 'type' of {_TYPES}, got {spec!r}")
        kind = spec["type"]
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list | tuple) or not choices:
                raise SearchSpaceError(f"{where}: 'choices' must be a non-empty list")
            out[name] = {"type": kind, "choices": list(choices)}
            continue
        low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
        number = int if kind == "int" else (int, float)
        if not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool):
            raise SearchSpaceError(f"{where}: 'low' and 'high' must be {kind} numbers")
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise SearchSpaceError(f"{where}: needs low < high, got {low} and {high}")
        if log and low <= 0:
            raise SearchSpaceError(f"{where}: a log scale needs low > 0, got {low}")
        out[name] = {"type": kind, "low": low, "high": high, "log": log}
    return out


def run_search(
    data: CandidateDataset,
    search_space: Mapping[str, Any],
    *,
    storage_url: str,
    study_name: str,
    n_trials: int,
    timeout: float | None = None,
    base: Mapping[str, Any] | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
) -> SearchResult:
    """Minimise the best validation loss over ``search_space``; resume a study by name.

    Parameters
    ----------
    n_trials : int
        Total finished trials wanted in the study (complete, pruned or failed);
        a resumed study runs only the missing ones.
    timeout : float, optional
        Seconds after which no new trial starts.
    base : mapping, optional
        Settings every trial shares (``epochs``, ``device``...).
    """
    import optuna

    space = validate_search_space(search_space)
    if n_trials < 1:
        raise SearchSpaceError(f"n_trials must be at least 1, got {n_trials}")
    base = dict(base or {})
    TrainConfig.from_dict(base)  # names a bad base setting before any trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage_url,
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=seed),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2),
        load_if_exists=True,
    )
    finished = {
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.FAIL,
    }
    remaining = n_trials - sum(t.state in finished for t in study.trials)
    tracker = _Tracker(tracking_uri, study_name) if tracking_uri else None

    def objective(trial: optuna.Trial) -> float:
        params = {name: _suggest(trial, name, spec) for name, spec in space.items()}
        config = TrainConfig.from_dict({**base, **params, "seed": seed + trial.number})

        def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
            trial.report(metrics["val_loss"], epoch)
            if tracker is not None:
                tracker.epoch(trial.number, epoch, metrics)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        if tracker is not None:
            tracker.start(trial.number, params)
        status = "FAILED"
        try:
            model = train_model(data, config, on_epoch=on_epoch)
            value = min(h["val_loss"] for h in model.history)
            status = "FINISHED"
            return value
        except optuna.TrialPruned:
            status = "KILLED"
            raise
        finally:
            if tracker is not None:
                tracker.end(trial.number, status)

    try:
        if remaining > 0:
            study.optimize(objective, n_trials=remaining, timeout=timeout, catch=(ValueError,))
    finally:
        if tracker is not None:
            tracker.close()
    states = [t.state for t in study.trials]
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise AstrError(f"study {study_name}: no trial completed ({len(states)} tried)")
    return SearchResult(
        study_name=study_name,
        best_params=dict(study.best_params),
        best_value=float(study.best_value),
        n_complete=len(complete),
        n_pruned=states.count(optuna.trial.TrialState.PRUNED),
        n_failed=states.count(optuna.trial.TrialState.FAIL),
    )


def _suggest(trial: Any, name: str, spec: Mapping[str, Any]) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(name, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec["log"])
    return trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])


class _Tracker:
    """One MLflow parent run for a search, one nested run per trial."""

    def __init__(self, tracking_uri: str, study_name: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        name = "realbogus-search"
        found = self.client.get_experiment_by_name(name)
        self.experiment = found.experiment_id if found else self.client.create_experiment(name)
        parent = self.client.create_run(self.experiment, run_name=study_name)
        self.parent = parent.info.run_id
        self.runs: dict[int, str] = {}

    def start(self, number: int, params: Mapping[str, Any]) -> None:
        run = self.client.create_run(
            self.experiment,
            run_name=f"trial-{number}",
            tags={"mlflow.parentRunId": self.parent, "optuna.trial": str(number)},
        )
        self.runs[number] = run.info.run_id
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, str(value))

    def epoch(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.client.log_metric(self.runs[number], key, float(value), step=epoch)

    def end(self, number: int, status: str) -> None:
        self.client.set_terminated(self.runs[number], status)

    def close(self) -> None:
        self.client.set_terminated(self.parent, "FINISHED")
