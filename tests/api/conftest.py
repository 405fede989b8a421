"""A real API process and a real worker against the session's Prefect server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apistack import TOKENS, ApiStack
from procs import free_port, stop_group

# Flows the worker must serve before a test starts runs (the slowest to register last).
_DEPLOYED = ("observation_pipeline/astr", "score_drift/astr")


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", "from pipeline.cli import main; main()", *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def _stack(prefect_server: str, root: Path, *, worker: bool) -> Iterator[ApiStack]:
    from prefect.client.orchestration import get_client

    env = {k: v for k, v in os.environ.items() if not k.startswith("ASTR_")}
    env.update(
        ASTR_HOME=str(root / "home"),
        ASTR_PREFECT_SERVER_URL=prefect_server,
        ASTR_AUTHENTICATION_ENABLED="true",
        ASTR_API_TOKENS=",".join(TOKENS),
        ASTR_ALERTING_ENABLED="false",
        PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="WARNING",
    )
    port = free_port()
    processes = [_spawn(["api", "--port", str(port)], env, root / "api.log")]
    if worker:
        processes.append(_spawn(["worker"], env, root / "worker.log"))
    stack = ApiStack(f"http://127.0.0.1:{port}", root / "home", TOKENS[0], processes[-1].pid, root)
    up = False
    try:
        deadline = time.monotonic() + 180
        while True:
            assert all(p.poll() is None for p in processes), stack.tail()
            assert time.monotonic() < deadline, "the API or the worker did not come up\n" + (
                stack.tail()
            )
            try:
                healthy = httpx.get(f"{stack.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and not worker:
                break
            if healthy:
                with get_client(sync_client=True) as client:
                    try:
                        for name in _DEPLOYED:
                            client.read_deployment_by_name(name)
                        break
                    except Exception:
                        pass
            time.sleep(0.5)
        up = True
        yield stack
    finally:
        if up and not worker:
            _cancel_leftovers(stack)
        for process in processes:
            stop_group(process)


def _cancel_leftovers(stack: ApiStack) -> None:
    """Cancel the runs a stack without a worker left waiting, so no later worker runs them."""
    with stack.client() as client:
        for status in ("PENDING", "RUNNING"):
            page = client.get("/workflows/flows", params={"status": status, "limit": 1000})
            for item in page.json().get("items", []):
                client.post(f"/workflows/flows/{item['flow_id']}/cancel")


@pytest.fixture(scope="module")
def api_stack(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """``astr worker`` and ``astr api`` (tokens required) sharing one project home."""
    with _stack(prefect_server, tmp_path_factory.mktemp("api-stack"), worker=True) as stack:
        yield stack


@pytest.fixture(scope="module")
def api_only(prefect_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ApiStack]:
    """``astr api`` without a worker: started runs wait, and are cancelled at the end.

    The flows' deployments are registered (as a worker would) so that starts succeed.
    """
    from pipeline.workflow.deployments import model_deployments, observation_deployments

    for deployment in [*observation_deployments(), *model_deployments()]:
        deployment.apply()
    with _stack(prefect_server, tmp_path_factory.mktemp("api-only"), worker=False) as stack:
        yield stack
