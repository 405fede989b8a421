"""Start, watch, cancel and retry observation flows over HTTP (real API, worker, Prefect)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest
from apistack import ApiStack, wait_for
from procs import alive, kernels_under

from pipeline.config import load_config
from pipeline.store import Catalogue

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "decam"
SCIENCE = DATA / "DEC-OBS04a.mini.fits"
REFERENCE = DATA / "Stack-DEC-OBS18.fits"


def _observation(science: Path = SCIENCE, **extra) -> dict:
    return {
        "observation_data": {
            "science_path": str(science),
            "reference_path": str(REFERENCE),
            **extra,
        }
    }


def _catalogue(stack: ApiStack) -> Catalogue:
    config = load_config(environ={"ASTR_HOME": str(stack.home)})
    return Catalogue.from_config(config)


def test_start_watch_logs_metrics_and_list(api_stack: ApiStack):
    with api_stack.client() as client:
        started = client.post("/workflows/flows/observation_pipeline/start", json=_observation())
        assert started.status_code == 202, started.text + api_stack.tail()
        status = started.json()
        assert status["status"] == "PENDING" and status["flow_type"] == "observation_pipeline"
        flow_id = status["flow_id"]

        seen = wait_for(api_stack, flow_id, {"COMPLETED", "FAILED", "CANCELLED"})
        final = seen[-1]
        assert final["status"] == "COMPLETED", final
        states = [s["status"] for s in seen]
        assert "RUNNING" in states, states
        running = [s["progress"] for s in seen if s["status"] == "RUNNING"]
        assert running == sorted(running), "progress went backwards"
        assert len(set(running)) >= 3, f"progress did not rise step by step: {running}"
        assert final["progress"] == 1.0 and final["end_time"] is not None

        logs = client.get(f"/workflows/flows/{flow_id}/logs", params={"limit": 200}).json()
        messages = "\n".join(line["message"] for line in logs["items"])
        # notebook cell output of the ingestion and detection notebooks
        assert "the science image covers" in messages, messages[-3000:]
        assert "px grid" in messages
        assert len({line["flow_run_id"] for line in logs["items"]}) >= 2, "no step-run logs"
        times = [line["timestamp"] for line in logs["items"]]
        assert times == sorted(times)
        page = client.get(f"/workflows/flows/{flow_id}/logs", params={"limit": 5, "offset": 5})
        assert page.json()["items"] == logs["items"][5:10]
        errors = client.get(f"/workflows/flows/{flow_id}/logs", params={"level": "ERROR"}).json()
        assert all(line["level"] in ("ERROR", "CRITICAL") for line in errors["items"])

        metrics = client.get(f"/workflows/flows/{flow_id}/metrics").json()
        steps = metrics["steps"]
        assert set(steps) == {
            "ingestion",
            "preprocessing",
            "differencing",
            "detection",
            "validation",
        }
        step_time = sum(step["duration_s"] for step in steps.values())
        assert 0 < step_time <= metrics["duration_s"] + 0.5, metrics
        assert metrics["queue_wait_s"] >= 0 and metrics["run_count"] == 1
        assert metrics["status"] == "COMPLETED"
        # measured in the worker's process for this run (its kernels' CPU included)
        assert metrics["resources"]["cpu_time_s"] > 0.5, metrics
        assert metrics["resources"]["peak_rss_mb"] > 50, metrics

        listed = client.get("/workflows/flows", params={"flow_type": "observation_pipeline"})
        ids = [item["flow_id"] for item in listed.json()["items"]]
        assert flow_id in ids
        with_steps = client.get("/workflows/flows", params={"include_subflows": True}).json()
        assert with_steps["total"] >= listed.json()["total"] + 5
        done = client.get("/workflows/flows", params={"status": "COMPLETED"}).json()
        assert all(item["status"] == "COMPLETED" for item in done["items"])

        again = client.post(f"/workflows/flows/{flow_id}/retry")
        assert again.status_code == 409, again.text
        assert client.post(f"/workflows/flows/{flow_id}/cancel").status_code == 409


def test_a_failed_run_retried_completes(api_stack: ApiStack, tmp_path: Path):
    science = tmp_path / "late" / "science.fits"
    with api_stack.client() as client:
        started = client.post(
            "/workflows/flows/observation_ingestion/start", json=_observation(science)
        )
        assert started.status_code == 202, started.text + api_stack.tail()
        flow_id = started.json()["flow_id"]
        failed = wait_for(api_stack, flow_id, {"COMPLETED", "FAILED"})[-1]
        assert failed["status"] == "FAILED"
        assert "science.fits" in failed["error_message"], failed
        with _catalogue(api_stack) as catalogue:
            assert catalogue.get_flow_run(flow_id).status == "FAILED"

        science.parent.mkdir()
        shutil.copy(SCIENCE, science)  # the missing file arrives
        retried = client.post(f"/workflows/flows/{flow_id}/retry")
        assert retried.status_code == 202, retried.text
        assert retried.json()["flow_id"] == flow_id
        assert retried.json()["status"] in ("PENDING", "RUNNING")
        done = wait_for(api_stack, flow_id, {"COMPLETED", "FAILED"})[-1]
        assert done["status"] == "COMPLETED", done
        assert done["error_message"] is None
        metrics = client.get(f"/workflows/flows/{flow_id}/metrics").json()
        assert metrics["run_count"] == 2 and metrics["retries"] >= 1


def test_cancel_mid_notebook_kills_the_kernel(api_stack: ApiStack):
    with api_stack.client() as client:
        flow_id = client.post(
            "/workflows/flows/observation_pipeline/start", json=_observation(force=True)
        ).json()["flow_id"]
        deadline = time.monotonic() + 240
        while True:
            status = client.get(f"/workflows/flows/{flow_id}/status").json()
            kernels = kernels_under(api_stack.worker_pid)
            step = status["current_step"] or ""
            if kernels and step.startswith(("preprocessing: cell", "differencing: cell")):
                break
            assert status["status"] in ("PENDING", "RUNNING"), status
            assert time.monotonic() < deadline, api_stack.tail()
            time.sleep(0.05)
        answer = client.post(f"/workflows/flows/{flow_id}/cancel")
        assert answer.status_code == 202, answer.text
        cancelled_at = time.monotonic()
        while any(alive(pid) for pid in kernels) and time.monotonic() - cancelled_at < 5:
            time.sleep(0.05)
        assert not any(alive(pid) for pid in kernels), "a kernel outlived the cancel by 5 s"
        final = wait_for(api_stack, flow_id, {"CANCELLED", "COMPLETED", "FAILED"}, 60)[-1]
        assert final["status"] == "CANCELLED", final
        assert client.post(f"/workflows/flows/{flow_id}/cancel").status_code == 409
