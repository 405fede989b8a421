"""Several processes on one Optuna search: spawned workers, shared cores, dead workers.

``run_search(..., n_workers=N)`` calls ``work_with_processes``: it spawns ``N - 1``
worker processes that load the same study by name from the same storage, while the
calling process works too. Each process claims waiting trials until the study's
budget is used up (``pipeline.ml.search.work_on_study``), with ``cores // N`` torch
threads, so the processes share the cores instead of fighting over them. A worker
that dies does not hang the search: the trial it held is marked failed (and counted)
by whichever process looks next, and the rest of the queue goes to the others.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from pipeline.ml.data import CandidateDataset
from pipeline.ml.model import torch_threads
from pipeline.ml.search import (
    TrialTracker,
    fail_abandoned_trials,
    join_search,
    work_on_study,
)

__all__ = [
    "spawn_worker",
    "stop_workers",
    "threads_per_process",
    "torch_threads",
    "wait_for_workers",
    "work_with_processes",
]

logger = logging.getLogger(__name__)


def threads_per_process(n_workers: int, cores: int | None = None) -> int:
    """Torch threads for each of ``n_workers`` processes sharing ``cores`` (default: ours).

    >>> threads_per_process(2, cores=8), threads_per_process(3, cores=2)
    (4, 1)
    """
    if n_workers < 1:
        raise ValueError(f"n_workers must be at least 1, got {n_workers}")
    cores = cores or len(os.sched_getaffinity(0))
    return max(1, cores // n_workers)


def work_with_processes(
    study: Any,
    storage: Any,
    data: CandidateDataset,
    *,
    n_workers: int,
    storage_url: str,
    deadline: float | None = None,
    tracking_uri: str | None = None,
    tracker: TrialTracker | None = None,
) -> list[int | None]:
    """Work on ``study`` here and in ``n_workers - 1`` spawned processes until its queue is empty.

    Parameters
    ----------
    study, storage
        The study (from ``create_search_study``) and the storage it lives in; this
        process's share of the work runs on them.
    storage_url : str
        What the spawned workers open (``open_storage(..., parallel=True)``).
    deadline : float, optional
        ``time.time()`` after which no process starts a trial.
    tracking_uri : str, optional
        Each worker nests its trials under the study's MLflow run.

    Returns
    -------
    list
        The exit codes of the spawned workers (0: ran out of trials).
    """
    threads = threads_per_process(n_workers)
    processes: list[BaseProcess] = []
    with tempfile.TemporaryDirectory(prefix="astr-search-") as tmp, torch_threads(threads):
        # The workers read the dataset from a file: spawning with it as an argument
        # would block here until each worker had imported torch to unpickle it.
        data_file = Path(tmp) / "dataset.pickle"
        with data_file.open("wb") as handle:
            pickle.dump(data, handle, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            for index in range(1, n_workers):
                processes.append(
                    spawn_worker(
                        index,
                        storage_url=storage_url,
                        study_name=study.study_name,
                        data_file=data_file,
                        deadline=deadline,
                        tracking_uri=tracking_uri,
                        threads=threads,
                    )
                )
            work_on_study(study, storage, data, deadline=deadline, tracker=tracker)
            return wait_for_workers(processes, study)
        finally:
            stop_workers(processes)
            fail_abandoned_trials(study)


def spawn_worker(
    index: int,
    *,
    storage_url: str,
    study_name: str,
    data_file: Path,
    deadline: float | None,
    tracking_uri: str | None,
    threads: int,
) -> BaseProcess:
    """Spawn worker ``index``: ``join_search`` with ``threads`` torch threads, daemonic.

    ``data_file`` holds the pickled dataset; it must exist until the worker ends.
    """
    context = multiprocessing.get_context("spawn")
    process = context.Process(
        target=_worker_main,
        kwargs={
            "storage_url": storage_url,
            "study_name": study_name,
            "data_file": str(data_file),
            "deadline": deadline,
            "tracking_uri": tracking_uri,
            "threads": threads,
            "index": index,
        },
        name=f"astr-search-{index}",
        daemon=True,
    )
    process.start()
    return process


def wait_for_workers(processes: list[BaseProcess], study: Any) -> list[int | None]:
    """Wait until every worker has ended; fail the trials of those that died.

    Returns their exit codes; a non-zero one is logged as a warning.
    """
    pending = {process.sentinel: process for process in processes}
    while pending:
        for sentinel in wait(list(pending)):
            process = pending.pop(sentinel)  # type: ignore[call-overload]
            process.join()
            if process.exitcode != 0:
                logger.warning(
                    "search worker %s (pid %s) ended with exit code %s",
                    process.name,
                    process.pid,
                    process.exitcode,
                )
        fail_abandoned_trials(study)
    return [process.exitcode for process in processes]


def stop_workers(processes: list[BaseProcess], grace_s: float = 10.0) -> None:
    """Terminate workers still running (after an error here), killing them after ``grace_s``."""
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(grace_s)
        if process.is_alive():
            process.kill()
            process.join()


def _worker_main(
    *,
    storage_url: str,
    study_name: str,
    data_file: str,
    deadline: float | None,
    tracking_uri: str | None,
    threads: int,
    index: int,
) -> None:
    """A spawned worker: ``join_search`` with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    with open(data_file, "rb") as handle:
        data = pickle.load(handle)  # written by the process that spawned this one
    join_search(
        data,
        storage_url=storage_url,
        study_name=study_name,
        timeout=None if deadline is None else deadline - time.time(),
        tracking_uri=tracking_uri,
        worker_index=index,
    )
