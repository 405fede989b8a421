"""Hyper-parameter search with Optuna: TPE, pruning on per-epoch validation loss.

The study lives in an Optuna storage (SQLite by default, any SQLAlchemy URL), so an
interrupted search is resumed by running it again with the same name: it only runs
the trials still missing. With a tracking URI every trial is an MLflow run nested
under one run for the search.

The trial budget is a queue: the process that starts (or resumes) a search puts one
waiting trial per missing trial in the study, and every worker, in this process, in
processes it spawned or on another host (``join_search``), claims waiting trials
one at a time until none is left. A claim is atomic in the storage, so the study
ends with exactly ``n_trials`` trials however many workers share it. What a joining
worker needs (search space, dataset id, shared settings, budget) is kept in the
study's ``user_attrs``.

SQLite breaks under parallel writers: a study worked on by several processes with a
SQLite URL lives in an Optuna journal file next to the database instead (see
``open_storage``); PostgreSQL URLs are used as given.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import math
import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import AstrError
from pipeline.ml.data import CandidateDataset
from pipeline.ml.train import TrainConfig, TrainingInputs, train_model, training_inputs

if TYPE_CHECKING:
    import optuna

__all__ = [
    "SearchResult",
    "SearchSpaceError",
    "TrialTracker",
    "WorkerResult",
    "close_storage",
    "create_search_study",
    "fail_abandoned_trials",
    "join_search",
    "journal_path",
    "load_search_study",
    "open_storage",
    "opened_storage",
    "read_search_spec",
    "run_search",
    "search_spec",
    "summarize_study",
    "validate_search_space",
    "work_on_study",
    "worker_stamp",
]

_TYPES = ("float", "int", "categorical")
#: The study user attribute that holds what a worker needs to join a search.
SPEC_ATTR = "astr_search"
#: The study user attribute naming the MLflow run trials nest under.
PARENT_RUN_ATTR = "mlflow_parent_run"
#: The trial user attribute naming the process that claimed it.
WORKER_ATTR = "worker"
#: The trial user attribute holding the epoch whose validation loss is the trial's value.
KEPT_EPOCH_ATTR = "kept_epoch"
#: A running trial whose worker left no name is taken for abandoned after this long.
UNNAMED_GRACE_S = 60.0

logger = logging.getLogger(__name__)


class SearchSpaceError(AstrError, ValueError):
    """A malformed ``search_space``: the message names the parameter and the problem."""


@dataclass(frozen=True)
class SearchResult:
    """What a search found."""

    study_name: str
    best_params: dict[str, Any]
    best_value: float
    n_complete: int
    n_pruned: int
    n_failed: int


@dataclass(frozen=True)
class WorkerResult:
    """What one worker did for a study, and where the study stands."""

    study_name: str
    trials_run: tuple[int, ...]
    n_finished: int
    n_trials: int


def validate_search_space(search_space: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Check a search space; returns it with defaults filled in.

    Each entry maps a training setting (see ``TrainConfig.from_dict``) to one of
    ``{"type": "float", "low": a, "high": b, "log": bool}``,
    ``{"type": "int", "low": a, "high": b, "log": bool}`` or
    ``{"type": "categorical", "choices": [...]}``.

    Raises
    ------
    SearchSpaceError
    """
    if not isinstance(search_space, Mapping) or not search_space:
        raise SearchSpaceError("search_space must be a non-empty mapping of setting -> spec")
    known = set(TrainConfig().to_dict()) - {"device", "seed", "epochs"}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in search_space.items():
        where = f"search_space[{name!r}]"
        if name not in known:
            raise SearchSpaceError(f"{where}: not a tunable setting; choose from {sorted(known)}")
        if not isinstance(spec, Mapping) or spec.get("type") not in _TYPES:
            raise SearchSpaceError(f"{where} needs a 'type' of {_TYPES}, got {spec!r}")
        kind = spec["type"]
        if kind == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list | tuple) or not choices:
                raise SearchSpaceError(f"{where}: 'choices' must be a non-empty list")
            out[name] = {"type": kind, "choices": list(choices)}
            continue
        low, high, log = spec.get("low"), spec.get("high"), bool(spec.get("log", False))
        number = int if kind == "int" else (int, float)
        if not isinstance(low, number) or not isinstance(high, number) or isinstance(low, bool):
            raise SearchSpaceError(f"{where}: 'low' and 'high' must be {kind} numbers")
        if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
            raise SearchSpaceError(f"{where}: needs low < high, got {low} and {high}")
        if log and low <= 0:
            raise SearchSpaceError(f"{where}: a log scale needs low > 0, got {low}")
        out[name] = {"type": kind, "low": low, "high": high, "log": log}
    return out


# -- storage ----------------------------------------------------------------------------


def journal_path(storage_url: str) -> Path | None:
    """The journal file next to a SQLite database (``optuna.db`` -> ``optuna.journal``).

    ``None`` for a URL that is not a SQLite file (PostgreSQL...).

    Raises
    ------
    AstrError
        For an in-memory SQLite URL, which no second process can share.
    """
    database = _sqlite_file(storage_url)
    if database is None:
        return None
    journal = database.with_suffix(".journal")
    return journal if journal != database else database.with_name(database.name + ".journal")


def open_storage(storage_url: str, study_name: str, *, parallel: bool = False) -> Any:
    """The Optuna storage that holds (or will hold) ``study_name``.

    A non-SQLite URL (PostgreSQL...) is an ``RDBStorage`` as given: it takes parallel
    writers. A SQLite URL does not, so a study that several processes work on lives
    in an Optuna journal file next to the database (``journal_path``), appended under
    a file lock. A study is always found where it was started: in the journal when
    the journal holds it, else in the SQLite file.

    Parameters
    ----------
    parallel : bool
        More than one process will work on the study.

    Raises
    ------
    AstrError
        When ``parallel`` and the study was started by a single process in the SQLite
        file (the message says how to go on), or the SQLite database is in memory.
    """
    import optuna

    journal = journal_path(storage_url) if parallel else _maybe_journal(storage_url)
    if journal is None:
        # pool_pre_ping: a pooled connection is checked before use, so a storage that
        # outlives a PostgreSQL restart reconnects instead of failing its next trial.
        return optuna.storages.RDBStorage(storage_url, engine_kwargs={"pool_pre_ping": True})
    if journal.is_file():
        existing = _journal_storage(journal)  # reads the whole journal: build it once
        if _holds(existing, study_name):
            return existing
    if not parallel:
        return optuna.storages.RDBStorage(storage_url)
    database = _sqlite_file(storage_url)
    if database is not None and database.is_file() and _holds_in_rdb(storage_url, study_name):
        raise AstrError(
            f"study {study_name!r} was started by one process in the SQLite file "
            f"{database}, which breaks under parallel writers: resume it with one "
            "process (n_workers=1), give the search another study name, or use "
            "PostgreSQL (ASTR_OPTUNA_STORAGE_URL=postgresql+psycopg://user:pw@host/db)"
        )
    journal.parent.mkdir(parents=True, exist_ok=True)
    return _journal_storage(journal)


@contextlib.contextmanager
def opened_storage(storage_url: str, study_name: str, *, parallel: bool = False) -> Iterator[Any]:
    """``open_storage`` for the block; its connections are released after it."""
    storage = open_storage(storage_url, study_name, parallel=parallel)
    try:
        yield storage
    finally:
        close_storage(storage)


def close_storage(storage: Any) -> None:
    """Release the database connections of an ``RDBStorage`` (a no-op for a journal).

    A study loaded on it afterwards connects again.
    """
    import optuna

    if isinstance(storage, optuna.storages.RDBStorage):
        storage.remove_session()
        storage.engine.dispose()


def _sqlite_file(storage_url: str) -> Path | None:
    from sqlalchemy.engine import make_url

    url = make_url(storage_url)
    if not url.drivername.startswith("sqlite"):
        return None
    if not url.database or url.database == ":memory:":
        raise AstrError(
            f"{storage_url!r} is an in-memory SQLite database, which other processes "
            "cannot share: give a file, e.g. sqlite:////path/optuna.db"
        )
    return Path(url.database).resolve()


def _maybe_journal(storage_url: str) -> Path | None:
    """``journal_path``, or ``None`` for an in-memory database (one process: allowed)."""
    try:
        return journal_path(storage_url)
    except AstrError:
        return None


def _journal_storage(path: Path) -> Any:
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock

    backend = JournalFileBackend(str(path), lock_obj=JournalFileOpenLock(str(path)))
    return optuna.storages.JournalStorage(backend)


def _holds_in_rdb(storage_url: str, study_name: str) -> bool:
    import optuna

    storage = optuna.storages.RDBStorage(storage_url)
    try:
        return _holds(storage, study_name)
    finally:
        close_storage(storage)


def _holds(storage: Any, study_name: str) -> bool:
    try:
        storage.get_study_id_from_name(study_name)
    except KeyError:
        return False
    return True


# -- the study --------------------------------------------------------------------------


def create_search_study(
    storage: Any,
    study_name: str,
    search_space: Mapping[str, Any],
    *,
    dataset_id: str,
    n_trials: int,
    base: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> optuna.Study:
    """Create or resume a study and queue the trials still missing from its budget.

    Stores what a joining worker needs in the study's ``user_attrs[SPEC_ATTR]``
    (search space, dataset id, shared settings, budget, seed), marks the running
    trials of workers that are gone as failed (``fail_abandoned_trials``), then puts
    ``n_trials`` minus the study's trials in the queue as waiting trials.

    Parameters
    ----------
    storage
        From ``open_storage``.
    n_trials : int
        Trials wanted in the study in all (complete, pruned or failed).
    base : mapping, optional
        Settings every trial shares (``epochs``, ``device``...).

    Raises
    ------
    SearchSpaceError
        A malformed space or ``n_trials`` below 1.
    ValueError
        An unknown shared setting (named).
    """
    import optuna

    space = validate_search_space(search_space)
    if n_trials < 1:
        raise SearchSpaceError(f"n_trials must be at least 1, got {n_trials}")
    base = dict(base or {})
    TrainConfig.from_dict(base)  # names a bad base setting before any trial
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="minimize",
        sampler=_sampler(seed),
        pruner=_pruner(),
        load_if_exists=True,
    )
    spec = {
        "search_space": space,
        "base": base,
        "dataset_id": dataset_id,
        "n_trials": int(n_trials),
        "seed": int(seed),
    }
    study.set_user_attr(SPEC_ATTR, spec)
    fail_abandoned_trials(study)
    for _ in range(n_trials - len(study.get_trials(deepcopy=False))):
        study.enqueue_trial({})
    return study


def load_search_study(
    storage: Any, study_name: str, *, worker_index: int | None = None
) -> optuna.Study:
    """An existing search study, with the sampler and pruner of ``create_search_study``.

    Parameters
    ----------
    worker_index : int, optional
        Worker ``k`` samples with seed ``spec seed + k`` (the creator is worker 0);
        ``None``: an unseeded sampler (a worker joining from elsewhere).

    Raises
    ------
    AstrError
        No such study, or one that holds no search spec.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.load_study(study_name=study_name, storage=storage, pruner=_pruner())
    except KeyError:
        raise AstrError(
            f"no study {study_name!r} in this Optuna storage: start the search first "
            "(`astr hpo ...` prints the study name), and give the worker the same storage"
        ) from None
    spec = search_spec(study)
    study.sampler = _sampler(None if worker_index is None else spec["seed"] + worker_index)
    return study


def search_spec(study: optuna.Study) -> dict[str, Any]:
    """What ``create_search_study`` stored: space, base, dataset id, budget, seed.

    Raises
    ------
    AstrError
        When the study was not created by ``create_search_study``.
    """
    spec = study.user_attrs.get(SPEC_ATTR)
    if not isinstance(spec, Mapping):
        raise AstrError(
            f"study {study.study_name!r} holds no search spec (user attribute "
            f"{SPEC_ATTR!r}): it was not started by `astr hpo` or run_search; "
            "run the search once with them to store one"
        )
    return dict(spec)


def read_search_spec(storage_url: str, study_name: str) -> dict[str, Any]:
    """The search spec of a study that other processes may join (``search_spec``).

    Raises
    ------
    AstrError
        No such study, no spec, or a study started by one process in SQLite.
    """
    with opened_storage(storage_url, study_name, parallel=True) as storage:
        return search_spec(load_search_study(storage, study_name))


def summarize_study(study: optuna.Study) -> SearchResult:
    """Best parameters and trial counts of a study.

    Raises
    ------
    AstrError
        When no trial has completed.
    """
    import optuna

    states = [t.state for t in study.get_trials(deepcopy=False)]
    n_complete = states.count(optuna.trial.TrialState.COMPLETE)
    if not n_complete:
        raise AstrError(f"study {study.study_name}: no trial completed ({len(states)} tried)")
    return SearchResult(
        study_name=study.study_name,
        best_params=dict(study.best_params),
        best_value=float(study.best_value),
        n_complete=n_complete,
        n_pruned=states.count(optuna.trial.TrialState.PRUNED),
        n_failed=states.count(optuna.trial.TrialState.FAIL),
    )


def _sampler(seed: int | None) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed)


def _pruner() -> Any:
    """The pruner every process of a study uses (pruners are not stored with the study).

    A trial goes on while its best validation loss is at or below the median of the
    complete trials' at the same epoch. No trial is pruned before two have completed,
    nor before its second epoch: the first is the learning rate's warm-up, and its loss
    favours high rates (one trial was the worst of 20 after epoch 1 and among the best
    after epoch 3). Keeping only the best quarter instead (a percentile pruner) was
    tried in two 20-trial searches on two processes: 31.3 and 34.4 min against 32.2 and
    34.0 with the median, because trials it pruned late had run 7-8 of their 10 epochs.
    """
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=2)


# -- workers ----------------------------------------------------------------------------


def worker_stamp() -> dict[str, Any]:
    """Who this process is: host name, pid and start time (which a reused pid lacks)."""
    import psutil

    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": psutil.Process().create_time(),
    }


def fail_abandoned_trials(study: optuna.Study) -> list[int]:
    """Mark failed the running trials whose worker process is gone; returns their numbers.

    A worker is known gone when it ran on this host and its process no longer exists
    (or is another process under the same pid). A running trial without a worker
    stamp older than ``UNNAMED_GRACE_S`` is abandoned too. Running trials of workers
    on other hosts are left alone: this host cannot tell whether they still run.
    """
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    now = dt.datetime.now()
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if not _abandoned(trial.user_attrs.get(WORKER_ATTR), trial.datetime_start, now):
            continue
        try:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        except (UpdateFinishedTrialError, RuntimeError, ValueError):
            continue  # another worker finished or failed it first
        owner = trial.user_attrs.get(WORKER_ATTR) or {}
        logger.warning(
            "study %s: trial %d failed: its worker (pid %s on %s) is gone",
            study.study_name,
            trial.number,
            owner.get("pid", "?"),
            owner.get("host", "?"),
        )
        failed.append(trial.number)
    return failed


def _abandoned(owner: Any, started: dt.datetime | None, now: dt.datetime) -> bool:
    if not isinstance(owner, Mapping):
        return started is None or (now - started).total_seconds() > UNNAMED_GRACE_S
    if owner.get("host") != socket.gethostname():
        return False
    return not _process_alive(int(owner["pid"]), float(owner["started"]))


def _process_alive(pid: int, started: float) -> bool:
    import psutil

    try:
        process = psutil.Process(pid)
        return (
            abs(process.create_time() - started) < 0.5 and process.status() != psutil.STATUS_ZOMBIE
        )
    except psutil.NoSuchProcess:
        return False


def work_on_study(
    study: optuna.Study,
    storage: Any,
    data: CandidateDataset,
    *,
    deadline: float | None = None,
    tracker: TrialTracker | None = None,
) -> tuple[int, ...]:
    """Claim and run the study's waiting trials one by one until none is left.

    Each claimed trial carries this process's ``worker_stamp`` in its
    ``user_attrs[WORKER_ATTR]``. Before each claim the trials of gone workers are
    marked failed. A trial that raises ``ValueError`` (a setting the model refuses)
    fails and the work goes on; any other error fails the trial and is raised.

    Parameters
    ----------
    storage
        The storage the study was loaded from (``open_storage``).
    data : CandidateDataset
        Must be the dataset the search was started on.
    deadline : float, optional
        ``time.time()`` after which no trial starts.

    Returns
    -------
    tuple of int
        The numbers of the trials this process ran.

    Raises
    ------
    AstrError
        When ``data`` is not the search's dataset.
    """
    spec = search_spec(study)
    if data.dataset_id != spec["dataset_id"]:
        raise AstrError(
            f"study {study.study_name!r} searches on dataset {spec['dataset_id']}, not "
            f"{data.dataset_id}: give the worker that dataset (`astr dataset ...` or its .npz)"
        )
    study_id = storage.get_study_id_from_name(study.study_name)
    stamp = worker_stamp()
    ran: list[int] = []
    held: TrainingInputs | None = None  # the last trial's normalised stamps, reused
    while deadline is None or time.time() < deadline:
        fail_abandoned_trials(study)
        trial = _claim(study, storage, study_id)
        if trial is None:
            break
        trial.set_user_attr(WORKER_ATTR, stamp)
        held = _run_trial(study, trial, data, spec, tracker, held)
        ran.append(trial.number)
    return tuple(ran)


def _claim(study: optuna.Study, storage: Any, study_id: int) -> optuna.Trial | None:
    """Atomically move one waiting trial to running; ``None`` when none is left."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError

    for waiting in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, waiting.number)
        try:
            if storage.set_trial_state_values(trial_id, state=optuna.trial.TrialState.RUNNING):
                return optuna.Trial(study, trial_id)
        except UpdateFinishedTrialError:
            continue
    return None


def _run_trial(
    study: optuna.Study,
    trial: optuna.Trial,
    data: CandidateDataset,
    spec: Mapping[str, Any],
    tracker: TrialTracker | None,
    held: TrainingInputs | None = None,
) -> TrainingInputs | None:
    """Train one trial's settings and tell the study how it ended.

    ``held``: normalised stamps of an earlier trial, used when this trial's network reads
    the same ones. Returns the stamps this trial trained on (``held`` when it ends before
    making any).
    """
    import optuna

    state = optuna.trial.TrialState
    status = "FAILED"
    try:
        params = {name: _suggest(trial, name, s) for name, s in spec["search_space"].items()}
        if tracker is not None:
            tracker.start(trial.number, params)
        config = TrainConfig.from_dict(
            {**spec["base"], **params, "seed": spec["seed"] + trial.number}
        )

        def on_epoch(epoch: int, metrics: Mapping[str, float]) -> None:
            trial.report(metrics["val_loss"], epoch)
            if tracker is not None:
                tracker.epoch(trial.number, epoch, metrics)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        if held is None or not held.suit(data, config.model):
            held = training_inputs(data, config.model)
        model = train_model(data, config, on_epoch=on_epoch, inputs=held)
    except optuna.TrialPruned:
        status = "KILLED"
        study.tell(trial, state=state.PRUNED)
    except ValueError as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=state.FAIL)
        logger.warning("study %s: trial %d failed: %s", study.study_name, trial.number, exc)
    except BaseException as exc:
        trial.set_user_attr("error", f"{type(exc).__name__}: {exc}")
        study.tell(trial, state=state.FAIL)
        raise
    else:
        status = "FINISHED"
        # the trial's value is the validation loss of the epoch the trained model keeps
        # (the best-separating one), not the lowest over all epochs: the study ranks
        # settings by the models they make
        kept = next(h for h in model.history if h["epoch"] == model.best_epoch)
        trial.set_user_attr(KEPT_EPOCH_ATTR, int(model.best_epoch))
        study.tell(trial, float(kept["val_loss"]))
    finally:
        if tracker is not None and trial.number in tracker.runs:
            tracker.end(trial.number, status)
    return held


# -- searches ---------------------------------------------------------------------------


def run_search(
    data: CandidateDataset,
    search_space: Mapping[str, Any],
    *,
    storage_url: str,
    study_name: str,
    n_trials: int,
    timeout: float | None = None,
    base: Mapping[str, Any] | None = None,
    seed: int = 0,
    tracking_uri: str | None = None,
    n_workers: int = 1,
) -> SearchResult:
    """Minimise the best validation loss over ``search_space``; resume a study by name.

    Parameters
    ----------
    n_trials : int
        Total finished trials wanted in the study (complete, pruned or failed);
        a resumed study runs only the missing ones.
    timeout : float, optional
        Seconds after which no new trial starts.
    base : mapping, optional
        Settings every trial shares (``epochs``, ``device``...).
    n_workers : int
        Processes working on the study: this one and ``n_workers - 1`` spawned ones,
        each with ``1/n_workers`` of the cores' torch threads
        (``pipeline.ml.search_workers``). With a SQLite ``storage_url`` and more
        than one worker the study lives in a journal file next to the database
        (``open_storage``). Workers on other hosts join with ``join_search``
        (``astr hpo-worker``) given a storage they share: PostgreSQL, or the
        journal of a SQLite study started with more than one worker.

    Raises
    ------
    SearchSpaceError
        A malformed space or setting.
    AstrError
        No trial completed, or the storage cannot take several workers.
    """
    if n_workers < 1:
        raise SearchSpaceError(f"n_workers must be at least 1, got {n_workers}")
    with opened_storage(storage_url, study_name, parallel=n_workers > 1) as storage:
        study = create_search_study(
            storage,
            study_name,
            search_space,
            dataset_id=data.dataset_id,
            n_trials=n_trials,
            base=base,
            seed=seed,
        )
        tracker = TrialTracker(tracking_uri, study_name) if tracking_uri else None
        if tracker is not None:
            study.set_user_attr(PARENT_RUN_ATTR, tracker.parent)
        deadline = None if timeout is None else time.time() + timeout
        try:
            if n_workers > 1:
                from pipeline.ml.search_workers import work_with_processes

                work_with_processes(
                    study,
                    storage,
                    data,
                    n_workers=n_workers,
                    storage_url=storage_url,
                    deadline=deadline,
                    tracking_uri=tracking_uri,
                    tracker=tracker,
                )
            else:
                work_on_study(study, storage, data, deadline=deadline, tracker=tracker)
        finally:
            if tracker is not None:
                tracker.close()
        return summarize_study(study)


def join_search(
    data: CandidateDataset,
    *,
    storage_url: str,
    study_name: str,
    timeout: float | None = None,
    tracking_uri: str | None = None,
    worker_index: int | None = None,
) -> WorkerResult:
    """Work on an existing search from this process until its trial budget is met.

    The study gives the search space, shared settings and budget; ``data`` must be
    the dataset it was started on. With ``tracking_uri`` the trials nest under the
    search's MLflow run. The workers ``run_search`` spawns run this too.

    Parameters
    ----------
    timeout : float, optional
        Seconds after which this worker starts no trial.
    worker_index : int, optional
        Seeds the sampler with the search's seed plus this (``load_search_study``);
        ``None``: unseeded.

    Raises
    ------
    AstrError
        No such study, another dataset, or a study started by one process in SQLite.
    """
    import optuna

    with opened_storage(storage_url, study_name, parallel=True) as storage:
        study = load_search_study(storage, study_name, worker_index=worker_index)
        tracker = None
        if tracking_uri:
            parent = study.user_attrs.get(PARENT_RUN_ATTR)
            tracker = TrialTracker(tracking_uri, study_name, parent_run_id=parent)
        deadline = None if timeout is None else time.time() + timeout
        try:
            ran = work_on_study(study, storage, data, deadline=deadline, tracker=tracker)
        finally:
            if tracker is not None:
                tracker.close()
        state = optuna.trial.TrialState
        finished = study.get_trials(
            deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.FAIL)
        )
        return WorkerResult(
            study_name=study_name,
            trials_run=ran,
            n_finished=len(finished),
            n_trials=int(search_spec(study)["n_trials"]),
        )


def _suggest(trial: Any, name: str, spec: Mapping[str, Any]) -> Any:
    if spec["type"] == "categorical":
        return trial.suggest_categorical(name, spec["choices"])
    if spec["type"] == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec["log"])
    return trial.suggest_float(name, spec["low"], spec["high"], log=spec["log"])


class TrialTracker:
    """One MLflow parent run for a search, one nested run per trial.

    Given ``parent_run_id`` (a worker of a search started elsewhere) it nests under
    that run and leaves it open.
    """

    def __init__(
        self, tracking_uri: str, study_name: str, parent_run_id: str | None = None
    ) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri)
        name = "realbogus-search"
        found = self.client.get_experiment_by_name(name)
        self.experiment = found.experiment_id if found else self.client.create_experiment(name)
        self.owner = parent_run_id is None
        if parent_run_id is None:
            parent_run_id = self.client.create_run(self.experiment, run_name=study_name).info.run_id
        self.parent = parent_run_id
        self.runs: dict[int, str] = {}

    def start(self, number: int, params: Mapping[str, Any]) -> None:
        """Open trial ``number``'s nested run and log its parameters."""
        run = self.client.create_run(
            self.experiment,
            run_name=f"trial-{number}",
            tags={"mlflow.parentRunId": self.parent, "optuna.trial": str(number)},
        )
        self.runs[number] = run.info.run_id
        for key, value in params.items():
            self.client.log_param(run.info.run_id, key, str(value))

    def epoch(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        """Log one epoch's metrics of trial ``number``."""
        for key, value in metrics.items():
            self.client.log_metric(self.runs[number], key, float(value), step=epoch)

    def end(self, number: int, status: str) -> None:
        """Close trial ``number``'s run (``FINISHED``, ``KILLED`` or ``FAILED``)."""
        self.client.set_terminated(self.runs[number], status)

    def close(self) -> None:
        """Close the search's run when this tracker opened it."""
        if self.owner:
            self.client.set_terminated(self.parent, "FINISHED")
