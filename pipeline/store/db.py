"""Database engines for the catalogue: SQLite tuned for concurrent use, or any SQLAlchemy URL."""

from __future__ import annotations

import json
import math
import random
import sqlite3
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

__all__ = ["SQLITE_BUSY_TIMEOUT_MS", "json_dumps", "make_engine"]

SQLITE_BUSY_TIMEOUT_MS = 30_000
# Jitter for lock retries from a private generator, so that the global `random` state
# (which seeded experiments rely on) is never drawn from behind their back.
_JITTER = random.Random()


def make_engine(database_url: str, **kwargs: Any) -> Engine:
    """Create a pooled engine for ``database_url``.

    SQLite files get write-ahead logging, a busy timeout, foreign keys and
    ``BEGIN IMMEDIATE`` transactions, so concurrent writers wait for each other
    instead of failing with "database is locked". The file's directory is created.

    Parameters
    ----------
    database_url : str
        Any SQLAlchemy URL (``sqlite:////abs/path.db``, ``postgresql+psycopg://...``).
    **kwargs
        Passed to :func:`sqlalchemy.create_engine`.

    Returns
    -------
    sqlalchemy.Engine
    """
    url = make_url(database_url)
    kwargs.setdefault("json_serializer", json_dumps)
    if url.get_backend_name() != "sqlite":
        # A pooled connection is checked before use: after a server restart the pool
        # reconnects instead of handing out a dead connection.
        return create_engine(url, pool_pre_ping=True, **kwargs)
    if url.database and url.database != ":memory:":
        Path(url.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000}, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def json_dumps(value: Any) -> str:
    """JSON text of a column value, with NaN and infinities stored as ``null``.

    PostgreSQL refuses ``NaN`` in JSON (it is not JSON) while SQLite keeps it, so a
    candidate's non-finite property would fail on one backend only; as for the float
    columns, a missing number is stored as NULL on every backend.

    Parameters
    ----------
    value : object
        JSON-serialisable data (dicts, lists, strings, numbers, booleans, None).

    Returns
    -------
    str
    """
    return json.dumps(_finite(value), allow_nan=False)


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide when transactions begin.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    _enable_wal(cursor)
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _enable_wal(cursor: Any) -> None:
    """Switch the file to write-ahead logging (once: the mode is stored in the file).

    The switch needs the file to itself and SQLite answers "database is locked" at once,
    without waiting out the busy timeout, when several processes open a new catalogue
    together; so retry until the timeout has passed.
    """
    mode = str(cursor.execute("PRAGMA journal_mode").fetchone()[0]).lower()
    if mode in ("wal", "memory"):
        return
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02 + 0.08 * _JITTER.random())


def _sqlite_on_begin(connection: Any) -> None:
    # A deferred transaction that later writes can fail at once with SQLITE_BUSY
    # (the busy timeout does not apply to lock upgrades); taking the write lock
    # up front makes writers queue instead.
    connection.exec_driver_sql("BEGIN IMMEDIATE")
