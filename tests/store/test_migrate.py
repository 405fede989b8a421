"""Schema migrations: from empty, idempotent, concurrent first use, models in step."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from pipeline.store import Catalogue, migrate
from pipeline.store.db import make_engine
from pipeline.store.models import Base

TABLES = {
    "observations",
    "products",
    "candidates",
    "flow_runs",
    "alerts",
    "alert_deliveries",
    "alert_routes",
    "alembic_version",
}


def test_migration_from_empty_creates_every_table(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'new' / 'cat.db'}")
    assert migrate.current_revision(engine) is None
    assert migrate.upgrade(engine) == migrate.head_revision()
    assert set(inspect(engine).get_table_names()) == TABLES
    # running again is a no-op
    assert migrate.upgrade(engine) == migrate.head_revision()
    engine.dispose()


def test_downgrade_to_base_and_back(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cat.db'}")
    migrate.upgrade(engine)
    assert migrate.downgrade(engine, "base") is None
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    assert migrate.upgrade(engine) == migrate.head_revision()
    engine.dispose()


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'cat.db'}")
    migrate.upgrade(engine)
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == [], f"models changed without a migration: {diff}"
    engine.dispose()


def test_sqlite_is_tuned_for_concurrency(catalogue: Catalogue) -> None:
    with catalogue.engine.connect() as connection:
        assert connection.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1


def _open_and_add(url: str) -> str:
    catalogue = Catalogue(url)
    observation = catalogue.add_observation(raw_checksums={"science": "a" * 64})
    catalogue.close()
    return str(observation.id)


def test_concurrent_first_use_migrates_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'race.db'}"
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        ids = pool.map(_open_and_add, [url] * 8)
    with Catalogue(url) as catalogue:
        assert catalogue.counts()["observations"] == 8
        assert {str(o.id) for o in catalogue.list_observations()} == set(ids)
