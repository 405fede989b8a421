"""How long a pruned Optuna search of the real/bogus network takes, and how much it prunes.

Builds (or reads from its cache) a simulated candidate dataset, then runs a TPE search
with the median pruner fed by each epoch's validation loss, exactly as
``hyperparameter_optimization_flow`` does, and prints:

- wall time of the whole search (target: 20 trials in at most 30 minutes on 2 cores);
- the share of pruned trials (target: at least a third);
- the baseline of the same process: what the search would have cost without pruning,
  estimated as (mean epoch time) x (epochs of a complete trial) x (trials), and the ratio.

Usage::

    python benchmarks/realbogus_search.py                 # 20 trials
    python benchmarks/realbogus_search.py --trials 6 --pairs 8   # a quick look
    python benchmarks/realbogus_search.py --workers 2   # two processes, one torch thread each
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import torch
from realbogus import code_digest  # the sibling benchmark (this folder is on sys.path)

from pipeline.ml.data import load_dataset, save_dataset, simulated_dataset
from pipeline.ml.search import open_storage, run_search

# widths are those that meet the inference target (>= 2,000 triplets/s on 2 cores): with
# the four stamps, width 6 runs at about 2,800/s, 8 at 2,700/s, 10 at 1,960/s, 12 at 1,480/s
SPACE = {
    "learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
    "weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "width": {"type": "categorical", "choices": [4, 6, 8]},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
}


def dataset(pairs: int, size: int, cache: Path):
    """The simulated candidate set of ``pairs`` pairs, cached by its settings."""
    # the digest of the code that makes the candidates is part of the key (as in
    # realbogus.py): a cache cut by older science code (or without the mask stamp) is stale
    settings = {"pairs": pairs, "size": size, "vary": True, "code": code_digest()}
    key = hashlib.sha256(json.dumps(settings).encode()).hexdigest()[:12]
    path = cache / f"search-{key}.npz"
    if path.is_file():
        return load_dataset(path)
    began = time.perf_counter()
    # conditions drawn per pair, with source and artefact counts scaled to the size
    data = simulated_dataset(range(pairs), shape=(size, size), vary=True)
    save_dataset(data, path)
    print(f"built {len(data)} candidates from {pairs} pairs in {time.perf_counter() - began:.0f} s")
    return data


def subset_images(data, n: int):
    """The candidates of ``n`` images, keeping the split shares (the first images of each)."""
    import numpy as np

    from pipeline.ml.data import CandidateDataset

    keep = np.zeros(len(data), dtype=bool)
    total = len(set(data.image.tolist()))
    for split in ("train", "validation", "test"):
        images = sorted(set(data.image[data.split == split].tolist()))
        share = max(1, round(n * len(images) / total))
        keep |= np.isin(data.image, images[:share])
    return CandidateDataset(
        **{name: getattr(data, name)[keep] for name in CandidateDataset.__dataclass_fields__}
    )


def _curve(trial) -> dict:
    """A trial as JSON: what a pruner could be replayed on."""
    return {
        "number": trial.number,
        "state": trial.state.name,
        "params": trial.params,
        "losses": [trial.intermediate_values[k] for k in sorted(trial.intermediate_values)],
        "seconds": (trial.datetime_complete - trial.datetime_start).total_seconds()
        if trial.datetime_complete and trial.datetime_start
        else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=12, help="most epochs of a trial")
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes on the study (run_search n_workers); above 1 each gets cores // N "
        "torch threads and --threads is not used",
    )
    parser.add_argument("--cache", type=Path, default=Path(".astr/bench/realbogus"))
    parser.add_argument(
        "--dataset", type=Path, help="a saved dataset (.npz), e.g. realbogus.py's cached one"
    )
    parser.add_argument(
        "--images", type=int, default=0, help="use only this many images of --dataset (0: all)"
    )
    parser.add_argument(
        "--curves",
        type=Path,
        help="write each trial's state, settings and per-epoch validation losses here (JSON)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    data = (
        load_dataset(args.dataset) if args.dataset else dataset(args.pairs, args.size, args.cache)
    )
    if args.images:
        data = subset_images(data, args.images)
    print(f"dataset {data.dataset_id}: {len(data)} candidates, {json.dumps(data.counts())}")

    with tempfile.TemporaryDirectory() as tmp:
        storage = f"sqlite:///{tmp}/optuna.db"
        began = time.perf_counter()
        result = run_search(
            data,
            SPACE,
            storage_url=storage,
            study_name="benchmark",
            n_trials=args.trials,
            base={"epochs": args.epochs},
            seed=0,
            n_workers=args.workers,
        )
        wall = time.perf_counter() - began
        import optuna

        # a study of several processes lives in a journal beside the SQLite file
        trials = optuna.load_study(
            study_name="benchmark", storage=open_storage(storage, "benchmark")
        ).trials
    for t in trials:
        losses = " ".join(f"{v:.4f}" for _, v in sorted(t.intermediate_values.items()))
        print(
            f"  trial {t.number:2d} {t.state.name:8s} "
            f"{len(t.intermediate_values):2d} epochs: {losses}"
        )
    if args.curves:
        args.curves.write_text(json.dumps([_curve(t) for t in trials], indent=1))
    epochs_run = sum(len(t.intermediate_values) for t in trials)
    per_epoch = wall / max(epochs_run, 1)
    complete = [len(t.intermediate_values) for t in trials if t.state.name == "COMPLETE"]
    full = sum(complete) / max(len(complete), 1)  # epochs of a trial nobody prunes
    unpruned = per_epoch * full * len(trials)
    pruned_share = result.n_pruned / max(len(trials), 1)
    print(
        f"trials {len(trials)}: complete {result.n_complete}, pruned {result.n_pruned}, "
        f"failed {result.n_failed}"
    )
    print(f"best validation loss {result.best_value:.4f} with {result.best_params}")
    verdict = "MET" if wall <= 1800 else "NOT MET"
    if args.trials < 20:
        verdict = f"only {args.trials} trials asked"
    print(
        f"search wall time {wall / 60:.1f} min with {args.workers} process(es) "
        f"(target <= 30 min for 20 trials): {verdict}"
    )
    print(
        f"pruned share {pruned_share:.0%} (target >= 33%): "
        f"{'MET' if pruned_share >= 1 / 3 else 'NOT MET'}"
    )
    print(
        f"epochs run {epochs_run}; a complete trial ran {full:.1f}; baseline without pruning "
        f"~{unpruned / 60:.1f} min; ratio search/baseline {wall / unpruned:.2f}"
    )


if __name__ == "__main__":
    main()
