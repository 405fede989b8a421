"""The Prefect global concurrency limit that bounds how many observations run at once."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

__all__ = ["OBSERVATION_LIMIT", "ensure_limit", "holding_slot", "observation_slot"]

#: Name of the global concurrency limit shared by every observation flow.
OBSERVATION_LIMIT = "astr-observation-flows"

#: Seconds a slot's lease lasts without renewal.
LEASE_SECONDS = 60.0

_holding: contextvars.ContextVar[bool] = contextvars.ContextVar("astr_holding_slot", default=False)


def ensure_limit(limit: int, name: str = OBSERVATION_LIMIT) -> None:
    """Create the global concurrency limit, or set it to ``limit`` (``max_concurrent_flows``)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, limit)


def holding_slot() -> bool:
    """Whether this context already holds an observation slot (nested flows take none)."""
    return _holding.get()


@contextlib.contextmanager
def observation_slot(limit: int, name: str = OBSERVATION_LIMIT) -> Iterator[None]:
    """Hold one slot of the limit for the duration of the block (re-entrant).

    Waits while ``limit`` observations are running. A block nested in one that holds a
    slot takes no second slot, so a pipeline's steps never wait for their own pipeline.
    """
    if _holding.get():
        yield
        return
    from prefect.concurrency.sync import concurrency

    ensure_limit(limit, name)
    # A short lease (renewed while the block runs): the slot of a process killed
    # outright comes back within a minute instead of five.
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_SECONDS):
        token = _holding.set(True)
        try:
            yield
        finally:
            _holding.reset(token)
