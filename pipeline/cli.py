"""The ``astr`` command."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline import __version__
from pipeline.cli_models import register as register_model_commands
from pipeline.cli_ops import register as register_ops_commands
from pipeline.cli_util import flatten
from pipeline.config import describe, get_config
from pipeline.errors import AstrError
from pipeline.store import ArtifactStore, Catalogue, migrate
from pipeline.workflow.prefect_server import PrefectServer

__all__ = ["app", "main"]

app = typer.Typer(
    name="astr",
    help="Find astronomical transients: difference imaging, detection and real/bogus "
    "scoring run as parameterized notebooks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Inspect the effective settings.", no_args_is_help=True)
store_app = typer.Typer(help="Observation catalogue and artifact storage.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(store_app, name="store")
server_app = typer.Typer(help="The local Prefect server (UI and API).", no_args_is_help=True)
app.add_typer(server_app, name="server")

console = Console()
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")]
VerboseFlag = Annotated[
    bool, typer.Option("--verbose", "-v", help="Also print flow and notebook logs here.")
]


def main() -> None:
    """Entry point of the ``astr`` console script."""
    try:
        app()
    except AstrError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False)
        raise SystemExit(2) from None


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True)
    ] = False,
) -> None:
    if version:
        console.print(f"astr-pipeline {__version__}")
        raise typer.Exit()


@config_app.command("show")
def config_show(as_json: JsonFlag = False) -> None:
    """Print the effective settings (defaults, environments/<env>.toml, ASTR_* variables).

    Secrets are masked.
    """
    data = describe(get_config())
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table(title=f"astr settings ({data['environment']})", show_header=False)
    for key, value in flatten(data):
        table.add_row(key, str(value))
    console.print(table)


@store_app.command("init")
def store_init() -> None:
    """Create the catalogue (running its migrations) and the artifact root."""
    status = _store_status()
    console.print(f"catalogue ready at revision {status['revision']}: {status['database_url']}")
    console.print(f"artifacts under {status['storage_url']}")


@store_app.command("status")
def store_status(as_json: JsonFlag = False) -> None:
    """Show the catalogue's schema revision, record counts and the storage check."""
    status = _store_status()
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    table = Table(title="astr store", show_header=False)
    for key, value in flatten(status):
        table.add_row(key, str(value))
    console.print(table)


@app.command("observe")
def observe(
    science: Annotated[Path | None, typer.Option("--science", help="Science image (FITS).")] = None,
    reference: Annotated[
        Path | None, typer.Option("--reference", help="Reference image of the same field.")
    ] = None,
    manifest: Annotated[
        Path | None,
        typer.Option(
            "--manifest",
            help="CSV of pairs (science_path, reference_path, optional name, band, mjd...) "
            "run concurrently within max_concurrent_flows.",
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", help="Where candidates.ecsv and reports/ go.")
    ] = Path("astr-output"),
    band: Annotated[str | None, typer.Option(help="Filter band (overrides the header).")] = None,
    mjd: Annotated[float | None, typer.Option(help="MJD of the science exposure.")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rerun every step, ignoring cached results.")
    ] = False,
    verbose: VerboseFlag = False,
) -> None:
    """Find transients in a science image against a reference: all five pipeline steps.

    Writes OUTPUT/candidates.ecsv and OUTPUT/reports/<step>.html (with --manifest,
    one folder per pair under OUTPUT).
    """
    if manifest is not None and (science or reference):
        raise typer.BadParameter("give either --manifest or --science/--reference, not both")
    if manifest is None and not (science and reference):
        raise typer.BadParameter("give --science and --reference (or --manifest)")
    from pipeline.flows.submit import read_manifest

    if manifest is not None:
        items = read_manifest(manifest)
        for name, data in items:
            data.setdefault("output_dir", str((output / name).resolve()))
            data["force"] = data.get("force", False) or force
    else:
        data: dict[str, Any] = {
            "science_path": str(science),
            "reference_path": str(reference),
            "output_dir": str(output.resolve()),
            "force": force,
        }
        if band is not None:
            data["band"] = band
        if mjd is not None:
            data["mjd"] = mjd
        items = [(Path(str(science)).stem, data)]
    outcomes, ui = _run_with_progress(items, verbose=verbose)
    _print_outcomes(outcomes, ui)
    if any(o.state != "COMPLETED" for o in outcomes):
        raise typer.Exit(1)


@app.command("batch")
def batch(
    manifest: Annotated[
        Path,
        typer.Argument(
            help="Night manifest CSV (science_path, reference_path, optional name, band, "
            "mjd...), as for observe --manifest."
        ),
    ],
    task_runner: Annotated[
        str | None,
        typer.Option(
            "--task-runner",
            help='"threads" (default setting): each pair is a run that any `astr worker` '
            'takes; "dask", "dask:N" or "dask:tcp://scheduler:8786": each pair runs as a '
            "task on a Dask cluster started here (N processes) or an existing one.",
        ),
    ] = None,
    as_json: JsonFlag = False,
    verbose: VerboseFlag = False,
) -> None:
    """Run a night's pairs in parallel on the workers (observation_batch flow).

    Unlike observe --manifest, which runs every pipeline in this process, the pairs run
    as observation_pipeline runs taken by any `astr worker` on any host (start workers
    first), or on a Dask cluster with --task-runner dask. Prints each pair's result;
    exits 1 if any pair did not complete.
    """
    import os

    if task_runner is not None:
        from pipeline.config import task_runner_spec

        task_runner_spec(task_runner, "--task-runner")
        os.environ["ASTR_TASK_RUNNER"] = task_runner
        get_config.cache_clear()
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from pipeline.flows.batch import BatchError, observation_batch_flow, validate_manifest
    from pipeline.workflow.prefect_server import ensure_server

    items = validate_manifest(manifest)  # a bad row is reported before anything starts
    config = get_config()
    url, _ = ensure_server(config)
    ui = url.removesuffix("/api")
    if not as_json:
        console.print(
            f"{len(items)} pair(s) through task runner {config.task_runner!r}, at most "
            f"{config.max_concurrent_flows} at once; Prefect: {ui}"
        )
    state = observation_batch_flow(str(manifest.resolve()), return_state=True)
    run_id = state.state_details.flow_run_id
    if state.is_completed():
        summary = state.result()
    else:
        try:
            state.result()
            summary = None
        except BatchError as exc:
            summary = exc.summary
        except Exception as exc:
            raise AstrError(f"the batch failed: {exc}") from None
    if as_json:
        typer.echo(json.dumps({"flow_run_id": str(run_id), **(summary or {})}, indent=2))
    elif summary is not None:
        _print_batch(summary, f"{ui}/runs/flow-run/{run_id}")
    if summary is None or any(p["state"] != "COMPLETED" for p in summary["pairs"].values()):
        raise typer.Exit(1)


def _print_batch(summary: dict[str, Any], link: str) -> None:
    table = Table(title=f"batch of {summary['total']} ({summary['mode']})")
    for column in ("pair", "state", "observation", "candidates", "error"):
        table.add_column(column)
    for name, pair in summary["pairs"].items():
        ok = pair["state"] == "COMPLETED"
        table.add_row(
            name,
            pair["state"] if not ok else f"[green]{pair['state']}[/]",
            pair.get("observation_id", "-"),
            str(pair.get("candidates", "-")),
            (pair.get("error") or "").splitlines()[0][:80] if pair.get("error") else "",
        )
    console.print(table)
    counts = ", ".join(f"{n} {state}" for state, n in summary["counts"].items())
    console.print(f"{counts} in {summary['wall_seconds']:.1f} s; Prefect: {link}")


@app.command("worker")
def worker(
    limit: Annotated[
        int | None,
        typer.Option(help="Most flow runs at once (default: max_concurrent_flows)."),
    ] = None,
) -> None:
    """Serve the pipeline's flows as Prefect deployments and run what is submitted to them.

    Flows started from the Prefect UI or API run here, each in its own process, so a
    cancel from Prefect stops the run and its notebook kernel.
    """
    from pipeline.workflow.deployments import serve_flows
    from pipeline.workflow.prefect_server import ensure_server

    config = get_config()
    url, how = ensure_server(config)
    console.print(f"worker for the Prefect server at {url} ({how})")
    if config.alerting_enabled:
        from pipeline.workflow.monitoring import watch_overdue

        watch_overdue(60.0)  # unacknowledged alerts escalate without a new failure
    serve_flows(limit=limit or config.max_concurrent_flows)


@app.command("api")
def api(
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8080,
) -> None:
    """Serve the REST API: start, watch, cancel and retry flows over HTTP.

    Flows started here run in an `astr worker` process against the same Prefect server.
    Listening beyond this machine needs authentication (ASTR_AUTHENTICATION_ENABLED=true
    and tokens in ASTR_API_TOKENS).
    """
    import uvicorn

    from pipeline.api import create_app
    from pipeline.workflow.prefect_server import ensure_server, is_loopback

    config = get_config()
    if not is_loopback(host) and not config.authentication_enabled:
        raise AstrError(
            f"refusing to serve the API on {host} without authentication: set "
            "ASTR_AUTHENTICATION_ENABLED=true and tokens in ASTR_API_TOKENS, or listen on "
            "127.0.0.1"
        )
    url, how = ensure_server(config)
    application = create_app(config)
    console.print(f"API on http://{host}:{port} for the Prefect server at {url} ({how})")
    uvicorn.run(application, host=host, port=port, log_level=config.log_level.lower())


@app.command("demo")
def demo(
    pairs: Annotated[int, typer.Option(min=1, max=12, help="Pairs in the simulated night.")] = 3,
    size: Annotated[int, typer.Option(min=512, max=2048, help="Image side (pixels).")] = 1024,
    model_pairs: Annotated[
        int,
        typer.Option(min=3, help="Simulated pairs the starter real/bogus model learns from."),
    ] = 24,
    model_size: Annotated[
        int, typer.Option(min=512, max=2048, help="Side of those pairs (pixels).")
    ] = 1024,
    model_epochs: Annotated[
        int, typer.Option(min=1, help="Most epochs of the starter model's training.")
    ] = 30,
    verbose: VerboseFlag = False,
) -> None:
    """Simulate a small night (pairs with injected transients), run it, score the result.

    Everything runs on embedded defaults: a local Prefect server, SQLite and files
    under the project home.
    """
    from astropy.table import Table as AstropyTable

    from pipeline.demo import score_candidates, simulate_night

    config = get_config()
    console.rule("astr demo")
    _ensure_demo_model(
        config, pairs=model_pairs, size=model_size, epochs=model_epochs, verbose=verbose
    )
    folder = Path(config.home) / "demo"
    console.print(f"simulating {pairs} pairs of {size}x{size} pixels in {folder / 'night'}")
    night = simulate_night(folder / "night", pairs=pairs, size=size)
    items = [
        (
            pair.name,
            {
                "science_path": str(pair.science_path),
                "reference_path": str(pair.reference_path),
                "output_dir": str((folder / "output" / pair.name).resolve()),
            },
        )
        for pair in night
    ]
    outcomes, ui = _run_with_progress(items, verbose=verbose)
    _print_outcomes(outcomes, ui)
    table = Table(
        title="recovered vs injected transients (candidates passing the cuts and rb_score >= "
        "0.5, within 2 px)"
    )
    for column in ("pair", "injected", "S/N>=7", "found S/N>=7", "found all", "other"):
        table.add_column(column)
    totals = [0, 0, 0]
    for pair, outcome in zip(night, outcomes, strict=True):
        out = folder / "output" / pair.name
        if outcome.state != "COMPLETED":
            table.add_row(pair.name, "failed", "-", "-", "-", "-")
            continue
        truth = AstropyTable.read(pair.truth_path, format="ascii.ecsv")
        found = AstropyTable.read(out / "candidates.ecsv", format="ascii.ecsv")
        score = score_candidates(found, truth)
        totals[0] += score.detectable
        totals[1] += score.recovered_detectable
        totals[2] += score.unmatched
        table.add_row(
            pair.name,
            str(score.injected),
            str(score.detectable),
            f"{score.recovered_detectable} ({score.completeness:.0%})",
            str(score.recovered),
            str(score.unmatched),
        )
    console.print(table)
    if totals[0]:
        console.print(
            f"night: recovered {totals[1]} of {totals[0]} transients with injected S/N >= 7 "
            f"({totals[1] / totals[0]:.0%}); {totals[2]} other candidates passed the cuts"
        )
        console.print(f"reports and candidate catalogues: {folder / 'output'}/<pair>/")
    if any(o.state != "COMPLETED" for o in outcomes):
        raise typer.Exit(1)


def _ensure_demo_model(config: Any, *, pairs: int, size: int, epochs: int, verbose: bool) -> None:
    """Train and deploy a small real/bogus model when production has none."""
    import os

    from pipeline.flows.runtime import use_storage_for_mlflow
    from pipeline.ml.serving import deployed_model

    use_storage_for_mlflow(config.storage_config)  # the model may be on an S3 endpoint
    served = deployed_model(
        config.mlflow_tracking_uri, "production", cache_dir=Path(config.home) / "models"
    )
    if served is not None:
        console.print(f"real/bogus model: version {served.version} (production)")
        return
    if not verbose:
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from pipeline.flows.training import train_starter_model
    from pipeline.workflow.prefect_server import ensure_server

    ensure_server(config)
    console.print(
        f"no real/bogus model in production yet: training one on {pairs} simulated "
        f"{size}x{size} pairs (once; about five minutes on two cores)"
    )
    with console.status("simulating pairs, labelling detections, training"):
        result = train_starter_model(pairs=pairs, size=size, config={"epochs": epochs})
    metrics = result["metrics"]
    console.print(
        f"real/bogus model: version {result['model_id']} deployed to production "
        f"({result['candidates']} candidates; test AUC {metrics['auc']:.3f}, "
        f"FPR {metrics['fpr']:.1%} at FNR {metrics['fnr']:.1%})"
    )


def _run_with_progress(
    items: list[tuple[str, dict[str, Any]]], *, verbose: bool = False
) -> tuple[list[Any], str]:
    """Run the observations with a live progress bar each; returns outcomes and the UI URL.

    Flow and notebook logs still go to the Prefect server; on the terminal only
    warnings show unless ``verbose``.
    """
    import os

    if not verbose:  # read when Prefect sets up logging: the API handler is unaffected
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from pipeline.flows.submit import run_observations
    from pipeline.workflow.prefect_server import ensure_server

    config = get_config()
    url, how = ensure_server(config)
    ui = url.removesuffix("/api")
    if how == "started":
        console.print(f"started the local Prefect server at {ui} (stop it: astr server stop)")
    else:
        console.print(f"using the Prefect server at {ui}")
    console.print(f"{len(items)} observation(s), at most {config.max_concurrent_flows} at once")
    with Progress(
        TextColumn("{task.description:<14}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[step]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        tasks = {name: progress.add_task(name, total=1.0, step="waiting") for name, _ in items}

        def on_progress(name: str, fraction: float, step: str | None) -> None:
            progress.update(tasks[name], completed=fraction, step=step or "done")

        outcomes = run_observations(items, config=config, on_progress=on_progress)
    return outcomes, ui


def _print_outcomes(outcomes: list[Any], ui: str) -> None:
    for outcome in outcomes:
        link = f"{ui}/runs/flow-run/{outcome.flow_run_id}" if outcome.flow_run_id else "-"
        if outcome.state == "COMPLETED" and outcome.result:
            result = outcome.result
            counts = result.get("metrics", {}).get("candidates", {})
            shown = ", ".join(f"{k} {v}" for k, v in counts.items() if isinstance(v, int))
            console.print(
                f"[bold green]{outcome.name}[/]: observation {result['observation_id']} "
                f"in {outcome.seconds:.1f} s ({result['metrics']['steps_cached']} of 5 steps "
                f"cached); {shown}"
            )
            model = result.get("rb_model")
            if model:
                drift = result.get("drift") or {}
                psi = f"; score drift PSI {drift['psi']:.3f} ({drift['level']})" if drift else ""
                console.print(f"  rb_score:   real/bogus model v{model['version']}{psi}")
            else:
                console.print("  rb_score:   no real/bogus model deployed (NaN)")
            exported = result.get("exported", {})
            if "candidates" in exported:
                console.print(f"  candidates: {exported['candidates']}")
            reports = [v for k, v in exported.items() if k.startswith("report:")]
            if reports:
                console.print(f"  reports:    {Path(reports[0]).parent}/<step>.html")
            console.print(f"  Prefect:    {link}")
        else:
            console.print(f"[bold red]{outcome.name}[/]: {outcome.state}: {outcome.error}")
            data = outcome.observation_data
            if data.get("output_dir"):
                console.print(f"  reports:    {Path(data['output_dir']) / 'reports'}")
            console.print(f"  Prefect:    {link}")


@server_app.command("start")
def server_start(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(help="Port to listen on (default: the configured URL's; 0 picks one)."),
    ] = None,
    allow_remote: Annotated[
        bool, typer.Option("--allow-remote", help="Allow a non-loopback host such as 0.0.0.0.")
    ] = False,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the server to answer.")
    ] = 60.0,
) -> None:
    """Start the Prefect server in the background (SQLite under the project home).

    A configured ASTR_PREFECT_DATABASE_URL (e.g. PostgreSQL) is checked and migrated
    first; with authentication_enabled the server requires ASTR_PREFECT_API_AUTH_STRING.
    If this home's server already runs there, it is left as it is.
    """
    config = get_config()
    server = PrefectServer(config)
    if config.prefect_database_url:
        server.configure_database(config.prefect_database_url)
    if config.authentication_enabled:
        server.setup_authentication({"enabled": True})
    already = server.status()
    server.start_server(host, port, allow_remote=allow_remote, timeout=timeout)
    status = server.status()
    verb = "already running" if already["running"] else "started"
    console.print(f"Prefect server {verb} (pid {status['pid']})")
    console.print(f"UI:  {status['ui_url']}")
    console.print(f"API: {status['url']}  (PREFECT_API_URL for clients)")
    console.print(f"log: {status['log']}")


@server_app.command("stop")
def server_stop() -> None:
    """Stop the Prefect server started from this project home (no-op if none runs)."""
    server = PrefectServer(get_config())
    running = server.status()["running"]
    server.stop_server()
    console.print("Prefect server stopped" if running else "no Prefect server was running")


@server_app.command("status")
def server_status(as_json: JsonFlag = False) -> None:
    """Show whether the Prefect server runs and answers, its URL, version and files."""
    status = PrefectServer(get_config()).status()
    if as_json:
        typer.echo(json.dumps(status, indent=2))
        return
    table = Table(title="astr server", show_header=False)
    for key, value in status.items():
        table.add_row(key, str(value))
    console.print(table)


@server_app.command("health")
def server_health(
    as_json: JsonFlag = False,
    timeout: Annotated[float, typer.Option(help="Seconds each network check may wait.")] = 5.0,
) -> None:
    """Check the Prefect server, its database, the worker and the storage; exit 1 if not ok."""
    report = PrefectServer(get_config()).health_check(timeout=timeout)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        table = Table(title="astr server health")
        for column in ("part", "state", "details"):
            table.add_column(column)
        for part in ("server", "database", "worker", "storage"):
            state = report[part]
            details = {k: v for k, v in state.items() if k not in ("ok", "error") and v is not None}
            text = ", ".join(f"{k}={v}" for k, v in details.items())
            if state.get("error"):
                text = f"{state['error']}" + (f" ({text})" if text else "")
            table.add_row(part, "ok" if state["ok"] else "[red]FAILED[/]", text)
        console.print(table)
    if not report["ok"]:
        raise typer.Exit(1)


def _store_status() -> dict[str, Any]:
    config = get_config()
    with Catalogue.from_config(config) as catalogue:
        revision = migrate.current_revision(catalogue.engine)
        counts = catalogue.counts()
    store = ArtifactStore(config.storage_config)
    return {
        "database_url": describe(config)["database_url"],
        "revision": revision,
        "head_revision": migrate.head_revision(),
        "records": counts,
        "storage_url": config.storage_config.url,
        "storage_check": _storage_round_trip(store),
    }


def _storage_round_trip(store: ArtifactStore) -> str:
    """Write, read back, verify and remove a small object; say what happened."""
    key = f"_health/{uuid.uuid4().hex}.txt"
    payload = f"astr storage check {key}\n".encode()
    try:
        stored = store.put(key, payload)
        ok = store.read_bytes(key) == payload and store.checksum(key) == stored.sha256
    finally:
        store.delete(key)
    return "ok (write, read, sha256 verified)" if ok else "FAILED: read-back differs"


register_model_commands(app)  # train, hpo, evaluate, deploy, rollback, retrain, models, dataset
register_ops_commands(app)  # report, alerts
