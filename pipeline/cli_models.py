"""The ``astr`` commands of the real/bogus model: datasets, train, search, deploy...

Each command runs the matching flow of ``pipeline.flows.training`` in this process,
against the configured Prefect server (started locally when none answers), so every
run also shows in Prefect's UI and in MLflow's.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline.cli_util import flatten
from pipeline.config import get_config

__all__ = ["dataset_app", "models_app", "register"]

console = Console()
# MLflow announces its table creation at INFO on a fresh home: not news for the user.
logging.getLogger("mlflow").setLevel(logging.WARNING)
#: Progress and notes go to stderr, so ``--json`` output on stdout stays parseable.
notes = Console(stderr=True)
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
VerboseFlag = Annotated[
    bool, typer.Option("--verbose", "-v", help="Also print flow and notebook logs here.")
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        help="A training setting, KEY=VALUE (repeatable), e.g. --set epochs=20 --set width=16.",
    ),
]
EnvOption = Annotated[
    str, typer.Option("--env", help="Environment (alias): production or staging.")
]

models_app = typer.Typer(help="Versions of the real/bogus model.", no_args_is_help=True)
dataset_app = typer.Typer(help="Labelled candidate datasets for training.", no_args_is_help=True)


def register(app: typer.Typer) -> None:
    """Add the model commands and groups to the ``astr`` app."""
    app.add_typer(models_app, name="models")
    app.add_typer(dataset_app, name="dataset")
    for name, command in (
        ("train", train),
        ("hpo", hpo),
        ("hpo-worker", hpo_worker),
        ("evaluate", evaluate),
        ("deploy", deploy),
        ("rollback", rollback),
        ("retrain", retrain),
    ):
        app.command(name)(command)


def parse_settings(pairs: list[str] | None) -> dict[str, Any]:
    """``["epochs=20", "augment=false"]`` -> ``{"epochs": 20, "augment": False}``.

    Values are read as JSON when they parse (numbers, true/false, lists), else kept
    as strings.
    """
    settings: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--set {pair!r}: expected KEY=VALUE, e.g. epochs=20")
        try:
            settings[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            settings[key.strip()] = value
    return settings


def _json_argument(text: str, what: str) -> Any:
    """A JSON value given inline or as a path to a JSON file."""
    path = Path(text)
    if not text.lstrip().startswith(("{", "[")) and path.is_file():
        text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{what}: not JSON (nor a JSON file): {exc}") from None


def _check_settings(values: dict[str, Any], option: str = "--set") -> dict[str, Any]:
    """Training settings checked before any flow starts (a usage error names the key)."""
    from pipeline.ml.train import TrainConfig

    try:
        TrainConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from None
    return values


def _start(verbose: bool) -> None:
    """Quiet Prefect's console unless asked, and make sure a server answers.

    A failing flow's error is printed once, by ``astr`` itself; Prefect's own account
    (with its traceback) stays in the run's logs on the server.
    """
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    from pipeline.workflow.prefect_server import ensure_server

    url, how = ensure_server(get_config())
    ui = url.removesuffix("/api")
    verb = "started the local" if how == "started" else "using the"
    notes.print(f"{verb} Prefect server at {ui}", style="dim")


def _show(result: dict[str, Any], as_json: bool, title: str) -> None:
    if as_json:
        typer.echo(json.dumps(result, indent=2, default=str))
        return
    table = Table(title=title, show_header=False)
    for key, value in flatten(result):
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


# -- datasets -------------------------------------------------------------------------


@dataset_app.command("simulate")
def dataset_simulate(
    pairs: Annotated[int, typer.Option(min=3, help="Simulated pairs (images).")] = 24,
    size: Annotated[int, typer.Option(min=256, max=4096, help="Image side (pixels).")] = 512,
    seed: Annotated[int, typer.Option(help="Seed of the first pair (then +1...).")] = 0,
    vary: Annotated[
        bool,
        typer.Option(help="Draw each pair's seeing, sky, depth and artefacts from its seed."),
    ] = True,
    verbose: VerboseFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Label what our pipeline detects in simulated pairs and store it as a dataset.

    Every detection becomes a triplet labelled real (an injected transient) or by its
    bogus kind; splits are by image. Prints the dataset id for `astr train`.
    """
    from pipeline.flows.training import candidate_dataset_flow

    _start(verbose)
    with notes.status(f"running the pipeline on {pairs} simulated {size}² pairs"):
        result = candidate_dataset_flow(pairs=pairs, size=size, first_seed=seed, vary=vary)
    _show(result, as_json, f"dataset {result['dataset_id']}")


@dataset_app.command("list")
def dataset_list(as_json: JsonFlag = False) -> None:
    """The stored datasets: id, candidates, real fraction, images per split."""
    import numpy as np

    from pipeline.flows.training import datasets_dir
    from pipeline.ml.data import load_dataset

    rows = []
    folder = datasets_dir(get_config())
    for path in sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime):
        data = load_dataset(path)
        images = {
            s: len(set(data.image[data.split == s].tolist()))
            for s in ("train", "validation", "test")
        }
        rows.append(
            {
                "dataset_id": path.stem,
                "candidates": len(data),
                "real": int(np.sum(data.label)),
                "images": images,
            }
        )
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table(title=f"datasets in {folder}")
    for column in ("dataset_id", "candidates", "real", "images train/val/test"):
        table.add_column(column)
    for row in rows:
        i = row["images"]
        table.add_row(
            row["dataset_id"],
            str(row["candidates"]),
            str(row["real"]),
            f"{i['train']}/{i['validation']}/{i['test']}",
        )
    console.print(table)


# -- the model flows ------------------------------------------------------------------


def train(
    dataset: Annotated[
        str | None, typer.Option(help="Dataset id (default: the latest stored).")
    ] = None,
    config: Annotated[
        str | None, typer.Option(help="Training settings as JSON (inline or a file).")
    ] = None,
    settings: SetOption = None,
    deploy_to: Annotated[
        str | None,
        typer.Option("--deploy", help="Then deploy to this environment if it beats the holder."),
    ] = None,
    verbose: VerboseFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Train, calibrate and evaluate a model; log it to MLflow as a new version."""
    from pipeline.flows.training import (
        dataset_path,
        latest_dataset,
        model_deployment_flow,
        model_training_flow,
    )

    values = _json_argument(config, "--config") if config else {}
    values.update(parse_settings(settings))
    _check_settings(values)
    dataset_id = dataset or latest_dataset()
    dataset_path(dataset_id)  # an unknown id fails here, naming what is stored
    _start(verbose)
    with notes.status(f"training on dataset {dataset_id}"):
        result = model_training_flow(dataset_id, values)
    if deploy_to:
        result["deployment"] = model_deployment_flow(result["model_id"], deploy_to)
    _show(result, as_json, f"model version {result['model_id']}")


def hpo(
    search_space: Annotated[
        str, typer.Argument(help="The search space as JSON (inline or a file).")
    ],
    trials: Annotated[int, typer.Option(min=1, help="Finished trials wanted.")] = 20,
    timeout: Annotated[
        float | None, typer.Option(help="No new trial after this many seconds.")
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset id (default: the latest stored).")
    ] = None,
    settings: SetOption = None,
    model_type: Annotated[str, typer.Option(help="Architecture to tune.")] = "cnn",
    no_train: Annotated[
        bool, typer.Option("--no-train", help="Only search; do not train the best settings.")
    ] = False,
    workers: Annotated[
        int,
        typer.Option(min=1, help="Processes sharing the trials (and the cores) on this machine."),
    ] = 1,
    verbose: VerboseFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Search training settings with Optuna (resumes an interrupted study), train the best.

    Other hosts add workers to the search with `astr hpo-worker --study NAME`.
    """
    from pipeline.flows.training import hyperparameter_optimization_flow

    space = _json_argument(search_space, "SEARCH_SPACE")
    _start(verbose)
    how = f"{trials} trials" + (f", {workers} processes" if workers > 1 else "")
    with notes.status(f"searching ({how})"):
        result = hyperparameter_optimization_flow(
            model_type,
            space,
            dataset_id=dataset,
            n_trials=trials,
            timeout_s=timeout,
            base_config=_check_settings(parse_settings(settings)),
            train_best=not no_train,
            n_workers=workers,
        )
    result.pop("training", None)
    _show(result, as_json, f"study {result['study_name']}")


def hpo_worker(
    study: Annotated[
        str, typer.Option("--study", help="The study to join (the name `astr hpo` shows).")
    ],
    storage: Annotated[
        str | None,
        typer.Option(help="Optuna storage URL (default: this host's optuna_storage_url)."),
    ] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="The study's dataset as a .npz file or a stored id "
            "(default: the study's dataset id, stored on this host)."
        ),
    ] = None,
    timeout: Annotated[
        float | None, typer.Option(help="No new trial after this many seconds.")
    ] = None,
    threads: Annotated[
        int | None, typer.Option(min=1, help="Torch threads (default: torch's own choice).")
    ] = None,
    track: Annotated[
        bool, typer.Option(help="Log each trial to MLflow, nested under the search's run.")
    ] = True,
    as_json: JsonFlag = False,
) -> None:
    """Run trials of a search started elsewhere, in this process, until its budget is met.

    The study holds its search space, dataset id, shared settings and trial budget;
    this host needs the same Optuna storage (PostgreSQL, or the SQLite journal on a
    shared disk) and the dataset.
    """
    from pipeline.ml.search import join_search, read_search_spec

    config = get_config()
    url = storage or config.optuna_storage_url
    spec = read_search_spec(url, study)
    data = _search_dataset(dataset or spec["dataset_id"])
    if threads:
        import torch

        torch.set_num_threads(threads)
    with notes.status(f"working on study {study} ({spec['n_trials']} trials in all)"):
        result = join_search(
            data,
            storage_url=url,
            study_name=study,
            timeout=timeout,
            tracking_uri=config.mlflow_tracking_uri if track else None,
        )
    shown = {
        "study_name": result.study_name,
        "trials_run_here": list(result.trials_run),
        "n_finished": result.n_finished,
        "n_trials": result.n_trials,
    }
    _show(shown, as_json, f"study {study}: this worker")


def _search_dataset(dataset: str) -> Any:
    """A dataset given as a ``.npz`` path or as an id stored on this host."""
    from pipeline.flows.training import dataset_path
    from pipeline.ml.data import load_dataset

    path = Path(dataset)
    return load_dataset(path if path.suffix == ".npz" else dataset_path(dataset))


def evaluate(
    model_id: Annotated[str, typer.Argument(help="Model version.")],
    dataset: Annotated[str, typer.Option(help="Dataset id to measure on (its test split).")],
    baseline: Annotated[
        str, typer.Option(help="Also measure this environment or version ('none': skip).")
    ] = "production",
    verbose: VerboseFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Measure a model version on a dataset, side by side with a baseline."""
    from pipeline.flows.training import model_evaluation_flow

    _start(verbose)
    with notes.status(f"evaluating v{model_id} on {dataset}"):
        result = model_evaluation_flow(model_id, dataset, None if baseline == "none" else baseline)
    _show(result, as_json, f"v{model_id} on {dataset}")


def deploy(
    model_id: Annotated[str, typer.Argument(help="Model version.")],
    env: EnvOption = "production",
    force: Annotated[
        bool, typer.Option("--force", help="Deploy even if it does not beat the holder.")
    ] = False,
    verbose: VerboseFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Move an environment to a version if it beats the current holder on the same test set."""
    from pipeline.flows.training import model_deployment_flow

    _start(verbose)
    result = model_deployment_flow(model_id, env, force=force)
    _show(result, as_json, "deployed" if result["deployed"] else "not deployed")
    if not result["deployed"] and result["reason"] != "already deployed":
        raise typer.Exit(1)


def rollback(
    env: EnvOption = "production", verbose: VerboseFlag = False, as_json: JsonFlag = False
) -> None:
    """Give an environment back to the version its current holder replaced."""
    from pipeline.flows.runtime import model_registry
    from pipeline.flows.training import model_rollback_flow

    model_registry(get_config()).rollback_target(env)  # names why not
    _start(verbose)
    _show(model_rollback_flow(env), as_json, "rolled back")


def retrain(
    model_id: Annotated[str, typer.Argument(help="Model version to retrain.")],
    new_data: Annotated[str, typer.Option("--new-data", help="Dataset id to add.")],
    scratch: Annotated[
        bool, typer.Option("--scratch", help="Train from scratch instead of fine-tuning.")
    ] = False,
    settings: SetOption = None,
    env: EnvOption = "production",
    verbose: VerboseFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Retrain on the model's data plus new data; promote only if it beats the holder."""
    from pipeline.flows.training import model_retraining_flow

    _start(verbose)
    with notes.status(f"retraining v{model_id} with {new_data}"):
        result = model_retraining_flow(
            model_id,
            new_data,
            config=parse_settings(settings),  # checked with the model's own settings
            fine_tune=not scratch,
            environment=env,
        )
    _show(result, as_json, f"model version {result['model_id']}")


@models_app.command("drift")
def models_drift(
    since: Annotated[
        str | None, typer.Option(help="Start of the window, ISO 8601 (default: a day ago).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="End of the window (default: now).")] = None,
    env: EnvOption = "production",
    verbose: VerboseFlag = False,
    as_json: JsonFlag = False,
) -> None:
    """Score drift of the deployed model over a night (PSI against its training scores)."""
    from pipeline.flows.drift import drift_window, score_drift_flow

    drift_window(since, until)  # a bad time fails here, before any flow starts
    _start(verbose)
    _show(score_drift_flow(since, until, env), as_json, "score drift")


@models_app.command("list")
def models_list(as_json: JsonFlag = False) -> None:
    """Every version of the real/bogus model: aliases, dataset and test metrics."""
    from pipeline.flows.runtime import model_registry

    config = get_config()
    uri = config.mlflow_tracking_uri
    missing = uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists()
    rows = [] if missing else model_registry(config).versions()  # nothing created just to look
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        console.print("no model versions yet: `astr dataset simulate` then `astr train`")
        return
    table = Table(title=f"realbogus in {config.mlflow_tracking_uri}")
    for column in ("version", "aliases", "created", "dataset", "AUC", "FPR", "at FNR", "ECE"):
        table.add_column(column)
    for row in rows:
        m = row["metrics"]

        def fmt(key: str, m: dict = m) -> str:
            return f"{m[key]:.4f}" if key in m else "-"

        table.add_row(
            str(row["version"]),
            ", ".join(row["aliases"]) or "-",
            row["created"],
            row["dataset_id"],
            fmt("auc"),
            fmt("fpr"),
            fmt("fnr"),
            fmt("ece"),
        )
    console.print(table)
