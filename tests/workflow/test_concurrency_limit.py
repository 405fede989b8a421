"""The global observation limit, created by many processes at once on a real server."""

from __future__ import annotations

import threading
import uuid

import pytest

from pipeline.workflow.concurrency import ensure_limit

integration = pytest.mark.integration


@integration
def test_ensure_limit_survives_flows_creating_it_at_once(prefect_server: str) -> None:
    # Prefect's upsert reads the limit by name, then creates it: not atomic. The first
    # flows of a batch start together, and all but one of them lost that race (409)
    from prefect.client.orchestration import get_client

    name = f"race-{uuid.uuid4().hex[:8]}"
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def create(limit: int) -> None:
        start.wait()
        try:
            ensure_limit(limit, name)
        except BaseException as exc:  # the test reports every failure
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(4,)) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    ensure_limit(6, name)  # an existing limit takes the configured value
    with get_client(sync_client=True) as client:
        assert client.read_global_concurrency_limit_by_name(name).limit == 6
