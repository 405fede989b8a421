"""How much of a pipeline run is spent outside the notebooks' own computation.

Runs ``observation_pipeline_flow`` on a simulated 1024x1024 pair the way ``astr
observe`` does, against a real local Prefect server (started here, in a temporary
project home), and splits the wall time of each run into the time the kernels spent
executing cells and everything else (Prefect, the catalogue, storage, kernel
hand-over, reports). The first run warms the kernel pool and imports; the figures
are from the runs after it, each forced to recompute every step.

Target: on 2 cores, under 20% of the wall time outside the notebooks' computation.

    python benchmarks/orchestration.py [--runs 3] [--size 1024]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from local_server import start_local_prefect

STEPS = ("ingestion", "preprocessing", "differencing", "detection", "validation")
TARGET = 0.20


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="measured runs after the warm-up")
    parser.add_argument("--size", type=int, default=1024, help="image side in pixels")
    args = parser.parse_args(argv)

    root, server = start_local_prefect("astr-bench-")

    from pipeline.science import io
    from pipeline.science.simulate import simulate_pair

    try:
        pair = simulate_pair(shape=(args.size, args.size), seed=0)
        science, reference = root / "science.fits", root / "reference.fits"
        io.write_image(pair.science, science)
        io.write_image(pair.reference, reference)
        from pipeline.flows.submit import run_observations

        data = {"science_path": str(science), "reference_path": str(reference)}
        print(f"cores: {os.cpu_count()}; image {args.size}x{args.size}; Prefect {server.api_url}")
        rows = []
        for run in range(args.runs + 1):
            began = time.perf_counter()
            # The path `astr observe` takes: the concurrency slot, then the pipeline flow.
            (outcome,) = run_observations([("pair", {**data, "force": run > 0})])
            wall = time.perf_counter() - began
            if outcome.result is None:
                raise SystemExit(f"run {run} did not complete: {outcome.state} {outcome.error}")
            summary = outcome.result
            steps = summary["steps"]
            kernel = sum(steps[s]["durations"]["kernel"] for s in STEPS)
            step_wall = sum(steps[s]["durations"]["wall"] for s in STEPS)
            rows.append((run, wall, kernel, step_wall))
            label = "warm-up" if run == 0 else f"run {run}"
            if run == args.runs:
                print("  step            wall  kernel  k.wait  report  rest (seconds, last run)")
                for name in STEPS:
                    d = steps[name]["durations"]
                    rest = d["wall"] - d["kernel"] - d.get("kernel_wait", 0) - d.get("report", 0)
                    print(
                        f"  {name:<14}{d['wall']:6.2f}  {d['kernel']:6.2f}  "
                        f"{d.get('kernel_wait', 0):6.2f}  {d.get('report', 0):6.2f}  {rest:5.2f}"
                    )
            print(
                f"{label:>8}: wall {wall:6.2f} s  in kernels {kernel:6.2f} s  "
                f"runner total {step_wall:6.2f} s  outside {1 - kernel / wall:6.1%}"
            )
        measured = rows[1:]
        fraction = statistics.median(1 - k / w for _, w, k, _ in measured)
        runner = statistics.median((s - k) / w for _, w, k, s in measured)
        prefect = statistics.median((w - s) / w for _, w, _, s in measured)
        print()
        print(f"median share of wall time outside the notebooks: {fraction:.1%}")
        print(f"  of which runner (kernel hand-over, injection, reports, cache): {runner:.1%}")
        print(f"  of which flows (Prefect, catalogue, storage, artifacts):      {prefect:.1%}")
        verdict = "PASS" if fraction < TARGET else "FAIL"
        print(f"target < {TARGET:.0%}: {verdict}")
    finally:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # send the last logs before the server goes
        server.stop_server()
    return 0


if __name__ == "__main__":
    sys.exit(main())
