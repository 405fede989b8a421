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
