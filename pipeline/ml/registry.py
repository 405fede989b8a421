"""Model versions in MLflow: logging a trained model, deployment by alias, rollback.

Every trained model is one MLflow run (parameters, per-epoch metrics, test metrics,
the model file) and one version of the registered model ``realbogus``. An environment
(``staging``, ``production``) is an alias on a version. A version takes an environment
only if it beats the current holder on the same test set (or with ``force``); the new
holder's tags record whom it replaced, so ``rollback`` moves the alias back in one call.
"""

from __future__ import annotations

import getpass
import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.errors import AstrError

if TYPE_CHECKING:  # torch, SciPy and astropy load only where a model is used: a flow
    # process that just looks up the production model does not import them (~3 CPU-s)
    from pipeline.ml.data import CandidateDataset
    from pipeline.ml.evaluate import Evaluation
    from pipeline.ml.train import TrainedModel

__all__ = [
    "ENVIRONMENTS",
    "MODEL_NAME",
    "DatasetRecord",
    "Deployment",
    "ModelRegistry",
    "RegistryError",
]

MODEL_NAME = "realbogus"
ENVIRONMENTS = ("staging", "production")
EXPERIMENT = "realbogus"
#: Miss rate at which models are compared (the operating point quoted by surveys).
COMPARE_FNR = 0.02


class RegistryError(AstrError):
    """A model version or environment that does not exist, or a refused deployment."""


@dataclass(frozen=True)
class Deployment:
    """The outcome of a deployment or a rollback."""

    environment: str
    version: int
    replaced: int | None
    deployed: bool
    reason: str


@dataclass(frozen=True)
class DatasetRecord:
    """A stored candidate dataset as MLflow shows it among a run's inputs."""

    dataset_id: str
    path: Path
    counts: Mapping[str, Mapping[str, int]]

    def as_input(self):
        """The ``mlflow.entities.DatasetInput`` for ``log_inputs``."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        profile = json.dumps({"num_rows": sum(sum(c.values()) for c in self.counts.values())})
        return DatasetInput(
            Dataset(
                name=f"candidates-{self.dataset_id}",
                digest=self.dataset_id,
                source_type="local",
                source=json.dumps({"uri": self.path.resolve().as_uri()}),
                schema=json.dumps({"counts": {k: dict(v) for k, v in self.counts.items()}}),
                profile=profile,
            ),
            tags=[InputTag("mlflow.data.context", "training")],
        )


class ModelRegistry:
    """The registered model ``realbogus`` in one MLflow tracking store.

    Parameters
    ----------
    tracking_uri : str
        Any MLflow tracking URI (``sqlite:///.../mlflow.db`` by default in the config,
        ``postgresql+psycopg://...`` on a cluster).
    artifact_root : str or path, optional
        Where a new experiment keeps its artifacts: a directory or a URL such as
        ``s3://bucket/prefix/mlflow`` (default: next to a SQLite file; MLflow's own
        default otherwise). Experiments that exist already keep their location.
    """

    def __init__(self, tracking_uri: str, artifact_root: str | Path | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        if artifact_root is None and tracking_uri.startswith("sqlite:///"):
            artifact_root = Path(tracking_uri.removeprefix("sqlite:///")).parent / "mlartifacts"
        self.artifact_root = _artifact_location(artifact_root)

    # -- logging ---------------------------------------------------------------------

    def log_model(
        self,
        model: TrainedModel,
        *,
        evaluation: Evaluation | None = None,
        run_name: str | None = None,
        extra_artifacts: tuple[Path, ...] = (),
        plots: tuple[Path, ...] = (),
        dataset: DatasetRecord | None = None,
        score_reference: Sequence[int] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> int:
        """Log a trained model as a run and register it; returns the new version number.

        Parameters
        ----------
        model : TrainedModel
        evaluation : Evaluation, optional
            Test figures, logged as ``test_<metric>``.
        run_name : str, optional
        extra_artifacts : tuple of Path
            Reports (the executed notebook's HTML), under ``reports/``.
        plots : tuple of Path
            Figures, under ``plots/``.
        dataset : DatasetRecord, optional
            The training data, logged as the run's dataset input.
        score_reference : sequence of int, optional
            Histogram of the model's scores on its training candidates, kept as the
            version's ``score_histogram`` tag for the nightly drift check.
        tags : mapping, optional
            Extra version tags (``retrained_from``...).
        """
        experiment_id = self._experiment_id()
        run = self.client.create_run(experiment_id, run_name=run_name)
        run_id = run.info.run_id
        try:
            if dataset is not None:
                self.client.log_inputs(run_id, datasets=[dataset.as_input()])
            params = {k: str(v) for k, v in model.config.to_dict().items()}
            params.update(dataset_id=model.dataset_id, temperature=f"{model.temperature:.6g}")
            for key, value in params.items():
                self.client.log_param(run_id, key, value)
            for row in model.history:
                for key, value in row.items():
                    if key != "epoch":
                        self.client.log_metric(run_id, key, float(value), step=int(row["epoch"]))
            self.client.log_metric(run_id, "best_epoch", float(model.best_epoch))
            if evaluation is not None:
                for key, value in evaluation.metrics().items():
                    self.client.log_metric(run_id, f"test_{key}", value)
            with tempfile.TemporaryDirectory() as tmp:
                path = model.save(Path(tmp) / "model.pt")
                self.client.log_artifact(run_id, str(path), artifact_path="model")
            for extra in extra_artifacts:
                self.client.log_artifact(run_id, str(extra), artifact_path="reports")
            for plot in plots:
                self.client.log_artifact(run_id, str(plot), artifact_path="plots")
            self.client.set_terminated(run_id, "FINISHED")
        except BaseException:
            self.client.set_terminated(run_id, "FAILED")
            raise
        self._ensure_registered()
        version = self.client.create_model_version(
            MODEL_NAME,
            source=f"{run.info.artifact_uri}/model",
            run_id=run_id,
            tags={
                "dataset_id": model.dataset_id,
                **(
                    {"score_histogram": json.dumps([int(c) for c in score_reference])}
                    if score_reference is not None
                    else {}
                ),
                **dict(tags or {}),
            },
        )
        return int(version.version)

    def load(self, version: int) -> TrainedModel:
        """The model of a registered version, loaded as our class."""
        import mlflow

        from pipeline.ml.train import load_model

        record = self._version(version)
        if record.source.startswith("file://"):  # a local artifact store: read it in place
            return load_model(Path(url2pathname(urlparse(record.source).path)) / "model.pt")
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{record.source}/model.pt",
                dst_path=tmp,
                tracking_uri=self.tracking_uri,
            )
            return load_model(local)

    def load_environment(self, environment: str) -> tuple[int, TrainedModel] | None:
        """The version holding ``environment`` and its model; None when none does."""
        version = self.holder(environment)
        return None if version is None else (version, self.load(version))

    def versions(self) -> list[dict]:
        """Every version, newest first: aliases, dataset, creation time, test metrics."""
        from mlflow.exceptions import MlflowException

        try:
            model = self.client.get_registered_model(MODEL_NAME)
        except MlflowException:
            return []
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        rows = []
        for record in self.client.search_model_versions(f"name='{MODEL_NAME}'"):
            metrics = self.client.get_run(record.run_id).data.metrics if record.run_id else {}
            rows.append(
                {
                    "version": int(record.version),
                    "aliases": sorted(aliases.get(str(record.version), [])),
                    "created": datetime.fromtimestamp(
                        record.creation_timestamp / 1000, UTC
                    ).isoformat(timespec="seconds"),
                    "dataset_id": record.tags.get("dataset_id", ""),
                    "run_id": record.run_id,
                    "metrics": {
                        k.removeprefix("test_"): v
                        for k, v in metrics.items()
                        if k in ("test_auc", "test_fpr", "test_fnr", "test_ece", "test_threshold")
                    },
                    "tags": dict(record.tags),
                }
            )
        return sorted(rows, key=lambda r: -r["version"])

    # -- deployment ------------------------------------------------------------------

    def holder(self, environment: str) -> int | None:
        """Version now behind ``environment``'s alias, if any."""
        _check_environment(environment)
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version_by_alias(MODEL_NAME, environment)
        except MlflowException:
            return None
        return int(found.version)

    def deploy(
        self,
        version: int,
        environment: str,
        test_data: CandidateDataset,
        *,
        force: bool = False,
        who: str | None = None,
    ) -> Deployment:
        """Move ``environment`` to ``version`` if it beats the holder on ``test_data``.

        Both are compared on the same candidates: the lower false-positive rate at a
        miss rate of ``COMPARE_FNR`` wins, the higher AUC breaking a tie. A test set with
        too few real candidates for that miss rate to mean anything (fewer than
        ``1 / COMPARE_FNR``: the operating point would keep every one of them, and the
        single worst-scored real would decide) is compared on AUC first instead. With
        ``force`` the version is deployed whatever the comparison says.
        """
        from pipeline.ml.evaluate import evaluate

        _check_environment(environment)
        self._version(version)
        current = self.holder(environment)
        if current == version:
            return Deployment(environment, version, current, False, "already deployed")
        new_eval = evaluate(
            self.load(version).predict_proba(test_data.triplets), test_data, COMPARE_FNR
        )
        reason = f"v{version}: FPR {new_eval.fpr:.4f}, AUC {new_eval.auc:.4f}"
        if current is not None:
            old_eval = evaluate(
                self.load(current).predict_proba(test_data.triplets), test_data, COMPARE_FNR
            )
            if int(test_data.label.sum()) * COMPARE_FNR >= 1.0:
                better = (new_eval.fpr, -new_eval.auc) < (old_eval.fpr, -old_eval.auc)
            else:
                better = (-new_eval.auc, new_eval.fpr) < (-old_eval.auc, old_eval.fpr)
                reason += " (few real candidates: AUC decides)"
            reason += f" against v{current}: FPR {old_eval.fpr:.4f}, AUC {old_eval.auc:.4f}"
            if not better and not force:
                return Deployment(environment, version, current, False, f"refused: {reason}")
        self._move(environment, version, current, who, f"deployed{' (forced)' if force else ''}")
        return Deployment(environment, version, current, True, reason)

    def rollback_target(self, environment: str) -> tuple[int, int]:
        """(current holder, the version a rollback restores); RegistryError if none."""
        current = self.holder(environment)
        if current is None:
            raise RegistryError(f"nothing is deployed to {environment}: nothing to roll back")
        previous = self._version(current).tags.get(f"{environment}.replaced")
        if not previous:
            raise RegistryError(
                f"v{current} was the first version deployed to {environment}: there is no "
                "earlier holder to roll back to"
            )
        return current, int(previous)

    def rollback(self, environment: str, *, who: str | None = None) -> Deployment:
        """Give ``environment`` back to the version its current holder replaced."""
        current, previous = self.rollback_target(environment)
        self._move(environment, previous, current, who, "rolled back", restore=True)
        return Deployment(environment, previous, current, True, f"rolled back from v{current}")

    # -- internals -------------------------------------------------------------------

    def _move(
        self,
        environment: str,
        version: int,
        replaced: int | None,
        who: str | None,
        what: str,
        *,
        restore: bool = False,
    ) -> None:
        """Point the alias at ``version`` and tag both versions with who did what, when.

        A deployment records on the new holder whom it replaced (what ``rollback``
        follows); a restore (``restore=True``) keeps the restored version's original
        record and only notes the event.
        """
        now = datetime.now(UTC).isoformat()
        stamp = f"{now} by {who or getpass.getuser()}"
        tags = {f"{environment}.restored": stamp}
        if not restore:
            tags = {
                f"{environment}.replaced": "" if replaced is None else str(replaced),
                f"{environment}.deployed": f"{stamp} ({what})",
            }
        self.client.set_registered_model_alias(MODEL_NAME, environment, str(version))
        for key, value in tags.items():
            self.client.set_model_version_tag(MODEL_NAME, str(version), key, value)
        if replaced is not None:
            note = f"v{version} at {now} ({what})"
            self.client.set_model_version_tag(
                MODEL_NAME, str(replaced), f"{environment}.replaced_by", note
            )

    def version_record(self, version: int):
        """MLflow's ``ModelVersion`` of a version; RegistryError if there is none."""
        return self._version(version)

    def _version(self, version: int):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(MODEL_NAME, str(int(version)))
        except MlflowException:
            raise RegistryError(f"{MODEL_NAME} has no version {version}") from None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(EXPERIMENT)
        if found is not None:
            return found.experiment_id
        return self.client.create_experiment(EXPERIMENT, artifact_location=self.artifact_root)

    def _ensure_registered(self) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(MODEL_NAME)
        except MlflowException:
            self.client.create_registered_model(
                MODEL_NAME, description="Real/bogus classifier of difference-image candidates"
            )


def _artifact_location(root: str | Path | None) -> str | None:
    """An artifact root as MLflow takes it: a URL as given, a directory as ``file://``."""
    if root is None or root == "":
        return None
    if isinstance(root, str) and "://" in root:
        return root.rstrip("/")
    return Path(root).resolve().as_uri()


def _check_environment(environment: str) -> None:
    if environment not in ENVIRONMENTS:
        raise RegistryError(f"unknown environment {environment!r}; expected one of {ENVIRONMENTS}")
