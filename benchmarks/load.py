"""Observation flows under load: 2 workers against 1, PostgreSQL-backed Prefect, via the API.

Starts a throwaway PostgreSQL 15 cluster (tests/pg.py) holding the Prefect server's
database and the observation catalogue, writes distinct 256x256 pairs (the DECam test
pair, each science image with its own seeded noise, so every pair is a new observation),
then runs two phases, each with a real ``astr api`` and real ``astr worker`` processes:

1. baseline: 1 worker, ``--baseline-flows`` flows;
2. scaling: ``--workers`` workers (default 2), ``--flows`` flows.

Every flow is started with ``POST /workflows/flows/observation_pipeline/start``. Each
worker serves at most ``--per-worker`` runs at once in both phases; the global limit
``max_concurrent_flows`` (the deployment concurrency limit the Prefect server enforces)
is ``--limit`` (default: workers x per-worker, so it is not the bottleneck of the
scaling phase and the comparison measures the workers alone).

It prints, per phase: none lost (distinct flow runs, all COMPLETED, one observation per
flow in the catalogue), the most runs holding a deployment slot at once (PENDING to end,
from Prefect's state history) and the most RUNNING at once, against the limit,
throughput (flows/min from the first submission to the last end), p50/p95 queue wait
(SCHEDULED to RUNNING), the machine's CPU use (busy fraction and CPU-seconds per flow,
everything on the machine counted: server, database, API, workers, kernels), and the
throughput ratio of the scaling phase to the baseline with the ceiling the CPU allows
(all cores busy at the baseline's CPU-seconds per flow).

Target: ratio >= 1.6 when the work is CPU-light enough. Each pipeline runs five
notebooks (kernels, the science stack): on a machine with 2 cores, two workers compete
for the same cores and the ratio measures that, not the orchestration.

    python benchmarks/load.py [--quick] [--flows 200] [--baseline-flows 60]
                              [--workers 2] [--per-worker 2] [--limit N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the throwaway PostgreSQL cluster, the API stack

TARGET = 1.6
DECAM = ROOT / "tests" / "data" / "decam"


def main(argv: list[str] | None = None) -> int:
    """Run both phases and print the results; exit 1 if a flow was lost or the limit broke."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=200, help="flows in the scaling phase")
    parser.add_argument("--baseline-flows", type=int, default=60, help="flows with 1 worker")
    parser.add_argument("--workers", type=int, default=2, help="workers in the scaling phase")
    parser.add_argument("--per-worker", type=int, default=2, help="runs at once per worker")
    parser.add_argument("--limit", type=int, default=None, help="max_concurrent_flows")
    parser.add_argument("--quick", action="store_true", help="16 flows, 8 in the baseline")
    parser.add_argument("--timeout", type=float, default=4 * 3600, help="seconds per phase")
    args = parser.parse_args(argv)
    if args.quick:
        args.flows, args.baseline_flows = 16, 8
    limit = args.limit or args.workers * args.per_worker

    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # a run refused a slot is retried after this many seconds (Prefect's default: 30)
    os.environ.setdefault("PREFECT_SERVER_DEPLOYMENTS_CONCURRENCY_SLOT_WAIT_SECONDS", "5")
    import pg
    from apistack import running_stack
    from local_server import start_local_prefect

    from pipeline.demo import jittered_night

    began = time.monotonic()
    with pg.running_cluster() as cluster:
        prefect_db = cluster.create_database("prefect")
        cluster.create_database("catalogue")
        catalogue_url = cluster.url("catalogue", driver="postgresql+psycopg")
        root, server = start_local_prefect(
            "astr-load-", ASTR_PREFECT_DATABASE_URL=prefect_db, ASTR_DATABASE_URL=catalogue_url
        )
        try:
            pairs = jittered_night(
                DECAM / "DEC-OBS04a.mini.fits",
                DECAM / "Stack-DEC-OBS18.fits",
                root / "pairs",
                pairs=args.baseline_flows + args.flows,
                seed=int(time.time()),
            )
            print(
                f"Prefect server on PostgreSQL {server.api_url}; catalogue on PostgreSQL; "
                f"{len(pairs)} distinct 256x256 pairs written; limit {limit}, "
                f"{args.per_worker} runs per worker"
            )
            env = {
                "ASTR_DATABASE_URL": catalogue_url,
                "ASTR_MAX_CONCURRENT_FLOWS": str(limit),
                "PREFECT_RUNNER_POLL_FREQUENCY": "2",
            }
            results = []
            for label, workers, chosen in (
                ("1 worker", 1, pairs[: args.baseline_flows]),
                (f"{args.workers} workers", args.workers, pairs[args.baseline_flows :]),
            ):
                with running_stack(
                    server.api_url,
                    root / label.replace(" ", "-"),
                    workers=workers,
                    env=env,
                    worker_args=("--limit", str(args.per_worker)),
                ) as stack:
                    result = run_phase(stack, chosen, limit, catalogue_url, args.timeout)
                result["label"] = label
                results.append(result)
                print_phase(result, limit)
        finally:
            server.stop_server()
    ratio = results[1]["throughput"] / results[0]["throughput"]
    cores = os.cpu_count() or 1
    ceiling = cores / results[0]["busy_cores"] if results[0]["busy_cores"] else float("nan")
    print(
        f"\nthroughput {results[1]['label']} / 1 worker: {ratio:.2f}x (target >= {TARGET}x "
        f"when CPU-light; this machine has {cores} cores); total "
        f"{(time.monotonic() - began) / 60:.1f} min"
    )
    print(
        f"CPU ceiling of that ratio: {ceiling:.2f}x ({cores} cores over the "
        f"{results[0]['busy_cores']:.2f} cores the baseline kept busy, at "
        f"{results[0]['cpu_per_flow']:.0f} CPU-s per flow)"
    )
    ok = all(r["lost"] == 0 and r["max_pending"] <= limit for r in results)
    return 0 if ok else 1


def run_phase(
    stack: Any, pairs: list[Any], limit: int, catalogue_url: str, timeout: float
) -> dict[str, Any]:
    """Start one flow per pair through the API, wait for all, read Prefect and the catalogue."""
    import psutil
    from prefect.client.orchestration import get_client

    from pipeline.config import load_config
    from pipeline.flows.batch import read_runs
    from pipeline.store import Catalogue
    from pipeline.workflow.concurrency import FINAL_STATES, max_overlap, run_times

    cpu_before = psutil.cpu_times()
    ids = []
    with stack.client() as client:
        for pair in pairs:
            body = {
                "observation_data": {
                    "science_path": str(pair.science_path),
                    "reference_path": str(pair.reference_path),
                }
            }
            answer = client.post("/workflows/flows/observation_pipeline/start", json=body)
            answer.raise_for_status()
            ids.append(answer.json()["flow_id"])
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as prefect:
        while True:
            runs = read_runs(prefect, ids)
            states = [r.state.type.value for r in runs.values() if r.state is not None]
            if len(states) == len(ids) and all(s in FINAL_STATES for s in states):
                break
            if time.monotonic() > deadline:
                print(f"  gave up waiting: {sorted(set(states))}")
                break
            time.sleep(5)
        times = run_times(ids, prefect)
    busy_seconds, busy_cores = cpu_use(cpu_before, psutil.cpu_times())
    completed = [t for t in times if t.state == "COMPLETED"]
    config = load_config(environ={"ASTR_DATABASE_URL": catalogue_url, "ASTR_HOME": str(stack.home)})
    with Catalogue.from_config(config) as catalogue:
        observations = {
            catalogue.get_flow_run(uuid.UUID(t.flow_run_id)).observation_id for t in completed
        }
    observations.discard(None)
    first = min(t.scheduled for t in times)
    last = max(t.ended for t in completed) if completed else first
    span = (last - first).total_seconds()
    waits = sorted(t.queue_wait for t in times if t.queue_wait is not None)
    return {
        "flows": len(ids),
        "distinct": len(set(ids)),
        "completed": len(completed),
        "observations": len(observations),
        "lost": len(ids) - min(len(completed), len(observations)),
        "max_pending": max_overlap((t.pending, t.ended) for t in times),
        "max_running": max_overlap((t.running, t.ended) for t in times),
        "throughput": len(completed) / (span / 60) if span else 0.0,
        "span": span,
        "p50": _quantile(waits, 0.50),
        "p95": _quantile(waits, 0.95),
        "limit": limit,
        "busy_cores": busy_cores,
        "cpu_per_flow": busy_seconds / len(completed) if completed else float("nan"),
    }


def cpu_use(before: Any, after: Any) -> tuple[float, float]:
    """CPU-seconds spent on the whole machine between two ``psutil.cpu_times()``, and the
    average number of cores that were busy (the times cover every core of the machine).
    """
    total = sum(after) - sum(before)
    idle = (after.idle - before.idle) + (
        getattr(after, "iowait", 0.0) - getattr(before, "iowait", 0.0)
    )
    busy = total - idle
    wall = total / (os.cpu_count() or 1)
    return busy, busy / wall if wall > 0 else float("nan")


def _quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


def print_phase(result: dict[str, Any], limit: int) -> None:
    """One phase's lines."""
    lost = "none lost" if result["lost"] == 0 else f"LOST {result['lost']}"
    print(f"\n{result['label']}: {result['flows']} flows")
    print(
        f"  {lost}: {result['distinct']} distinct flow runs, {result['completed']} COMPLETED, "
        f"{result['observations']} observations in the catalogue"
    )
    verdict = "never exceeded" if result["max_pending"] <= limit else "EXCEEDED"
    print(
        f"  concurrency limit {limit} {verdict}: at most {result['max_pending']} runs held a "
        f"slot (PENDING to end) and {result['max_running']} were RUNNING at once "
        "(Prefect state history)"
    )
    print(
        f"  throughput {result['throughput']:.2f} flows/min ({result['span'] / 60:.1f} min "
        f"from first submission to last end); queue wait p50 {result['p50']:.1f} s, "
        f"p95 {result['p95']:.1f} s"
    )
    print(
        f"  CPU: {result['busy_cores']:.2f} cores busy on average, "
        f"{result['cpu_per_flow']:.0f} CPU-s per completed flow (everything on the machine)"
    )


if __name__ == "__main__":
    raise SystemExit(main())
