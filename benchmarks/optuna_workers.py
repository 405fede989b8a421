"""Does a 2-process Optuna search finish the same trials faster than a 1-process one?

Runs the same study twice on a simulated candidate dataset, each time in a fresh
storage: first in one process with torch's default threads, then with
``run_search(..., n_workers=2)``, two processes splitting those threads. The work
per trial is made the same whatever the sampler picks: the space tunes only
settings that do not change the compute (learning rate, weight decay, dropout),
every trial runs the same epochs (patience = epochs) and with 2 epochs the median
pruner can stop a trial only after its last epoch. Prints both wall times, their
ratio (target: 2 processes <= 0.65 x 1 process), the trial counts and how many
trials each process ran, and the machine's load average before and after.

Usage::

    python benchmarks/optuna_workers.py                 # 12 trials on 16 pairs
    python benchmarks/optuna_workers.py --width 4 --batch-size 32   # a smaller network

What bounds the ratio: torch's second thread already speeds one process up (on
this 2-core machine about 1.3x for a default-network trial: 2.7 s against 3.4 s),
two processes cannot do better than 2x, and the second one starts late (about 1.4 s
on a fast machine: it imports torch and reads the dataset), which counts with trials
this short. The floor is t(1 thread) / (2 t(2 threads)) of one trial.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


def dataset(pairs: int, size: int, cache: Path):
    """The simulated candidate set of ``pairs`` pairs, cached by its settings."""
    from pipeline.ml.data import load_dataset, save_dataset, simulated_dataset

    settings = {"n_stars": 150, "n_galaxies": 40, "n_transients": 30}
    key = json.dumps({"pairs": pairs, "size": size, **settings}, sort_keys=True)
    path = cache / f"workers-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz"
    if path.is_file():
        return load_dataset(path)
    began = time.perf_counter()
    data = simulated_dataset(range(pairs), shape=(size, size), **settings)
    save_dataset(data, path)
    print(f"built {len(data)} candidates from {pairs} pairs in {time.perf_counter() - began:.0f} s")
    return data


def search(data, trials: int, n_workers: int, **settings: int) -> tuple[float, dict]:
    """Wall time of one search in a fresh storage, and what its trials were."""
    import optuna

    from pipeline.ml.search import WORKER_ATTR, close_storage, open_storage, run_search

    base = {**settings, "patience": settings["epochs"]}
    with tempfile.TemporaryDirectory() as tmp:
        url = f"sqlite:///{tmp}/optuna.db"
        began = time.perf_counter()
        result = run_search(
            data,
            SPACE,
            storage_url=url,
            study_name="workers",
            n_trials=trials,
            base=base,
            seed=0,
            n_workers=n_workers,
        )
        wall = time.perf_counter() - began
        storage = open_storage(url, "workers")
        trials = optuna.load_study(study_name="workers", storage=storage).trials
        close_storage(storage)
    by_pid = collections.defaultdict(list)
    for trial in trials:
        by_pid[(trial.user_attrs.get(WORKER_ATTR) or {}).get("pid")].append(trial)
    start = min(t.datetime_start for t in trials)
    processes = [
        {
            "trials": len(mine),
            "first_trial_at_s": round(_seconds(min(t.datetime_start for t in mine) - start), 1),
            "busy_s": round(sum(_seconds(t.datetime_complete - t.datetime_start) for t in mine), 1),
        }
        for mine in sorted(by_pid.values(), key=len, reverse=True)
    ]
    return wall, {
        "trials": len(trials),
        "states": dict(collections.Counter(t.state.name for t in trials)),
        "per_process": processes,
        "epochs": sum(len(t.intermediate_values) for t in trials),
        "best_value": round(result.best_value, 4),
    }


def _seconds(delta) -> float:
    return delta.total_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every trial")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--width", type=int, default=8, help="network width (the default's)")
    parser.add_argument("--batch-size", type=int, default=64, help="(the default's)")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--cache", type=Path, default=Path(".astr/bench/realbogus"))
    args = parser.parse_args()

    import torch

    args.cache.mkdir(parents=True, exist_ok=True)
    data = dataset(args.pairs, args.size, args.cache)
    cores = len(os.sched_getaffinity(0))
    print(f"dataset {data.dataset_id}: {len(data)} candidates, {json.dumps(data.counts())}")
    print(f"{cores} cores; torch threads by default: {torch.get_num_threads()}")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    walls = {}
    for n_workers in (1, 2):
        wall, info = search(
            data,
            args.trials,
            n_workers,
            epochs=args.epochs,
            width=args.width,
            batch_size=args.batch_size,
        )
        walls[n_workers] = wall
        print(f"{n_workers} process(es): {wall:.1f} s; {json.dumps(info)}")
    ratio = walls[2] / walls[1]
    verdict = "MET" if ratio <= 0.65 else "NOT MET"
    print(f"ratio 2 processes / 1 process: {ratio:.2f} (target <= 0.65): {verdict}")
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))


if __name__ == "__main__":
    main()
