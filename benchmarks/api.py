"""How fast the REST API answers status and list requests with many runs recorded.

Starts a real local Prefect server and a real ``astr api`` process (uvicorn, over
HTTP) in a temporary project home, registers the flows' deployments, records
``--runs`` observation runs through ``POST /workflows/flows/observation_pipeline/start``
(no worker: they wait; a third are then cancelled, so the list mixes live and
finished runs), and times ``GET /workflows/flows/{id}/status`` for random runs and
``GET /workflows/flows`` pages. The baseline, measured in the same process over the
same connection pool, is Prefect's own API reading the same run
(``GET /api/flow_runs/{id}``) and the same page (``POST /api/flow_runs/filter``).

Target: median under 50 ms for status and list with 1,000 runs recorded.

    python benchmarks/api.py [--runs 1000] [--requests 300]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from local_server import free_port, start_local_prefect

TARGET_S = 0.050
ASTR = (sys.executable, "-c", "from pipeline.cli import main; main()")


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs recorded before timing")
    parser.add_argument("--requests", type=int, default=300, help="timed requests per route")
    args = parser.parse_args(argv)

    root, server = start_local_prefect("astr-bench-api-")

    import httpx

    from pipeline.workflow.deployments import model_deployments, observation_deployments

    api = None
    try:
        for deployment in [*observation_deployments(), *model_deployments()]:
            deployment.apply()
        port = free_port()
        api = subprocess.Popen(
            [*ASTR, "api", "--port", str(port)],
            stdout=open(root / "api.log", "w"),  # noqa: SIM115 - the child owns it
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        _wait_healthy(url, api, root / "api.log")
        print(f"cores: {os.cpu_count()}; Prefect {server.api_url}; API {url}")

        with httpx.Client(base_url=url, timeout=60) as client:
            began = time.perf_counter()
            ids = _record_runs(client, args.runs)
            took = time.perf_counter() - began
            print(f"recorded {len(ids)} runs through the API in {took:.1f} s")
            for flow_id in ids[: len(ids) // 3]:
                client.post(f"/workflows/flows/{flow_id}/cancel").raise_for_status()
            total = client.get("/workflows/flows").json()["total"]
            print(f"runs listed by the API: {total} ({len(ids) // 3} cancelled)\n")

            prefect = httpx.Client(base_url=server.api_url, timeout=60)
            rng = random.Random(0)
            picks = [rng.choice(ids) for _ in range(args.requests)]
            offsets = [rng.randrange(0, max(len(ids) - 50, 1)) for _ in range(args.requests)]
            rows = [
                (
                    "status",
                    _timed(lambda i: client.get(f"/workflows/flows/{picks[i]}/status"), picks),
                    _timed(lambda i: prefect.get(f"/flow_runs/{picks[i]}"), picks),
                ),
                (
                    "list (50 per page)",
                    _timed(
                        lambda i: client.get(
                            "/workflows/flows", params={"limit": 50, "offset": offsets[i]}
                        ),
                        offsets,
                    ),
                    _timed(
                        lambda i: prefect.post(
                            "/flow_runs/filter",
                            json={"limit": 50, "offset": offsets[i], "sort": "START_TIME_DESC"},
                        ),
                        offsets,
                    ),
                ),
                (
                    "list pending, newest 50",
                    _timed(
                        lambda i: client.get(
                            "/workflows/flows", params={"limit": 50, "status": "PENDING"}
                        ),
                        offsets,
                    ),
                    _timed(
                        lambda i: prefect.post(
                            "/flow_runs/filter",
                            json={
                                "limit": 50,
                                "flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}}},
                            },
                        ),
                        offsets,
                    ),
                ),
            ]
            prefect.close()
        print(
            f"{'route':<26}{'median ms':>10}{'p95 ms':>9}{'Prefect median':>16}{'ratio':>7}"
            f"{'target':>9}"
        )
        ok = True
        for name, ours, baseline in rows:
            median, p95 = statistics.median(ours), _p95(ours)
            base = statistics.median(baseline)
            meets = median < TARGET_S
            ok &= meets
            print(
                f"{name:<26}{median * 1e3:>10.1f}{p95 * 1e3:>9.1f}{base * 1e3:>16.1f}"
                f"{median / base:>7.2f}{'met' if meets else 'MISSED':>9}"
            )
        print(f"\ntarget: median < {TARGET_S * 1e3:.0f} ms with {args.runs} runs recorded")
        return 0 if ok else 1
    finally:
        if api is not None and api.poll() is None:
            os.killpg(api.pid, signal.SIGTERM)
            api.wait(timeout=30)
        server.stop_server()


def _record_runs(client: object, count: int) -> list[str]:
    ids = []
    for number in range(count):
        body = {
            "observation_data": {
                "science_path": f"/data/night/science-{number:04d}.fits",
                "reference_path": "/data/reference.fits",
            }
        }
        answer = client.post("/workflows/flows/observation_pipeline/start", json=body)
        answer.raise_for_status()
        ids.append(answer.json()["flow_id"])
    return ids


def _timed(call: Callable[[int], object], items: list) -> list[float]:
    call(0).raise_for_status()  # warm
    times = []
    for index in range(len(items)):
        began = time.perf_counter()
        answer = call(index)
        times.append(time.perf_counter() - began)
        answer.raise_for_status()
    return times


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def _wait_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the API exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit(f"the API did not answer within 120 s:\n{log.read_text()}")


if __name__ == "__main__":
    raise SystemExit(main())
