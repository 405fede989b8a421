"""The model behind an environment's alias, as the observation pipeline uses it.

A pipeline process asks for ``production`` before each validation step. The alias is
one query; the model file of a version is fetched once per process (read in place
from a local artifact store, downloaded once otherwise), so a deployment or a
rollback takes effect at the next observation without a restart.
"""

from __future__ import annotations

import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from pipeline.ml.registry import MODEL_NAME, ModelRegistry

__all__ = ["ServedModel", "deployed_model", "forget_served_models", "model_file"]

log = logging.getLogger(__name__)

_lock = threading.Lock()
_registries: dict[str, ModelRegistry] = {}
_files: dict[tuple[str, int], ServedModel] = {}


@dataclass(frozen=True)
class ServedModel:
    """A deployed version, ready to score.

    Attributes
    ----------
    environment : str
    version : int
    path : Path
        Local ``model.pt`` (``pipeline.ml.train.load_model`` reads it).
    score_reference : tuple of int, optional
        Histogram of the model's scores on its training candidates (drift check).
    """

    environment: str
    version: int
    path: Path
    score_reference: tuple[int, ...] | None


def deployed_model(
    tracking_uri: str, environment: str = "production", *, cache_dir: Path
) -> ServedModel | None:
    """The version behind ``environment``, or None when nothing is deployed.

    A SQLite tracking file that does not exist yet means no model (it is not created).

    Parameters
    ----------
    tracking_uri : str
        MLflow tracking URI.
    environment : str
        ``production`` or ``staging``.
    cache_dir : Path
        Where model files of a remote artifact store are downloaded (once per version).
    """
    sqlite_file = Path(tracking_uri.removeprefix("sqlite:///"))
    if tracking_uri.startswith("sqlite:///") and not sqlite_file.is_file():
        return None
    with _lock:
        registry = _registries.get(tracking_uri)
        if registry is None:
            registry = _registries[tracking_uri] = ModelRegistry(tracking_uri)
    version = registry.holder(environment)
    if version is None:
        return None
    key = (tracking_uri, version)
    with _lock:
        served = _files.get(key)
    if served is None:
        served = _fetch(registry, environment, version, Path(cache_dir))
        with _lock:
            _files[key] = served
    if served.environment != environment:
        served = ServedModel(environment, served.version, served.path, served.score_reference)
    return served


def forget_served_models() -> None:
    """Drop the per-process caches (tests; a changed tracking store)."""
    with _lock:
        _registries.clear()
        _files.clear()


def model_file(registry: ModelRegistry, version: int, cache_dir: Path, record: Any = None) -> Path:
    """A local ``model.pt`` of a version.

    Read in place from a local artifact store, else downloaded once into
    ``cache_dir/v<version>``. ``record`` is the version's MLflow record when the caller
    has it already (saves a query).

    Raises
    ------
    RegistryError
        If the version does not exist.
    FileNotFoundError
        If its model file is gone.
    """
    record = record or registry.version_record(version)
    if record.source.startswith("file://"):
        path = Path(url2pathname(urlparse(record.source).path)) / "model.pt"
    else:
        import mlflow

        target = Path(cache_dir) / f"v{version}"
        path = target / "model.pt"
        if not path.is_file():
            target.mkdir(parents=True, exist_ok=True)
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"{record.source}/model.pt",
                dst_path=str(target),
                tracking_uri=registry.tracking_uri,
            )
    if not path.is_file():
        raise FileNotFoundError(
            f"{MODEL_NAME} v{version}: its model file {path} is missing; "
            "deploy another version or roll back"
        )
    return path


def _fetch(registry: ModelRegistry, environment: str, version: int, cache_dir: Path) -> ServedModel:
    record = registry.version_record(version)
    path = model_file(registry, version, cache_dir, record)
    reference = None
    text = record.tags.get("score_histogram")
    if text:
        try:
            reference = tuple(int(c) for c in json.loads(text))
        except (ValueError, TypeError):
            log.warning("v%d: unreadable score_histogram tag %r: no drift check", version, text)
    return ServedModel(environment, version, path, reference)
