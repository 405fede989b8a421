"""The pipeline beyond one machine: every database on PostgreSQL, every artifact on S3.

One throwaway PostgreSQL 15 cluster (``tests/pg.py``) holds four databases: the
Prefect server's, the observation catalogue, MLflow's tracking store and Optuna's
storage. Artifacts (observation products, executed notebooks, HTML reports, MLflow
models) go to a bucket on the moto S3 server. A real Prefect server runs on the
cluster's ``prefect`` database. The settings are the ones a user sets
(``ASTR_DATABASE_URL``, ``ASTR_MLFLOW_TRACKING_URI``, ``ASTR_OPTUNA_STORAGE_URL``,
``ASTR_STORAGE_ROOT``, ``ASTR_STORAGE_OPTIONS``...), and the checks read what was
stored straight from PostgreSQL and S3.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pg  # tests/pg.py (tests/ is on the path through its conftest.py)
import pytest
from sqlalchemy import create_engine, text

from pipeline.config import get_config, load_config
from pipeline.errors import CatalogueError
from pipeline.flows.observations import observation_pipeline_flow
from pipeline.flows.runtime import (
    close_catalogues,
    get_catalogue,
    model_registry,
    production_model,
)
from pipeline.flows.training import model_deployment_flow, model_training_flow, store_dataset
from pipeline.ml.serving import forget_served_models
from pipeline.ml.train import load_model
from pipeline.workflow.prefect_server import (
    PrefectServer,
    refresh_prefect_settings,
    using_server,
)

pytestmark = pytest.mark.integration
pytest.importorskip("moto.server")
s3fs = pytest.importorskip("s3fs")

DECAM = Path(__file__).resolve().parents[1] / "data" / "decam"
BUCKET = "astr-cluster"
SMALL = {"epochs": 3, "width": 4, "dense": 16}
STEPS = ("ingestion", "preprocessing", "differencing", "detection", "validation")
PREFECT_START_TIMEOUT = 180.0


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The services of the module: where they are and the settings that reach them."""

    postgres: pg.PostgresCluster
    prefect: PrefectServer
    s3_endpoint: str
    prefix: str

    def database(self, name: str) -> str:
        """Sync (psycopg) SQLAlchemy URL of one of the cluster's databases."""
        return self.postgres.url(name, driver="postgresql+psycopg")

    @property
    def storage_url(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"

    def settings(self) -> dict[str, str]:
        """The ``ASTR_*`` variables a user sets to run on this cluster."""
        return {
            "ASTR_PREFECT_SERVER_URL": self.prefect.api_url,
            "ASTR_PREFECT_DATABASE_URL": self.postgres.url("prefect"),
            "ASTR_DATABASE_URL": self.database("catalogue"),
            "ASTR_MLFLOW_TRACKING_URI": self.database("mlflow"),
            "ASTR_OPTUNA_STORAGE_URL": self.database("optuna"),
            "ASTR_STORAGE_ROOT": self.storage_url,
            "ASTR_STORAGE_OPTIONS": json.dumps({"endpoint_url": self.s3_endpoint}),
        }

    def s3(self) -> Any:
        """A fresh S3 filesystem on the moto server (no cached listings)."""
        return s3fs.S3FileSystem(endpoint_url=self.s3_endpoint, skip_instance_cache=True)

    def query(self, database: str, sql: str, **params: Any) -> list[tuple]:
        """Rows of ``sql`` run straight on one of the cluster's databases."""
        engine = create_engine(self.database(database))
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(sql), params)]
        finally:
            engine.dispose()


@pytest.fixture(scope="module")
def cluster(s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """PostgreSQL with four databases, a Prefect server on one of them, an S3 bucket."""
    root = tmp_path_factory.mktemp("cluster")
    with pg.running_cluster() as postgres, pytest.MonkeyPatch.context() as patch:
        for name, value in (
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_DEFAULT_REGION", "us-east-1"),
            ("PREFECT_HOME", str(root / "client")),
            ("PREFECT_SERVER_ANALYTICS_ENABLED", "false"),
        ):
            patch.setenv(name, value)
        patch.delenv("PREFECT_API_AUTH_STRING", raising=False)
        patch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
        for name in ("catalogue", "mlflow", "optuna"):
            postgres.create_database(name)
        fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
        if not fs.exists(BUCKET):
            fs.mkdir(BUCKET)
        config = dataclasses.replace(load_config(environ={}), home=root / "home")
        server = PrefectServer(config, start_timeout=PREFECT_START_TIMEOUT)
        server.configure_database(postgres.create_database("prefect"))
        server.start_server("127.0.0.1", 0)
        try:
            with using_server(server.api_url):
                yield Cluster(postgres, server, s3_endpoint, f"night-{uuid.uuid4().hex[:8]}")
                _drain_prefect_workers()
        finally:
            server.stop_server()
            forget_served_models()
            _close_pooled_connections(postgres.url("mlflow", driver="postgresql+psycopg"))
    refresh_prefect_settings()


@pytest.fixture
def on_cluster(cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> Cluster:
    """This test's settings point every database and the artifacts at the cluster."""
    for name, value in cluster.settings().items():
        monkeypatch.setenv(name, value)
    get_config.cache_clear()
    return cluster


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_observation_pipeline_stores_rows_in_postgres_and_products_in_s3(
    on_cluster: Cluster, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    state = observation_pipeline_flow(
        {
            "science_path": str(DECAM / "DEC-OBS04a.mini.fits"),
            "reference_path": str(DECAM / "Stack-DEC-OBS18.fits"),
            "output_dir": str(out),
        },
        return_state=True,
    )
    assert state.is_completed(), state.message
    summary = state.result()
    oid = uuid.UUID(summary["observation_id"])
    run_id = str(state.state_details.flow_run_id)

    config = get_config()
    assert config.database_url.startswith("postgresql+psycopg://")
    catalogue = get_catalogue(config)
    observation = catalogue.get_observation(oid)
    assert observation.status == "validated"
    assert {step: s["status"] for step, s in observation.steps.items()} == dict.fromkeys(
        STEPS, "completed"
    )
    products = catalogue.products(oid)
    kinds = [p.kind for p in products]
    assert kinds.count("report") == 5 and kinds.count("notebook") == 5
    for kind in ("raw_science", "raw_reference", "difference", "detections", "candidates"):
        assert kinds.count(kind) == 1, kind

    # The rows are in PostgreSQL's catalogue database, read there without our code.
    rows = on_cluster.query(
        "catalogue",
        "SELECT uri, sha256, size_bytes FROM products WHERE observation_id = :oid",
        oid=oid,
    )
    assert sorted(rows) == sorted((p.uri, p.sha256, p.size_bytes) for p in products)
    (candidate_count,) = on_cluster.query(
        "catalogue", "SELECT count(*) FROM candidates WHERE observation_id = :oid", oid=oid
    )[0]
    assert candidate_count == len(catalogue.candidates(oid)) > 0
    assert on_cluster.query(
        "catalogue", "SELECT status, progress FROM flow_runs WHERE id = :id", id=uuid.UUID(run_id)
    ) == [("COMPLETED", 1.0)]

    # Every product is an S3 object whose bytes match the recorded sha256 and size.
    fs = on_cluster.s3()
    base = f"{BUCKET}/{on_cluster.prefix}/observations/{oid}"
    for product in products:
        assert product.uri.startswith(f"s3://{base}/"), product.uri
        blob = fs.cat_file(product.uri.removeprefix("s3://"))
        assert (_sha256(blob), len(blob)) == (product.sha256, product.size_bytes), product.uri
        if product.kind == "report":
            assert b"<html" in blob[:300].lower()
    # ... and nothing else is there: no half-written or temporary object.
    assert sorted(fs.find(base)) == sorted(p.uri.removeprefix("s3://") for p in products)

    # The local copies the flow hands back are the stored objects.
    for step in STEPS:
        local = (out / "reports" / f"{step}.html").read_bytes()
        stored = [p for p in products if p.kind == "report" and p.step == step]
        assert _sha256(local) in {p.sha256 for p in stored}, step
    candidates = catalogue.latest_product(oid, "candidates")
    assert _sha256((out / "candidates.ecsv").read_bytes()) == candidates.sha256

    # The Prefect server keeps the run in its PostgreSQL database.
    assert on_cluster.query(
        "prefect", "SELECT state_type FROM flow_run WHERE id = :id", id=uuid.UUID(run_id)
    ) == [("COMPLETED",)]
    (children,) = on_cluster.query(
        "prefect",
        "SELECT count(*) FROM flow_run WHERE parent_task_run_id IN "
        "(SELECT id FROM task_run WHERE flow_run_id = :id) AND state_type = 'COMPLETED'",
        id=uuid.UUID(run_id),
    )[0]
    assert children == len(STEPS)


def test_training_run_in_postgres_with_its_model_in_s3(
    on_cluster: Cluster, candidate_night: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = candidate_night(4)
    dataset_id = store_dataset(data)
    trained = model_training_flow(dataset_id, SMALL)
    assert trained["model_id"] == "1"

    config = get_config()
    registry = model_registry(config)
    record = registry.version_record(1)
    artifacts = f"{on_cluster.storage_url}/mlflow/"
    assert record.source.startswith(artifacts) and record.source.endswith("/model")
    assert registry.client.get_run(trained["run_id"]).info.artifact_uri.startswith(artifacts)

    # MLflow's own tables in PostgreSQL hold the run and the registered version.
    assert on_cluster.query(
        "mlflow", "SELECT status FROM runs WHERE run_uuid = :id", id=trained["run_id"]
    ) == [("FINISHED",)]
    assert on_cluster.query(
        "mlflow", "SELECT version, source, run_id FROM model_versions WHERE name = 'realbogus'"
    ) == [(1, record.source, trained["run_id"])]

    # The model file and the training report are S3 objects.
    fs = on_cluster.s3()
    where = record.source.removeprefix("s3://")
    blob = fs.cat_file(f"{where}/model.pt")
    report = f"{where.rsplit('/', 1)[0]}/reports/training.html"
    assert b"<html" in fs.cat_file(report)[:300].lower()
    copy = tmp_path / "model.pt"
    copy.write_bytes(blob)
    test = data.subset("test")
    loaded = registry.load(1)
    assert loaded.dataset_id == dataset_id
    assert (
        loaded.predict_proba(test.triplets) == load_model(copy).predict_proba(test.triplets)
    ).all()

    # Deployed, the model reaches the validation step from S3 with only the settings:
    # no MLFLOW_S3_ENDPOINT_URL given by hand, no cached copy.
    assert model_deployment_flow("1", "production")["deployed"]
    monkeypatch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
    forget_served_models()
    served = production_model(get_config())
    assert served is not None and served["version"] == 1
    assert _sha256(Path(served["path"]).read_bytes()) == _sha256(blob)


def test_services_reconnect_after_postgres_restarts(on_cluster: Cluster) -> None:
    import optuna
    from prefect import flow
    from prefect.client.orchestration import get_client

    from pipeline.ml.search import open_storage  # how a search opens its study's storage

    @flow(name="astr-cluster-ping")
    def ping(value: int) -> int:
        return value + 1

    config = get_config()
    catalogue = get_catalogue(config)
    registry = model_registry(config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = f"restart-{uuid.uuid4().hex[:8]}"
    storage = open_storage(config.optuna_storage_url, name, parallel=True)
    study = optuna.create_study(study_name=name, storage=storage)

    def use_every_service(value: int) -> None:
        observation = catalogue.add_observation(raw_checksums={}, mjd=60000.0 + value)
        assert catalogue.get_observation(observation.id).mjd == 60000.0 + value
        name = f"restart-{uuid.uuid4().hex[:8]}"
        registry.client.get_experiment(registry.client.create_experiment(name))
        study.optimize(lambda trial: trial.suggest_float("x", 0.0, 1.0), n_trials=1)
        state = ping(value, return_state=True)
        assert state.is_completed() and state.result() == value + 1
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(state.state_details.flow_run_id)
        assert run.state is not None and run.state.is_completed()

    use_every_service(1)  # every pool now holds connections that a restart cuts
    postgres = on_cluster.postgres
    postgres.stop_server()
    try:
        with pytest.raises(CatalogueError) as down:
            catalogue.counts()
        message = str(down.value)
        assert f"127.0.0.1:{postgres.port}/catalogue" in message
        assert postgres.password not in message and "***" in message
        assert "check that the database server is running" in message
    finally:
        postgres.start_server()

    use_every_service(2)  # the same objects, the same server process: all reconnected
    assert len(study.trials) == 2
    storage.engine.dispose()
    again = open_storage(config.optuna_storage_url, name, parallel=True)
    stored = optuna.load_study(study_name=name, storage=again)
    assert [t.state for t in stored.trials] == [optuna.trial.TrialState.COMPLETE] * 2
    again.engine.dispose()


def test_missing_postgres_fails_instead_of_skipping_when_required(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # .ci/run sets REQUIRE_POSTGRES=1: a CI machine without PostgreSQL must not pass
    # by skipping every test above.
    monkeypatch.setattr(pg, "find_bindir", lambda: None)
    monkeypatch.setenv(pg.REQUIRE_VARIABLE, "1")
    with pytest.raises(pytest.fail.Exception, match="REQUIRE_POSTGRES is set"):
        pg.skip_unless_postgres()
    monkeypatch.setenv(pg.REQUIRE_VARIABLE, "0")
    with pytest.raises(pytest.skip.Exception, match="binaries not found"):
        pg.skip_unless_postgres()


def _close_pooled_connections(mlflow_url: str) -> None:
    """Close the pools the tests leave open: the process's catalogue and MLflow's engines.

    psycopg warns about a connection that is garbage-collected while open, and the
    test session turns the warning into an error. MLflow keeps one engine per database
    URL for the life of the process in its stores' ``_engine_map`` (no public way to
    close it).
    """
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as Registry
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as Tracking

    close_catalogues()
    for store in (Tracking, Registry):
        engine = store._engine_map.pop(mlflow_url, None)
        if engine is not None:
            engine.dispose()


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect's background workers still hold to the server."""
    import sys

    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30)
