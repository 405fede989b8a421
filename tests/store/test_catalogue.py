"""Catalogue CRUD on SQLite and on PostgreSQL (a throwaway cluster, ``tests/pg.py``)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pg  # tests/pg.py (tests/ is on the path through its conftest.py)
import pytest

from pipeline.errors import CatalogueError, NotFoundError
from pipeline.store import Catalogue
from pipeline.types import FlowState, FlowType, ObservationStatus

SHA_A = "a" * 64
SHA_B = "b" * 64


@pytest.fixture(scope="module")
def postgres() -> Iterator[pg.PostgresCluster]:
    with pg.running_cluster() as cluster:
        yield cluster


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)],
)
def catalogue(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Catalogue]:
    """A migrated, empty catalogue on each backend (a new PostgreSQL database per test)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'catalogue.db'}"
    else:
        cluster: pg.PostgresCluster = request.getfixturevalue("postgres")
        name = f"cat_{uuid.uuid4().hex[:12]}"
        cluster.create_database(name)
        url = cluster.url(name, driver="postgresql+psycopg")
    with Catalogue(url) as cat:
        yield cat


def test_add_and_get_observation(catalogue: Catalogue) -> None:
    added = catalogue.add_observation(
        raw_checksums={"science": SHA_A, "reference": SHA_B},
        metadata={"instrument": "DECam", "gain": 4.0},
        band="i",
        mjd=60000.25,
    )
    got = catalogue.get_observation(str(added.id))
    assert got.id == added.id
    assert got.status == ObservationStatus.REGISTERED
    assert got.raw_checksums == {"science": SHA_A, "reference": SHA_B}
    assert got.meta == {"instrument": "DECam", "gain": 4.0}
    assert (got.band, got.mjd) == ("i", 60000.25)
    assert got.created_at.tzinfo is not None
    assert abs(got.created_at - datetime.now(UTC)) < timedelta(minutes=1)


def test_duplicate_observation_id_is_refused(catalogue: Catalogue) -> None:
    oid = uuid.uuid4()
    catalogue.add_observation(raw_checksums={}, observation_id=oid)
    with pytest.raises(CatalogueError, match=f"observation {oid} already exists"):
        catalogue.add_observation(raw_checksums={}, observation_id=oid)
    assert catalogue.counts()["observations"] == 1


def test_bad_checksum_is_refused(catalogue: Catalogue) -> None:
    with pytest.raises(CatalogueError, match=r"raw_checksums\['science'\] must be 64"):
        catalogue.add_observation(raw_checksums={"science": "ABC"})


def test_unknown_and_malformed_ids(catalogue: Catalogue) -> None:
    missing = uuid.uuid4()
    with pytest.raises(NotFoundError, match=f"no observation {missing}"):
        catalogue.get_observation(missing)
    with pytest.raises(NotFoundError, match="'nope' is not a valid id"):
        catalogue.get_observation("nope")


def test_status_update_and_listing(catalogue: Catalogue) -> None:
    first = catalogue.add_observation(raw_checksums={})
    second = catalogue.add_observation(raw_checksums={})
    catalogue.set_observation_status(first.id, ObservationStatus.FAILED, error_message="no WCS")
    failed = catalogue.list_observations(status=ObservationStatus.FAILED)
    assert [o.id for o in failed] == [first.id]
    assert failed[0].error_message == "no WCS"
    assert failed[0].updated_at >= failed[0].created_at
    assert [o.id for o in catalogue.list_observations()] == [second.id, first.id]
    assert len(catalogue.list_observations(limit=1, offset=1)) == 1
    assert catalogue.counts()["observations_by_status"] == {"failed": 1, "registered": 1}


def test_products(catalogue: Catalogue) -> None:
    obs = catalogue.add_observation(raw_checksums={})
    for n in range(3):
        catalogue.add_product(
            obs.id,
            kind="difference",
            uri=f"file:///x/d{n}.fits",
            sha256=SHA_A,
            size_bytes=10 + n,
            step="differencing",
            run_id=f"run-{n}",
        )
    catalogue.add_product(
        obs.id,
        kind="psf",
        uri="file:///x/psf.fits",
        sha256=SHA_B,
        size_bytes=5,
        step="preprocessing",
    )
    assert [p.run_id for p in catalogue.products(obs.id, kind="difference")] == [
        "run-0",
        "run-1",
        "run-2",
    ]
    assert catalogue.latest_product(obs.id, "difference").uri == "file:///x/d2.fits"
    assert len(catalogue.products(obs.id, step="preprocessing")) == 1
    with pytest.raises(NotFoundError, match="has no 'candidates' product"):
        catalogue.latest_product(obs.id, "candidates")
    with pytest.raises(CatalogueError, match=r"already recorded at file:///x/psf\.fits"):
        catalogue.add_product(
            obs.id,
            kind="psf",
            uri="file:///x/psf.fits",
            sha256=SHA_B,
            size_bytes=5,
            step="preprocessing",
        )
    with pytest.raises(NotFoundError):
        catalogue.add_product(
            uuid.uuid4(),
            kind="psf",
            uri="file:///y",
            sha256=SHA_B,
            size_bytes=5,
            step="preprocessing",
        )
    catalogue.delete_product(catalogue.latest_product(obs.id, "psf").id)
    assert catalogue.products(obs.id, kind="psf") == []


def test_candidates_replace_earlier_run(catalogue: Catalogue) -> None:
    obs = catalogue.add_observation(raw_checksums={})
    rows = [
        {
            "x": 10.5,
            "y": 20.25,
            "ra": 150.1,
            "dec": 2.2,
            "flux": 1200.0,
            "flux_err": 40.0,
            "snr": 30.0,
            "flags": 0,
            "rb_score": float("nan"),
            "fwhm": 3.9,
            "catalog_sep_arcsec": float("nan"),  # no match: JSON has no NaN
            "shape": [1.0, float("inf")],
        },
        {"x": 100.0, "y": 5.0, "snr": -7.5, "flags": 4},
    ]
    assert catalogue.replace_candidates(obs.id, rows, run_id="r1") == 2
    stored = catalogue.candidates(obs.id)
    assert [(c.number, c.x, c.y) for c in stored] == [(0, 10.5, 20.25), (1, 100.0, 5.0)]
    assert stored[0].rb_score is None  # NaN stored as NULL
    assert stored[0].properties == {"fwhm": 3.9, "catalog_sep_arcsec": None, "shape": [1.0, None]}
    assert stored[1].flags == 4
    assert [c.number for c in catalogue.candidates(obs.id, min_snr=10)] == [0]
    assert catalogue.replace_candidates(obs.id, rows[:1], run_id="r2") == 1
    assert [c.run_id for c in catalogue.candidates(obs.id)] == ["r2"]


def test_bad_candidate_leaves_earlier_ones(catalogue: Catalogue) -> None:
    obs = catalogue.add_observation(raw_checksums={})
    catalogue.replace_candidates(obs.id, [{"x": 1.0, "y": 2.0}])
    with pytest.raises(CatalogueError, match="candidate 1 has no x/y"):
        catalogue.replace_candidates(obs.id, [{"x": 1.0, "y": 2.0}, {"snr": 5.0}])
    with pytest.raises(CatalogueError, match="non-finite position"):
        catalogue.replace_candidates(obs.id, [{"x": float("nan"), "y": 2.0}])
    assert len(catalogue.candidates(obs.id)) == 1


def test_deleting_an_observation_cascades(catalogue: Catalogue) -> None:
    obs = catalogue.add_observation(raw_checksums={})
    catalogue.add_product(obs.id, kind="k", uri="file:///k", sha256=SHA_A, size_bytes=1, step="s")
    catalogue.replace_candidates(obs.id, [{"x": 1.0, "y": 1.0}])
    run = catalogue.record_flow_run(
        uuid.uuid4(), FlowType.OBSERVATION_INGESTION, observation_id=obs.id
    )
    catalogue.delete_observation(obs.id)
    counts = catalogue.counts()
    assert (counts["observations"], counts["products"], counts["candidates"]) == (0, 0, 0)
    assert catalogue.get_flow_run(run.id).observation_id is None


def test_flow_runs(catalogue: Catalogue) -> None:
    run_id = uuid.uuid4()
    created = catalogue.record_flow_run(
        run_id, FlowType.OBSERVATION_PIPELINE, parameters={"observation_data": {"band": "i"}}
    )
    assert created.status == "PENDING" and created.progress == 0.0
    # recording again returns the existing run untouched
    assert catalogue.record_flow_run(run_id, FlowType.MODEL_TRAINING).flow_type == (
        "observation_pipeline"
    )
    start = datetime.now(UTC)
    catalogue.update_flow_run(
        run_id,
        status=FlowState.RUNNING,
        started_at=start,
        current_step="ingestion",
        metrics={"ingestion_s": 1.5},
    )
    catalogue.update_flow_run(run_id, progress=0.2, metrics={"queue_wait_s": 0.3})
    run = catalogue.get_flow_run(str(run_id))
    assert run.status == "RUNNING" and run.current_step == "ingestion"
    assert run.metrics == {"ingestion_s": 1.5, "queue_wait_s": 0.3}
    assert run.started_at == start
    with pytest.raises(CatalogueError, match="cannot update flow run field"):
        catalogue.update_flow_run(run_id, flow_type="model_training")
    with pytest.raises(CatalogueError, match="progress must be within"):
        catalogue.update_flow_run(run_id, progress=1.5)
    with pytest.raises(ValueError):
        catalogue.update_flow_run(run_id, status="DONE")
    with pytest.raises(NotFoundError):
        catalogue.update_flow_run(uuid.uuid4(), progress=0.5)


def test_flow_run_listing_filters(catalogue: Catalogue) -> None:
    ids = [uuid.uuid4() for _ in range(4)]
    catalogue.record_flow_run(ids[0], FlowType.MODEL_TRAINING, status=FlowState.COMPLETED)
    catalogue.record_flow_run(ids[1], FlowType.MODEL_TRAINING, status=FlowState.FAILED)
    catalogue.record_flow_run(ids[2], FlowType.OBSERVATION_DETECTION, status=FlowState.FAILED)
    catalogue.record_flow_run(ids[3], FlowType.OBSERVATION_DETECTION)
    assert {r.id for r in catalogue.list_flow_runs(flow_type=FlowType.MODEL_TRAINING)} == set(
        ids[:2]
    )
    assert {r.id for r in catalogue.list_flow_runs(status=FlowState.FAILED)} == set(ids[1:3])
    future = datetime.now(UTC) + timedelta(hours=1)
    assert catalogue.list_flow_runs(since=future) == []
    assert len(catalogue.list_flow_runs(until=future, limit=2)) == 2
    assert [r.id for r in catalogue.list_flow_runs()][:1] == [ids[3]]


def test_naive_datetime_is_refused(catalogue: Catalogue) -> None:
    run_id = uuid.uuid4()
    catalogue.record_flow_run(run_id, FlowType.MODEL_TRAINING)
    with pytest.raises(Exception, match="naive datetime"):
        catalogue.update_flow_run(run_id, started_at=datetime(2026, 1, 1))


def test_catalogue_reopens_with_data(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    with Catalogue(url) as first:
        oid = first.add_observation(raw_checksums={"science": SHA_A}).id
    with Catalogue(url) as second:
        assert second.get_observation(oid).raw_checksums == {"science": SHA_A}


def test_input_key_finds_the_observation_and_is_unique(catalogue: Catalogue) -> None:
    first = catalogue.add_observation(raw_checksums={}, input_key="k" * 64)
    assert catalogue.find_observation("k" * 64).id == first.id
    assert catalogue.find_observation("x" * 64) is None
    with pytest.raises(CatalogueError, match="input key"):
        catalogue.add_observation(raw_checksums={}, input_key="k" * 64)


def test_step_state_is_merged_per_step(catalogue: Catalogue) -> None:
    oid = catalogue.add_observation(raw_checksums={}).id
    catalogue.set_step_state(oid, "ingestion", {"status": "completed"}, status="ingested")
    catalogue.set_step_state(
        oid, "preprocessing", {"status": "failed"}, status="failed", error_message="boom"
    )
    got = catalogue.get_observation(oid)
    assert got.steps == {
        "ingestion": {"status": "completed"},
        "preprocessing": {"status": "failed"},
    }
    assert (got.status, got.error_message) == ("failed", "boom")
