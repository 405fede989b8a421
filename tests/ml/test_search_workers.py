"""Several processes on one Optuna search: exact budgets, joiners, dead workers."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest

from pipeline.errors import AstrError
from pipeline.ml.search import (
    PARENT_RUN_ATTR,
    WORKER_ATTR,
    TrialTracker,
    close_storage,
    create_search_study,
    join_search,
    journal_path,
    open_storage,
    run_search,
)
from pipeline.ml.search_workers import threads_per_process

SPACE = {
    "learning_rate": {"type": "float", "low": 3e-4, "high": 3e-3, "log": True},
    "width": {"type": "int", "low": 4, "high": 8},
}
BASE = {"epochs": 2, "patience": 2, "dense": 8}
# Trials long enough that a spawned worker (seconds to import torch) gets some of them.
SHARED = {"epochs": 4, "patience": 4, "dense": 8}
FINISHED = (
    optuna.trial.TrialState.COMPLETE,
    optuna.trial.TrialState.PRUNED,
    optuna.trial.TrialState.FAIL,
)


def _study(url: str, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=open_storage(url, name))


def _pid(trial: optuna.trial.FrozenTrial) -> int | None:
    return (trial.user_attrs.get(WORKER_ATTR) or {}).get("pid")


def test_threads_are_split_among_the_processes():
    assert threads_per_process(1, cores=8) == 8
    assert threads_per_process(2, cores=8) == 4
    assert threads_per_process(3, cores=8) == 2
    assert threads_per_process(4, cores=2) == 1  # never none
    with pytest.raises(ValueError, match="at least 1"):
        threads_per_process(0)


def test_parallel_sqlite_studies_live_in_a_journal_next_to_the_database(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    assert journal_path(url) == tmp_path / "optuna.journal"
    assert journal_path("postgresql+psycopg://astr:pw@db:5432/optuna") is None  # as given
    with pytest.raises(AstrError, match="in-memory"):
        journal_path("sqlite://")
    # a study one process started in the SQLite file is not opened by parallel workers
    single = open_storage(url, "single")
    create_search_study(single, "single", SPACE, dataset_id="d", n_trials=2)
    with pytest.raises(AstrError, match=r"resume it with one process.*PostgreSQL"):
        open_storage(url, "single", parallel=True)
    parallel = open_storage(url, "many", parallel=True)
    assert isinstance(parallel, optuna.storages.JournalStorage)
    create_search_study(parallel, "many", SPACE, dataset_id="d", n_trials=3)
    # found in the journal afterwards, however many processes resume it
    assert isinstance(open_storage(url, "many"), optuna.storages.JournalStorage)
    assert len(_study(url, "many").trials) == 3  # three waiting trials: the budget
    assert not isinstance(open_storage(url, "single"), optuna.storages.JournalStorage)


def test_two_processes_share_one_study_and_finish_exactly_its_budget(tmp_path, candidate_night):
    data = candidate_night(4)
    url = f"sqlite:///{tmp_path}/optuna.db"
    common = {"storage_url": url, "study_name": "two", "base": SHARED, "n_workers": 2}
    result = run_search(data, SPACE, n_trials=8, **common)
    study = _study(url, "two")
    trials = study.trials
    assert len(trials) == 8 and all(t.state in FINISHED for t in trials)
    assert result.n_complete + result.n_pruned + result.n_failed == 8
    pids = {_pid(t) for t in trials}
    assert os.getpid() in pids and len(pids) == 2, pids  # this process and a spawned one
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    best = min(complete, key=lambda t: t.value)
    assert result.best_value == best.value and result.best_params == best.params
    # the two processes sampled different settings (not the same seed twice)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == 8

    assert run_search(data, SPACE, n_trials=8, **common) == result  # nothing left to run
    assert len(_study(url, "two").trials) == 8


def test_a_joining_worker_nests_its_trials_under_the_search_run(tmp_path, candidate_night):
    data = candidate_night(4)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    url = f"sqlite:///{tmp_path}/optuna.db"
    study = create_search_study(
        open_storage(url, "tracked", parallel=True),
        "tracked",
        SPACE,
        dataset_id=data.dataset_id,
        n_trials=2,
        base={**BASE, "epochs": 1},
    )
    search_run = TrialTracker(tracking, "tracked")  # what run_search opens for the search
    study.set_user_attr(PARENT_RUN_ATTR, search_run.parent)
    # what a spawned worker or `astr hpo-worker` runs
    joined = join_search(data, storage_url=url, study_name="tracked", tracking_uri=tracking)
    assert joined.trials_run == (0, 1) and joined.n_finished == joined.n_trials == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    experiment = client.get_experiment_by_name("realbogus-search")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert [p.info.run_id for p in parents] == [search_run.parent]
    assert parents[0].info.status == "RUNNING"  # the joiner leaves the search's run open
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {search_run.parent}
    assert sorted(r.data.tags["optuna.trial"] for r in children) == ["0", "1"]
    assert all("val_loss" in r.data.metrics for r in children)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster (skipped where its binaries are missing)."""
    from pg import running_cluster, skip_unless_postgres

    skip_unless_postgres()
    with running_cluster() as cluster:
        yield cluster


def test_two_processes_share_a_postgresql_study(postgres, candidate_night):
    url = postgres.create_database("optuna_workers").replace("+asyncpg", "+psycopg")
    assert journal_path(url) is None  # the URL is used as given
    result = run_search(
        candidate_night(4),
        SPACE,
        storage_url=url,
        study_name="pg",
        n_trials=8,
        base=SHARED,
        n_workers=2,
    )
    storage = optuna.storages.RDBStorage(url)
    trials = optuna.load_study(study_name="pg", storage=storage).trials
    close_storage(storage)
    assert len(trials) == 8 and all(t.state in FINISHED for t in trials)
    assert result.n_complete + result.n_pruned + result.n_failed == 8
    assert len({_pid(t) for t in trials}) == 2


def test_a_worker_on_another_process_joins_through_the_cli(tmp_path, candidate_night):
    from pipeline.flows.training import store_dataset

    data = candidate_night(4)
    dataset_id = store_dataset(data)  # in this test's ASTR_HOME, which the CLI reads too
    url = f"sqlite:///{tmp_path / 'home' / 'optuna.db'}"  # the home's default storage
    storage = open_storage(url, "joined", parallel=True)
    create_search_study(
        storage, "joined", SPACE, dataset_id=dataset_id, n_trials=3, base=BASE, seed=5
    )
    exe = shutil.which("astr", path=str(Path(sys.executable).parent)) or "astr"
    worker = subprocess.Popen(
        [exe, "hpo-worker", "--study", "joined", "--no-track", "--threads", "1", "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    out, err = worker.communicate(timeout=120)
    assert worker.returncode == 0, err
    shown = json.loads(out)
    assert shown["trials_run_here"] == [0, 1, 2]
    assert shown["n_finished"] == shown["n_trials"] == 3
    trials = _study(url, "joined").trials
    assert {_pid(t) for t in trials} == {worker.pid}
    assert all(t.state in FINISHED for t in trials)

    # the study stays resumable: one more trial, run here, on the same journal
    more = run_search(
        data, SPACE, storage_url=url, study_name="joined", n_trials=4, base=BASE, seed=5
    )
    trials = _study(url, "joined").trials
    assert len(trials) == 4 and _pid(trials[3]) == os.getpid()
    assert more.n_complete + more.n_pruned + more.n_failed == 4

    other = dataclasses.replace(data, snr=data.snr + 1)  # another content id
    with pytest.raises(AstrError, match="searches on dataset"):
        join_search(other, storage_url=url, study_name="joined")
    with pytest.raises(AstrError, match=r"no study 'nobody'.*astr hpo"):
        join_search(data, storage_url=url, study_name="nobody")


def test_a_killed_worker_does_not_hang_the_search(tmp_path, candidate_night):
    data = candidate_night(4)
    url = f"sqlite:///{tmp_path}/optuna.db"
    killed: dict[str, int] = {}
    done = threading.Event()

    def kill_the_first_foreign_trial() -> None:
        """SIGKILL the spawned worker as soon as it runs a trial."""
        while not done.is_set():
            time.sleep(0.2)
            if not journal_path(url).is_file():
                continue
            try:
                study = _study(url, "killed")
            except KeyError:
                continue
            for trial in study.get_trials(states=(optuna.trial.TrialState.RUNNING,)):
                pid = _pid(trial)
                if pid is not None and pid != os.getpid():
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, number=trial.number)
                    return

    watcher = threading.Thread(target=kill_the_first_foreign_trial, daemon=True)
    watcher.start()
    began = time.monotonic()
    try:
        result = run_search(
            data,
            SPACE,
            storage_url=url,
            study_name="killed",
            n_trials=6,
            base=SHARED,
            n_workers=2,
        )
    finally:
        done.set()
        watcher.join()
    assert killed, "the spawned worker never ran a trial"
    assert time.monotonic() - began < 120
    trials = _study(url, "killed").trials
    assert len(trials) == 6 and all(t.state in FINISHED for t in trials)
    assert trials[killed["number"]].state == optuna.trial.TrialState.FAIL  # counted
    assert result.n_failed >= 1
    assert result.n_complete + result.n_pruned + result.n_failed == 6
    # the killed worker's share went to this process
    assert all(_pid(t) == os.getpid() for t in trials if t.number > killed["number"])
