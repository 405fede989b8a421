"""A night's batch: through real workers (via the REST API) and on a local Dask cluster."""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from apistack import ApiStack, running_stack, wait_for

from pipeline.config import get_config, load_config
from pipeline.demo import jittered_night, write_manifest
from pipeline.errors import ObservationDataError
from pipeline.flows.batch import observation_batch_flow, validate_manifest
from pipeline.store import Catalogue
from pipeline.workflow.concurrency import max_overlap, run_times

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "decam"
SCIENCE = DATA / "DEC-OBS04a.mini.fits"
REFERENCE = DATA / "Stack-DEC-OBS18.fits"
PAIRS = 3
LIMIT = 2  # max_concurrent_flows of the stack: below the pairs, so the limit is exercised


@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A manifest of three distinct 256x256 pairs (the DECam pair, each with its own noise)."""
    folder = tmp_path_factory.mktemp("night")
    pairs = jittered_night(SCIENCE, REFERENCE, folder, pairs=PAIRS, seed=7100)
    return write_manifest(pairs, folder / "night.csv")


@pytest.fixture(scope="module")
def stack(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """API and one worker whose observation_pipeline deployment is limited to two runs."""
    env = {"ASTR_MAX_CONCURRENT_FLOWS": str(LIMIT), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    with running_stack(
        prefect_server,
        tmp_path_factory.mktemp("batch-stack"),
        env=env,
        worker_args=("--limit", "4"),
    ) as running:
        yield running


@pytest.fixture(scope="module")
def deployed(stack: ApiStack, night: Path) -> dict:
    """The night run as an observation_batch started through the API; its final status."""
    with stack.client() as client:
        started = client.post(
            "/workflows/flows/observation_batch/start", json={"manifest": str(night)}
        )
        assert started.status_code == 202, started.text
    seen = wait_for(stack, started.json()["flow_id"], {"COMPLETED", "FAILED"}, seconds=300)
    return seen[-1]


def _catalogue(home: Path) -> Catalogue:
    return Catalogue.from_config(load_config(environ={"ASTR_HOME": str(home)}))


def _names(manifest: Path) -> list[str]:
    with open(manifest, newline="") as handle:
        return [row["name"] for row in csv.DictReader(handle)]


def test_batch_through_the_workers(deployed: dict, stack: ApiStack, night: Path):
    assert deployed["status"] == "COMPLETED", (deployed, stack.tail())
    summary = deployed["metrics"]["batch"]
    assert summary["total"] == PAIRS and summary["counts"] == {"COMPLETED": PAIRS}
    assert set(summary["pairs"]) == set(_names(night))
    run_ids = [pair["flow_run_id"] for pair in summary["pairs"].values()]
    assert len(set(run_ids)) == PAIRS

    with _catalogue(stack.home) as catalogue:
        observations = catalogue.list_observations(limit=100)
        assert len(observations) == PAIRS  # each pair once
        for name, pair in summary["pairs"].items():
            record = catalogue.get_flow_run(pair["flow_run_id"])
            assert record.flow_type == "observation_pipeline" and record.status == "COMPLETED"
            assert str(record.parent_id) == deployed["flow_id"], name
            assert str(record.observation_id) == pair["observation_id"]
            assert pair["candidates"] == len(catalogue.candidates(record.observation_id)) > 0
        batch = catalogue.get_flow_run(deployed["flow_id"])
        assert batch.flow_type == "observation_batch"

    # Prefect's own records: the pairs are subflows of the batch, and the deployment's
    # limit held (PENDING-to-end intervals, when a run held its slot, never overlap more).
    times = run_times(run_ids)
    assert all(t.state == "COMPLETED" for t in times)
    assert max_overlap((t.pending, t.ended) for t in times) <= LIMIT
    assert max_overlap((t.running, t.ended) for t in times) == LIMIT  # and was used


def test_bad_manifest_is_refused_naming_the_row(stack: ApiStack, night: Path, tmp_path: Path):
    rows = night.read_text().splitlines()
    name, science, reference = rows[2].split(",")
    rows[2] = f"{name},{science}.missing,{reference}"
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join(rows) + "\n")
    with pytest.raises(ObservationDataError, match=r"line 3, column science_path: .*missing"):
        validate_manifest(bad)
    typo = tmp_path / "typo.csv"
    typo.write_text(f"name,science_path,reference_path,mjd\na,{science},{reference},soon\n")
    with pytest.raises(ObservationDataError, match="line 2: mjd must be a number"):
        validate_manifest(typo)

    with stack.client() as client:
        answer = client.post(
            "/workflows/flows/observation_batch/start", json={"manifest": str(bad)}
        )
        assert answer.status_code == 422
        assert "line 3, column science_path" in answer.text
        answer = client.post(
            "/workflows/flows/observation_batch/start", json={"manifest": str(tmp_path / "no.csv")}
        )
        assert answer.status_code == 422 and "does not exist" in answer.text
        listed = client.get("/workflows/flows", params={"flow_type": "observation_batch"})
        assert listed.json()["total"] == 1  # only the good batch was ever started


def test_dask_batch_matches_the_deployments(
    deployed: dict, night: Path, prefect_server_url: str, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("ASTR_TASK_RUNNER", "dask:2")
    monkeypatch.setenv("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    get_config.cache_clear()
    state = observation_batch_flow(str(night), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    batch_id = str(state.state_details.flow_run_id)
    assert summary["counts"] == {"COMPLETED": PAIRS} and summary["mode"].startswith("dask")
    # two Dask worker processes, neither of them this one
    processes = {pair["process"] for pair in summary["pairs"].values()}
    assert len(processes) == 2 and not any(p.endswith(f":{os.getpid()}") for p in processes)

    through_workers = deployed["metrics"]["batch"]["pairs"]
    with Catalogue.from_config(get_config()) as catalogue:
        records = {}
        for name, pair in summary["pairs"].items():
            record = catalogue.get_flow_run(pair["flow_run_id"])
            assert record.flow_type == "observation_pipeline" and record.status == "COMPLETED"
            assert str(record.parent_id) == batch_id
            # the same products and candidates as the same pair through the workers
            assert pair["candidates"] == through_workers[name]["candidates"], name
            kinds = sorted(p.kind for p in catalogue.products(uuid.UUID(pair["observation_id"])))
            assert kinds.count("candidates") == 1 and kinds.count("report") == 5
            records[name] = record
        assert len(catalogue.list_observations(limit=100)) == PAIRS
        assert catalogue.get_flow_run(batch_id).flow_type == "observation_batch"
    # in parallel: two pipelines were running at the same time
    assert max_overlap((r.started_at, r.ended_at) for r in records.values()) == 2
