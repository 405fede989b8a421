"""What the observation flows share at run time: the runner, products, progress, events.

Kept apart from the flow definitions so each piece is small; everything here runs
inside a flow or task and may talk to Prefect, the catalogue and the artifact store.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import StorageConfig, WorkflowConfig
from pipeline.errors import CatalogueError
from pipeline.flows.publish import publish
from pipeline.runner import Attempt, KernelPool, NotebookRunner
from pipeline.store import ArtifactStore, Catalogue
from pipeline.store.models import Product
from pipeline.store.products import save_product
from pipeline.store.storage import sha256_file

if TYPE_CHECKING:  # torch and MLflow load only when a flow needs the registry
    from pipeline.ml.registry import ModelRegistry

__all__ = [
    "PipelineContext",
    "ProgressReporter",
    "close_catalogues",
    "download",
    "emit",
    "expect_notebooks",
    "flow_run_id",
    "get_catalogue",
    "get_runner",
    "local_copy",
    "mlflow_artifact_root",
    "model_registry",
    "pipeline_context",
    "pool_size",
    "progress_hook",
    "register_file",
    "s3_endpoint",
    "use_storage_for_mlflow",
]

log = logging.getLogger(__name__)

_POOL: KernelPool | None = None
_RUNNERS: dict[tuple[str, int, int], NotebookRunner] = {}
_LOCK = threading.Lock()


_CATALOGUES: dict[str, Catalogue] = {}


def get_catalogue(config: WorkflowConfig) -> Catalogue:
    """The process's catalogue connection for this database (schema checked once)."""
    with _LOCK:
        catalogue = _CATALOGUES.get(config.database_url)
        if catalogue is None:
            catalogue = Catalogue.from_config(config)
            _CATALOGUES[config.database_url] = catalogue
        return catalogue


def close_catalogues() -> None:
    """Close the catalogue connections :func:`get_catalogue` keeps for this process.

    The next :func:`get_catalogue` opens them again. For a process about to exit or
    fork, and for tests: a database server's pooled connections are then closed
    cleanly rather than dropped when the interpreter ends.
    """
    with _LOCK:
        catalogues = list(_CATALOGUES.values())
        _CATALOGUES.clear()
    for catalogue in catalogues:
        catalogue.close()


def pool_size(environ: Mapping[str, str] | None = None) -> int:
    """Spare kernels to keep warm in this process.

    A long-lived process (``astr observe``, the demo, a Dask worker) keeps three: every
    spare is used by a later step, so it costs memory, not CPU. A process a worker
    started for one flow run (``PREFECT__FLOW_RUN_ID`` set) keeps one: the next step's
    kernel warms while a step runs, and the spares left when the run ends are thrown
    away, so each one more is a kernel start (the science imports, seconds of CPU) wasted
    per run; with three, eight kernels were started for a five-step pipeline.
    """
    env = os.environ if environ is None else environ
    return 1 if env.get("PREFECT__FLOW_RUN_ID") else 3


def expect_notebooks(config: WorkflowConfig, count: int) -> None:
    """In a process a worker started for one run, warm kernels for ``count`` notebooks only.

    Such a process ends with its run, so a kernel warmed behind the last notebook is
    thrown away; a long-lived process keeps its spares for the next run.
    """
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        pool = get_runner(config).pool
        if pool is not None:
            pool.expect(count)


def get_runner(config: WorkflowConfig) -> NotebookRunner:
    """The process's notebook runner for this project home (one warm kernel pool)."""
    global _POOL
    key = (str(Path(config.home).resolve()), config.retry_attempts, config.flow_timeout)
    with _LOCK:
        if _POOL is None:
            # Three spare kernels: a short notebook (ingestion, detection, validation)
            # ends before a kernel can be warmed behind it on a busy machine, and with
            # two the next pipeline's second step still waited for one (0.2-0.3 s).
            # Each kernel is warmed once whatever the size, so a spare costs memory
            # (about 200 MB resident each, measured), not CPU; a burst beyond it falls back
            # to cold starts.
            _POOL = KernelPool(pool_size())
        runner = _RUNNERS.get(key)
        if runner is None:
            home = Path(config.home)
            runner = NotebookRunner(
                home / "runs",
                retry_attempts=config.retry_attempts,
                notebook_timeout=config.flow_timeout,
                pool=_POOL,
                cache_dir=home / "cache" / "notebooks",
            )
            _RUNNERS[key] = runner
        return runner


#: Where MLflow's S3 artifact store (boto3) reads a non-AWS endpoint from.
MLFLOW_S3_ENDPOINT_VARIABLE = "MLFLOW_S3_ENDPOINT_URL"


def mlflow_artifact_root(storage: StorageConfig, tracking_uri: str) -> str | None:
    """Where new MLflow experiments keep their artifacts, given the artifact storage.

    Parameters
    ----------
    storage : StorageConfig
        The configured artifact storage.
    tracking_uri : str
        The MLflow tracking URI.

    Returns
    -------
    str or None
        ``<storage url>/mlflow`` on S3; ``<storage root>/mlflow`` for a local store
        with a database server as tracking store (not MLflow's ``./mlruns`` under
        whatever directory the process started in); None for a SQLite tracking file,
        whose artifacts stay beside it.
    """
    if storage.backend != "local":
        return f"{storage.url}/mlflow"
    if tracking_uri.startswith("sqlite:"):
        return None
    return str(Path(storage.root) / "mlflow")


def s3_endpoint(storage: StorageConfig) -> str | None:
    """The S3-compatible endpoint of the storage options (``endpoint_url``), if any."""
    if storage.backend != "s3":
        return None
    options = storage.options or {}
    endpoint = options.get("endpoint_url") or (options.get("client_kwargs") or {}).get(
        "endpoint_url"
    )
    return str(endpoint) if endpoint else None


def use_storage_for_mlflow(storage: StorageConfig) -> None:
    """Let MLflow reach the configured S3 endpoint when it logs or loads artifacts.

    MLflow's S3 artifact store takes a non-AWS endpoint only from the
    ``MLFLOW_S3_ENDPOINT_URL`` environment variable; this sets it (for this process
    and the kernels it starts) from ``storage.options.endpoint_url``. Credentials come
    from the usual ``AWS_*`` variables. Nothing changes for a local store or AWS itself.
    """
    endpoint = s3_endpoint(storage)
    if endpoint:
        os.environ[MLFLOW_S3_ENDPOINT_VARIABLE] = endpoint


def model_registry(config: WorkflowConfig) -> ModelRegistry:
    """The model registry of these settings, with artifacts where the storage is.

    New experiments keep their artifacts under :func:`mlflow_artifact_root`, and the
    S3 endpoint reaches MLflow for logging and loading (:func:`use_storage_for_mlflow`).
    """
    from pipeline.ml.registry import ModelRegistry

    use_storage_for_mlflow(config.storage_config)
    root = mlflow_artifact_root(config.storage_config, config.mlflow_tracking_uri)
    return ModelRegistry(config.mlflow_tracking_uri, artifact_root=root)


def production_model(config: WorkflowConfig) -> dict[str, Any] | None:
    """The model behind the ``production`` alias, as validation-step parameters.

    None when nothing is deployed. When the tracking store cannot be read the
    observation still runs, unscored, with a warning in the run's log: a night's
    candidates are not lost to a model-registry outage.
    """
    from pipeline.ml.serving import deployed_model

    use_storage_for_mlflow(config.storage_config)
    try:
        served = deployed_model(
            config.mlflow_tracking_uri, "production", cache_dir=Path(config.home) / "models"
        )
    except Exception as exc:  # any registry failure: score nothing, say why
        _run_logger().warning(
            "real/bogus model registry %s unreadable (%s: %s): candidates stay unscored",
            config.mlflow_tracking_uri,
            type(exc).__name__,
            exc,
        )
        return None
    if served is None:
        return None
    return {
        "path": str(served.path),
        "version": served.version,
        "score_reference": list(served.score_reference or []),
    }


def _run_logger() -> Any:
    """The Prefect run logger inside a run, this module's logger outside."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        return get_run_logger()
    except MissingContextError:
        return log


def flow_run_id() -> str | None:
    """Id of the Prefect flow run this code runs in, if any."""
    from prefect.runtime import flow_run

    value = flow_run.id
    return str(value) if value else None


@dataclass
class PipelineContext:
    """State a pipeline flow hands to the step flows it runs."""

    run_id: str | None
    observation_id: uuid.UUID | None = None
    force: bool = False
    reporter: ProgressReporter | None = None
    step_index: int = 0
    steps: int = 5
    reports: dict[str, str] = field(default_factory=dict)


_PIPELINE: contextvars.ContextVar[PipelineContext | None] = contextvars.ContextVar(
    "astr_pipeline", default=None
)


def pipeline_context() -> PipelineContext | None:
    """The enclosing pipeline flow's context, when a step runs inside one."""
    return _PIPELINE.get()


@contextlib.contextmanager
def in_pipeline(context: PipelineContext) -> Iterator[PipelineContext]:
    """Make ``context`` visible to the step flows run in this block."""
    token = _PIPELINE.set(context)
    try:
        yield context
    finally:
        _PIPELINE.reset(token)


#: Set by a caller (the CLI) to watch a pipeline's progress in this process.
progress_hook: contextvars.ContextVar[Callable[[float, str | None], None] | None] = (
    contextvars.ContextVar("astr_progress_hook", default=None)
)


class ProgressReporter:
    """Progress of one flow run: the catalogue record and a Prefect progress artifact.

    Updates are throttled (a notebook cell can be very short): the catalogue record at
    most every ``interval`` seconds, the Prefect artifact every ``publish_interval``
    (sent by the publishing thread, see ``pipeline.flows.publish``); a forced update
    always goes.
    ``hook``, if given, sees every update unthrottled.
    """

    def __init__(
        self,
        catalogue: Catalogue,
        run_id: str | None,
        *,
        key: str,
        interval: float = 1.0,
        publish_interval: float = 5.0,
        hook: Callable[[float, str | None], None] | None = None,
    ) -> None:
        self.hook = hook
        self.publish_interval = publish_interval
        self._published = 0.0
        self.catalogue = catalogue
        self.run_id = run_id
        self.interval = interval
        self._last = 0.0
        self._artifact: uuid.UUID | None = None
        self._latest: tuple[float, str | None] = (0.0, None)
        self._queued = False
        self._key = key
        self.progress = 0.0
        self.current_step: str | None = None

    def update(self, progress: float, current_step: str | None, *, force: bool = False) -> None:
        """Record ``progress`` (0-1) and the step now running."""
        self.progress = min(max(progress, 0.0), 1.0)
        self.current_step = current_step
        if self.hook is not None:
            with contextlib.suppress(Exception):
                self.hook(self.progress, current_step)
        now = time.monotonic()
        if not force and now - self._last < self.interval:
            return
        self._last = now
        if self.run_id is not None:
            with contextlib.suppress(CatalogueError):
                self.catalogue.update_flow_run(
                    self.run_id, progress=self.progress, current_step=current_step
                )
        # The Prefect artifact is for people watching the UI: fewer API calls.
        if force or self._artifact is None or now - self._published >= self.publish_interval:
            self._published = now
            self._publish(current_step)

    def _publish(self, current_step: str | None) -> None:
        """Queue the artifact update; updates queued meanwhile collapse into the latest."""
        percent = round(100.0 * self.progress, 1)
        self._latest = (percent, f"now: {current_step}" if current_step else None)
        if not self._queued:
            self._queued = True
            publish(self._send)

    def _send(self) -> None:
        from prefect.artifacts import create_progress_artifact, update_progress_artifact

        self._queued = False
        percent, description = self._latest
        try:
            if self._artifact is None:
                self._artifact = create_progress_artifact(
                    percent, key=self._key, description=description
                )
            else:
                update_progress_artifact(self._artifact, percent, description=description)
        except Exception as exc:  # progress display must never fail a run
            log.debug("progress artifact not updated: %s", exc)


def emit(event: str, observation_id: uuid.UUID | str, payload: Mapping[str, Any]) -> None:
    """Emit a Prefect event about an observation (``astr.observation.<step>.<what>``)."""
    from prefect.events import emit_event

    try:
        emit_event(
            event=event,
            resource={
                "prefect.resource.id": f"astr.observation.{observation_id}",
                "prefect.resource.name": f"observation {observation_id}",
            },
            payload=dict(payload),
        )
    except Exception as exc:  # an event lost must not fail the step
        log.warning("could not emit event %s: %s", event, exc)


def register_file(
    catalogue: Catalogue,
    store: ArtifactStore,
    observation_id: uuid.UUID | str,
    *,
    kind: str,
    key: str,
    path: Path,
    step: str,
    run_id: str | None,
    metadata: Mapping[str, Any] | None = None,
    sha256: str | None = None,
    link: bool = True,
) -> Product:
    """Store a file as a product, once: a product already recorded at ``key`` is reused.

    Idempotent, so a step whose result came from the cache, or a rerun after a crash
    between storing and recording, neither duplicates nor loses a product. A finished
    run output is hard-linked on a local store (and made read-only), not copied; pass
    ``link=False`` for a file that is not ours (a user's raw image). ``sha256``, when
    the runner has just computed it, saves reading the file again.
    """
    uri = store.uri(key)
    for product in catalogue.products(observation_id, kind=kind):
        if product.uri == uri:
            return product
    if store.exists(key):  # stored, then the run died before recording it
        digest = store.checksum(key)
        if digest == (sha256 or sha256_file(path)):
            return catalogue.add_product(
                observation_id,
                kind=kind,
                uri=uri,
                sha256=digest,
                size_bytes=path.stat().st_size,
                step=step,
                run_id=run_id,
                metadata=metadata,
            )
        store.delete(key)
    return save_product(
        catalogue,
        store,
        observation_id,
        kind=kind,
        key=key,
        source=path,
        step=step,
        run_id=run_id,
        metadata=metadata,
        link=link,
        sha256=sha256 if link else None,
    )


def local_copy(store: ArtifactStore, product: Product, scratch: Path) -> Path:
    """A local path holding a product's bytes (the object itself on a local store)."""
    key = store.key_of(product.uri)
    if store.is_local:
        return store.local_path(key)
    target = scratch / product.sha256[:16] / Path(key).name
    if not target.exists():
        download(store, product.uri, target)
    return target


def download(store: ArtifactStore, uri: str, target: Path) -> None:
    """Copy a stored object to ``target`` atomically (a reader never sees half of it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")
    with store.open(store.key_of(uri), "rb") as source, open(tmp, "wb") as sink:
        shutil.copyfileobj(source, sink)
    tmp.replace(target)


def attempt_dicts(attempts: tuple[Any, ...]) -> list[dict[str, Any]]:
    """JSON form of runner attempts (anything else is skipped)."""
    return [a.to_dict() for a in attempts if isinstance(a, Attempt)]


def utcnow() -> datetime:
    """Timezone-aware now."""
    return datetime.now(UTC)
