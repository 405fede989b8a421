"""Cancel a flow run through Prefect while its notebook runs in a worker process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from procs import alive, kernels_under, stop_group

from pipeline.config import get_config
from pipeline.errors import NotFoundError
from pipeline.store import Catalogue
from pipeline.types import FlowState
from pipeline.workflow.deployments import deployment_path
from pipeline.workflow.status import get_flow_status

pytestmark = pytest.mark.integration

DATA = Path(__file__).resolve().parents[1] / "data" / "decam"


def test_cancel_through_prefect_kills_the_kernel_and_marks_the_notebook(
    prefect_server_url, tmp_path
):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    with open(tmp_path / "worker.log", "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-c", "from pipeline.cli import main; main()", "worker"],
            env={**os.environ, "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "WARNING"},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        with get_client(sync_client=True) as client:
            deadline = time.monotonic() + 120
            while True:
                try:
                    client.read_deployment_by_name(deployment_path("observation_pipeline"))
                    break
                except Exception:
                    assert worker.poll() is None, (tmp_path / "worker.log").read_text()
                    assert time.monotonic() < deadline, "worker did not serve its deployments"
                    time.sleep(0.5)
        run = run_deployment(
            deployment_path("observation_pipeline"),
            parameters={
                "observation_data": {
                    "science_path": str(DATA / "DEC-OBS04a.mini.fits"),
                    "reference_path": str(DATA / "Stack-DEC-OBS18.fits"),
                }
            },
            timeout=0,
        )
        # wait until a notebook is computing (past ingestion), then cancel
        kernels: set[int] = set()
        deadline = time.monotonic() + 180
        with Catalogue.from_config(get_config()) as catalogue:
            while True:
                assert time.monotonic() < deadline, (tmp_path / "worker.log").read_text()
                try:
                    record = catalogue.get_flow_run(run.id)
                except NotFoundError:
                    record = None
                step = (record.current_step or "") if record else ""
                kernels = kernels_under(worker.pid)
                if kernels and step.startswith(("preprocessing: cell", "differencing: cell")):
                    break
                time.sleep(0.05)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(message="cancelled by the test"))
            cancelled_at = time.monotonic()
            while any(alive(pid) for pid in kernels) and time.monotonic() - cancelled_at < 5:
                time.sleep(0.05)
            print(
                "KERNELS GONE AFTER",
                time.monotonic() - cancelled_at,
                kernels,
                (tmp_path / "worker.log").read_text()[-3000:],
            )
            assert not any(alive(pid) for pid in kernels), "a kernel outlived the cancel by 5 s"
            assert not kernels_under(worker.pid)
            deadline = time.monotonic() + 60
            while not client.read_flow_run(run.id).state.is_cancelled():
                assert time.monotonic() < deadline, client.read_flow_run(run.id).state
                time.sleep(0.2)
        with Catalogue.from_config(get_config()) as catalogue:
            # the record follows Prefect even if the worker stopped the run mid-write
            assert get_flow_status(run.id, catalogue).status is FlowState.CANCELLED
            assert catalogue.get_flow_run(run.id).status == "CANCELLED"
        # a notebook the cancel interrupted is kept, marked cancelled (the cancel can
        # also land between two notebooks: then every attempt completed)
        for attempt in Path(get_config().home, "runs").glob("*/*/attempt-*"):
            names = [p.name for p in attempt.glob("*.ipynb")]
            if not any(n.count(".") == 1 for n in names):  # not completed
                cancelled = [attempt / n for n in names if n.endswith(".cancelled.ipynb")]
                assert cancelled, f"{attempt} holds {names}: no cancelled notebook"
                assert "CANCELLED" in cancelled[0].read_text()
    finally:
        stop_group(worker)
