"""The ``astr`` command."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from pipeline import __version__
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
    for key, value in _flatten(data):
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
    for key, value in _flatten(status):
        table.add_row(key, str(value))
    console.print(table)


@app.command("demo")
def demo() -> None:
    """Run the end-to-end demo on embedded defaults (no external service needed).

    The observation flows are not built yet: for now the demo sets up the project
    home, migrates the catalogue, checks the artifact store with a checksummed round
    trip and prints the settings and the store's state.
    """
    config = get_config()
    console.rule("astr demo")
    console.print(f"project home: {config.home}  (environment: {config.environment})")
    config_show(as_json=False)
    store_status(as_json=False)
    console.print(
        "[bold]Not yet available:[/] the observation flows (ingestion, preprocessing, "
        "differencing, detection, validation) and the model lifecycle. This demo covers "
        "what exists today: settings, the observation catalogue and artifact storage."
    )


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

    If this home's server already runs there, it is left as it is.
    """
    server = PrefectServer(get_config())
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


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    rows: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            rows.extend(_flatten(value, f"{name}."))
        else:
            rows.append((name, value))
    return rows
