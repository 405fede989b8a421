"""Shared fixtures: an isolated project home per test."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from pipeline.config import StorageConfig, get_config
from pipeline.store import ArtifactStore, Catalogue

# No per-example deadline (a loaded CI machine is slow, not wrong); in CI the examples
# are derived from the test, so a failure there reproduces anywhere.
settings.register_profile("astr", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True)
settings.load_profile("ci" if os.environ.get("CI") else "astr")


@pytest.fixture(autouse=True)
def _isolated_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test gets its own project home and no ASTR_* variables from outside."""
    for name in list(os.environ):
        if name.startswith("ASTR_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("ASTR_HOME", str(tmp_path / "home"))
    get_config.cache_clear()
    yield
    get_config.cache_clear()


@pytest.fixture
def catalogue(tmp_path: Path) -> Iterator[Catalogue]:
    """A migrated SQLite catalogue in a temporary directory."""
    with Catalogue(f"sqlite:///{tmp_path / 'catalogue.db'}") as cat:
        yield cat


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    """A local artifact store in a temporary directory."""
    return ArtifactStore(StorageConfig(backend="local", root=str(tmp_path / "artifacts")))


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 protocol server (moto) on a loopback port; yields its URL.

    moto keeps its buckets per process, not per server: tests share them, so each
    test uses its own bucket or prefix.
    """
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    from procs import free_port

    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials and region the S3 server accepts."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


# A loaded CI machine can take well over 15 s to start a Prefect server.
PREFECT_START_TIMEOUT = 180.0


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Prefect server for the whole test session; yields its API URL.

    The server keeps its SQLite database and log in a session temporary directory
    (not the per-test ``ASTR_HOME``) and listens on a free loopback port. While the
    session runs, ``PREFECT_API_URL`` points at it in the environment (inherited by
    subprocesses such as notebook kernels) and in the already-imported Prefect's
    settings, and ``PREFECT_HOME`` is a session directory, so no test touches
    ``~/.prefect``. Logs that flows send to the API are flushed before the server stops.
    """
    import dataclasses

    from pipeline.config import load_config
    from pipeline.workflow.prefect_server import (
        PrefectServer,
        refresh_prefect_settings,
        using_server,
    )

    root = tmp_path_factory.mktemp("prefect-server")
    config = dataclasses.replace(load_config(environ={}), home=root / "home")
    server = PrefectServer(config, start_timeout=PREFECT_START_TIMEOUT)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(root / "client"))
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        patch.delenv("PREFECT_API_AUTH_STRING", raising=False)
        server.start_server("127.0.0.1", 0)
        try:
            with using_server(server.api_url) as url:
                yield url
                _drain_prefect_workers()
        finally:
            server.stop_server()
    refresh_prefect_settings()


@pytest.fixture
def prefect_server_url(prefect_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The session Prefect server, also as this test's ``ASTR_PREFECT_SERVER_URL``.

    Use it in tests of code that calls ``get_config()`` / ``ensure_server()``: they then
    find the session server instead of starting one under the per-test home.
    """
    monkeypatch.setenv("ASTR_PREFECT_SERVER_URL", prefect_server)
    get_config.cache_clear()
    return prefect_server


def _drain_prefect_workers() -> None:
    """Send what Prefect's background workers still hold (logs, events) to the API."""
    import sys

    if "prefect.logging.handlers" in sys.modules:
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=30)
    if "prefect.events.worker" in sys.modules:
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30)


@pytest.fixture(scope="session")
def candidate_night():
    """Labelled candidates from N simulated 512² pairs, built once per (N, fractions).

    Runs our own preprocessing, differencing and detection (a few seconds per pair), so
    the tests of data, training, search, registry, notebooks and flows share the work.
    """
    import functools

    from pipeline.ml.data import simulated_dataset

    @functools.cache
    def build(n_images: int, fractions: tuple[float, float, float] = (0.5, 0.25, 0.25)):
        return simulated_dataset(
            range(n_images),
            shape=(512, 512),
            n_stars=150,
            n_galaxies=40,
            n_transients=30,
            fractions=fractions,
        )

    return build
