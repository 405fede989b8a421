"""Schema migrations of the catalogue (Alembic), applied on first use."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, text

__all__ = ["MIGRATIONS_DIR", "current_revision", "downgrade", "head_revision", "upgrade"]

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# Key of the PostgreSQL advisory lock that serialises concurrent first uses.
_PG_LOCK_KEY = 0x61737472


def _alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """Revision id the code expects the database to be at."""
    head = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    assert head is not None, "the catalogue has no migrations"
    return head


def current_revision(engine: Engine) -> str | None:
    """Revision id the database is at, or None for an empty database."""
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> str | None:
    """Bring the schema to ``revision``, safely when several processes start at once.

    On SQLite the migration runs in a ``BEGIN IMMEDIATE`` transaction and on
    PostgreSQL under an advisory lock, so a second process waits for the first
    and then finds nothing left to do.

    Parameters
    ----------
    engine : sqlalchemy.Engine
    revision : str
        Target revision (default: the newest).

    Returns
    -------
    str or None
        The revision the database is at afterwards.
    """
    if revision == "head" and current_revision(engine) == head_revision():
        return head_revision()
    config = _alembic_config()
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return current_revision(engine)


def downgrade(engine: Engine, revision: str) -> str | None:
    """Take the schema back to ``revision`` (``"base"`` drops every table).

    Returns
    -------
    str or None
        The revision the database is at afterwards (None at base).
    """
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, revision)
    return current_revision(engine)
