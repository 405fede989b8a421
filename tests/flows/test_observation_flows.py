"""The observation flows end to end against a real Prefect server."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.table import Table

from pipeline.config import get_config
from pipeline.errors import UpstreamProductError
from pipeline.flows.observations import (
    observation_detection_flow,
    observation_differencing_flow,
    observation_ingestion_flow,
    observation_pipeline_flow,
    observation_preprocessing_flow,
    observation_validation_flow,
)
from pipeline.runner.kernels import busy_kernel_pids
from pipeline.store import Catalogue
from pipeline.types import FlowState, FlowType

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "decam"
SCIENCE = DATA / "DEC-OBS04a.mini.fits"
REFERENCE = DATA / "Stack-DEC-OBS18.fits"


def _pair(**extra) -> dict:
    return {"science_path": str(SCIENCE), "reference_path": str(REFERENCE), **extra}


def _client():
    from prefect.client.orchestration import get_client

    return get_client(sync_client=True)


def _subflow_runs(parent_id: str):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    with _client() as client:
        return client.read_flow_runs(
            flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[uuid.UUID(parent_id)])
            )
        )


def _run_id(state) -> str:
    return str(state.state_details.flow_run_id)


def test_pipeline_end_to_end_cache_and_force(prefect_server_url, tmp_path):
    out = tmp_path / "out"
    state = observation_pipeline_flow(_pair(output_dir=str(out)), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    oid = uuid.UUID(summary["observation_id"])
    assert summary["metrics"]["steps_cached"] == 0

    with Catalogue.from_config(get_config()) as catalogue:
        observation = catalogue.get_observation(oid)
        assert observation.status == "validated"
        assert {s: v["status"] for s, v in observation.steps.items()} == {
            s: "completed"
            for s in ("ingestion", "preprocessing", "differencing", "detection", "validation")
        }
        kinds = [p.kind for p in catalogue.products(oid)]
        for kind in (
            "raw_science",
            "raw_reference",
            "science",
            "reference",
            "preprocessed",
            "difference",
            "detections",
            "cutouts",
            "candidates",
        ):
            assert kinds.count(kind) == 1, kind
        assert kinds.count("report") == 5 and kinds.count("notebook") == 5
        stored = catalogue.candidates(oid)
        record = catalogue.get_flow_run(_run_id(state))
        assert record.status == "COMPLETED" and record.progress == 1.0
    exported = Table.read(out / "candidates.ecsv", format="ascii.ecsv")
    assert len(stored) == len(exported) > 0
    assert sorted(c.number for c in stored) == list(range(len(exported)))
    for step in ("ingestion", "preprocessing", "differencing", "detection", "validation"):
        assert "<html" in (out / "reports" / f"{step}.html").read_text()[:200].lower()

    children = _subflow_runs(_run_id(state))
    assert len(children) == 5 and all(c.state.is_completed() for c in children)

    # the notebooks' cell output is in the step runs' logs, one record per message
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with _client() as client:
        logs = client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[c.id for c in children]))
        )
    cells = [log.message for log in logs if log.message.startswith("[01_ingestion.ipynb cell ")]
    assert cells and any("\n" in message for message in cells)  # multi-line prints kept whole

    with _client() as client:
        from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

        keys = {
            a.key
            for a in client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(
                        any_=["report-validation", "candidates", "progress-pipeline"]
                    )
                )
            )
        }
    assert keys == {"report-validation", "candidates", "progress-pipeline"}

    # the same pair again: same observation, every step from the cache
    again = observation_pipeline_flow(_pair(), return_state=True).result()
    assert again["observation_id"] == str(oid)
    assert again["metrics"]["steps_cached"] == 5
    # force reruns every step
    forced = observation_pipeline_flow(_pair(force=True), return_state=True).result()
    assert forced["observation_id"] == str(oid) and forced["metrics"]["steps_cached"] == 0
    with Catalogue.from_config(get_config()) as catalogue:
        assert [p.kind for p in catalogue.products(oid)].count("candidates") == 2


def test_step_flows_refuse_without_upstream_and_cache_reruns(prefect_server_url):
    ingested = observation_ingestion_flow(_pair(mjd=60000.5))
    oid = uuid.UUID(ingested["observation_id"])
    assert not ingested["cached"]
    state = observation_differencing_flow(oid, return_state=True)
    assert state.is_failed()
    with pytest.raises(UpstreamProductError, match="no 'preprocessed' product") as info:
        state.result()
    assert "observation_preprocessing_flow" in str(info.value)
    assert not observation_preprocessing_flow(oid)["cached"]
    assert observation_preprocessing_flow(oid)["cached"]
    assert not observation_differencing_flow(oid)["cached"]
    assert not observation_detection_flow(oid)["cached"]
    result = observation_validation_flow(oid)
    assert result["products"]["candidates"].endswith("candidates.ecsv")
    missing = observation_preprocessing_flow(uuid.uuid4(), return_state=True)
    assert missing.is_failed() and "no observation" in missing.message.lower()


def _wcs_less(path: Path) -> Path:
    data = fits.getdata(SCIENCE).astype("f4")
    fits.PrimaryHDU(data, header=fits.Header({"GAIN": 4.0})).writeto(path)
    return path


def test_bad_input_fails_at_ingestion_and_registers_nothing(prefect_server_url, tmp_path):
    corrupt = tmp_path / "corrupt.fits"
    corrupt.write_bytes(b"SIMPLE  =  definitely not a FITS file" + bytes(3000))
    for bad, expected in ((_wcs_less(tmp_path / "nowcs.fits"), "WCS"), (corrupt, "FITS")):
        state = observation_ingestion_flow(
            {"science_path": str(bad), "reference_path": str(REFERENCE)}, return_state=True
        )
        assert state.is_failed()
        assert expected in state.message, state.message
    state = observation_ingestion_flow(
        {"science_path": str(tmp_path / "absent.fits"), "reference_path": str(REFERENCE)},
        return_state=True,
    )
    assert state.is_failed() and "does not exist" in state.message
    state = observation_ingestion_flow({"science": "x"}, return_state=True)
    assert state.is_failed() and "unknown key" in state.message
    with Catalogue.from_config(get_config()) as catalogue:
        assert catalogue.counts()["observations"] == 0
        assert catalogue.counts()["products"] == 0


def test_killed_kernel_is_retried_and_both_attempts_kept(prefect_server_url):
    oid = uuid.UUID(observation_ingestion_flow(_pair(mjd=60001.5))["observation_id"])
    observation_preprocessing_flow(oid)
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            pids = busy_kernel_pids()
            if pids:
                time.sleep(0.3)  # let the notebook get going
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            time.sleep(0.05)

    thread = threading.Thread(target=killer)
    thread.start()
    result = observation_differencing_flow(oid)
    thread.join()
    assert killed
    assert result["attempts"] == 2
    statuses = [r["status"] for r in result["attempt_reports"]]
    assert statuses == ["kernel_died", "completed"]
    with Catalogue.from_config(get_config()) as catalogue:
        reports = catalogue.products(oid, kind="report", step="differencing")
        assert sorted(r.meta["status"] for r in reports) == ["completed", "kernel_died"]


def test_step_past_its_timeout_fails_saying_so(prefect_server_url, monkeypatch):
    oid = uuid.UUID(observation_ingestion_flow(_pair(mjd=60002.5))["observation_id"])
    observation_preprocessing_flow(oid)
    monkeypatch.setenv("ASTR_FLOW_TIMEOUT", "1")
    monkeypatch.setenv("ASTR_RETRY_ATTEMPTS", "0")
    get_config.cache_clear()
    state = observation_differencing_flow(oid, return_state=True)
    assert state.is_failed()
    assert "time limit" in state.message
    with Catalogue.from_config(get_config()) as catalogue:
        observation = catalogue.get_observation(oid)
        assert observation.status == "failed"
        assert observation.steps["differencing"]["status"] == "failed"
        runs = catalogue.list_flow_runs(flow_type=FlowType.OBSERVATION_DIFFERENCING)
        assert runs[0].status == FlowState.FAILED.value


def test_twelve_observations_never_more_than_two_running(prefect_server_url, monkeypatch):
    from pipeline.flows.submit import run_observations
    from pipeline.workflow.concurrency import OBSERVATION_LIMIT

    monkeypatch.setenv("ASTR_MAX_CONCURRENT_FLOWS", "2")
    get_config.cache_clear()
    # the session's server is shared: start from a fresh limit
    with _client() as client, contextlib.suppress(Exception):
        client.delete_global_concurrency_limit_by_name(OBSERVATION_LIMIT)
    items = [(f"obs-{i:02d}", _pair(mjd=61000.0 + i)) for i in range(12)]
    outcomes = run_observations(items)
    assert [o.state for o in outcomes] == ["COMPLETED"] * 12, [o.error for o in outcomes]
    with _client() as client:
        runs = [client.read_flow_run(uuid.UUID(o.flow_run_id)) for o in outcomes]
    assert all(r.state.is_completed() for r in runs)
    events = sorted(
        [(r.start_time, 1) for r in runs] + [(r.end_time, -1) for r in runs],
        key=lambda e: (e[0], e[1]),
    )
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak == 2  # the limit was used and never exceeded
    assert len({o.result["observation_id"] for o in outcomes}) == 12
    assert np.all([o.result["metrics"]["steps_cached"] == 0 for o in outcomes])


def test_flow_status_maps_prefect_runs(prefect_server_url, tmp_path):
    from pipeline.workflow.status import get_flow_status, map_state

    state = observation_ingestion_flow(_pair(mjd=60003.5), return_state=True)
    failed = observation_ingestion_flow({"science_path": "/nope.fits"}, return_state=True)
    with Catalogue.from_config(get_config()) as catalogue:
        done = get_flow_status(_run_id(state), catalogue)
        bad = get_flow_status(_run_id(failed), catalogue)
        with pytest.raises(Exception, match="no flow run"):
            get_flow_status(uuid.uuid4(), catalogue)
    assert done.status is FlowState.COMPLETED and done.progress == 1.0
    assert done.flow_type is FlowType.OBSERVATION_INGESTION
    assert done.start_time is not None and done.end_time >= done.start_time
    assert done.metrics["attempts"] == 1 and "durations" in done.metrics
    assert bad.status is FlowState.FAILED and "reference_path" in bad.error_message
    assert map_state("CRASHED") is FlowState.FAILED
    assert map_state("CANCELLING") is FlowState.RUNNING
    assert map_state("SCHEDULED") is FlowState.PENDING


def test_astr_observe_writes_catalogue_and_reports(prefect_server_url, tmp_path):
    from typer.testing import CliRunner

    from pipeline.cli import app

    out = tmp_path / "night"
    result = CliRunner().invoke(
        app,
        [
            "observe",
            "--science",
            str(SCIENCE),
            "--reference",
            str(REFERENCE),
            "--output",
            str(out),
            "--band",
            "i",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "observation" in result.output and "/runs/flow-run/" in result.output
    assert (out / "candidates.ecsv").exists()
    assert sorted(p.name for p in (out / "reports").iterdir()) == [
        "detection.html",
        "differencing.html",
        "ingestion.html",
        "preprocessing.html",
        "validation.html",
    ]
    manifest = tmp_path / "night.csv"
    manifest.write_text(
        "name,science_path,reference_path,mjd\n"
        f"a,{SCIENCE},{REFERENCE},60010.5\n"
        f"b,{SCIENCE},nope.fits,60011.5\n"
    )
    result = CliRunner().invoke(app, ["observe", "--manifest", str(manifest), "--output", str(out)])
    assert result.exit_code == 1, result.output
    assert (out / "a" / "candidates.ecsv").exists()
    text = " ".join(result.output.split())  # the console wraps long lines
    assert "b: FAILED" in text and "does not exist" in text
