"""How long a failed flow run takes to reach its alert webhook.

Runs the real ``observation_ingestion`` flow on a science file that does not exist,
so it fails, against a real local Prefect server (started here, in a temporary
project home) with alerting on and one webhook route to a local HTTP receiver. The
latency of a run is the receiver's clock at receipt minus the timestamp of the run's
Failed state in Prefect: the flow's ``on_failure`` hook, routing, the catalogue
transaction and the POST. With ``--worker`` the runs are started from their
deployment and run in ``astr worker``'s processes, as flows started over HTTP do.

Target: every alert within 5 s of the failure.

    python benchmarks/alerts.py [--runs 10] [--worker]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from local_server import start_local_prefect

TARGET_S = 5.0
DATA = Path(__file__).resolve().parents[1] / "tests" / "data" / "decam"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the latencies."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="failing runs to measure")
    parser.add_argument("--worker", action="store_true", help="run the flows in astr worker")
    args = parser.parse_args(argv)

    root, server = start_local_prefect(
        "astr-bench-alerts-", console_level="CRITICAL", ASTR_ALERTING_ENABLED="true"
    )

    from pipeline.workflow.monitoring import create_flow_alerts

    receiver, received = _receiver()
    worker = _start_worker(root) if args.worker else None
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/alerts"
        # no dedup or throttle: every failure is its own notification
        route = {"name": "bench", "channels": [{"type": "webhook", "url": url}]}
        create_flow_alerts("observation_*", {**route, "dedup_window_s": 0, "throttle_max": 10_000})
        where = "astr worker processes" if args.worker else "this process"
        print(f"cores: {os.cpu_count()}; Prefect {server.api_url}; flows run in {where}")
        latencies = []
        for number in range(args.runs + 1):
            run_id, failed_at = _failing_run(root, number, args.worker)
            payload, receipt = _wait_for(received, run_id, timeout=60)
            latency = receipt - failed_at.timestamp()
            sent = datetime.fromisoformat(payload["failed_at"]).timestamp()
            assert abs(sent - failed_at.timestamp()) < 1e-3, "the notice carries the failure time"
            label = "warm-up" if number == 0 else f"run {number}"
            print(f"  {label:8s} {run_id}  failure -> webhook {latency * 1000:7.1f} ms")
            if number > 0:
                latencies.append(latency)
        median, worst = statistics.median(latencies), max(latencies)
        print(
            f"latency over {len(latencies)} runs: median {median * 1000:.1f} ms, "
            f"max {worst * 1000:.1f} ms (target: within {TARGET_S:.0f} s)"
        )
        return 0 if worst <= TARGET_S else 1
    finally:
        if worker is not None:
            _stop(worker)
        receiver.shutdown()
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # the runs' logs, before the server goes
        server.stop_server()


def _failing_run(root: Path, number: int, in_worker: bool) -> tuple[str, datetime]:
    """Run observation_ingestion on a missing file; (flow run id, Failed state time)."""
    data = {
        "science_path": str(root / f"missing-{number}.fits"),
        "reference_path": str(DATA / "Stack-DEC-OBS18.fits"),
    }
    if in_worker:
        from prefect.deployments import run_deployment

        from pipeline.workflow.deployments import deployment_path

        run = run_deployment(
            deployment_path("observation_ingestion"),
            parameters={"observation_data": data},
            timeout=300,
        )
        if not run.state.is_failed():
            raise SystemExit(f"run {run.id} ended {run.state.name}, not Failed: {run.state}")
        return str(run.id), run.state.timestamp
    from pipeline.flows.observations import observation_ingestion_flow

    state = observation_ingestion_flow(data, return_state=True)
    if not state.is_failed():
        raise SystemExit(f"the ingestion of a missing file ended {state.name}, not Failed")
    return str(state.state_details.flow_run_id), state.timestamp


def _receiver() -> tuple[ThreadingHTTPServer, dict[str, tuple[dict[str, Any], float]]]:
    """An HTTP server on 127.0.0.1 keeping (payload, receipt time) by flow run id."""
    received: dict[str, tuple[dict[str, Any], float]] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            now = time.time()
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            received[str(body.get("flow_run_id"))] = (body, now)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, received


def _wait_for(
    received: dict[str, tuple[dict[str, Any], float]], run_id: str, timeout: float
) -> tuple[dict[str, Any], float]:
    deadline = time.monotonic() + timeout
    while run_id not in received:
        if time.monotonic() > deadline:
            raise SystemExit(f"no alert for flow run {run_id} within {timeout:.0f} s")
        time.sleep(0.01)
    return received[run_id]


def _start_worker(root: Path) -> subprocess.Popen[bytes]:
    """``astr worker`` in its own process group, once its deployments exist."""
    from prefect.client.orchestration import get_client

    from pipeline.workflow.deployments import deployment_path

    astr = Path(sys.executable).with_name("astr")
    log = (root / "worker.log").open("wb")
    worker = subprocess.Popen(
        [str(astr), "worker"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 180
    with get_client(sync_client=True) as client:
        while True:
            try:
                client.read_deployment_by_name(deployment_path("observation_ingestion"))
                return worker
            except Exception:
                if worker.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(
                        f"astr worker did not start: see {root / 'worker.log'}"
                    ) from None
                time.sleep(0.5)


def _stop(worker: subprocess.Popen[bytes]) -> None:
    os.killpg(worker.pid, signal.SIGTERM)
    try:
        worker.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()


if __name__ == "__main__":
    sys.exit(main())
