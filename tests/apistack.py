"""A real API process and real workers sharing one project home (API, batch tests, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from procs import free_port, stop_group

TOKENS = ("first-token-0123456789", "second-token-9876543210")

#: Flows the worker must serve before a test starts runs (the slowest to register last).
DEPLOYED = ("observation_pipeline/astr", "observation_batch/astr", "score_drift/astr")


@dataclass
class ApiStack:
    """Where the API listens, the project home its processes share, and a valid token."""

    url: str
    home: Path
    token: str
    worker_pid: int
    logs: Path
    worker_pids: list[int] = field(default_factory=list)

    def client(self, token: str | None = None, **kwargs) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token or self.token}"}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def tail(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.logs.glob("*.log"))
        )


def wait_for(stack: ApiStack, flow_id: str, states: set[str], seconds: float = 300) -> list[dict]:
    """Poll a run's status until it is in ``states``; return every status seen."""
    seen = []
    deadline = time.monotonic() + seconds
    with stack.client() as client:
        while True:
            answer = client.get(f"/workflows/flows/{flow_id}/status")
            assert answer.status_code == 200, answer.text
            seen.append(answer.json())
            if seen[-1]["status"] in states:
                return seen
            assert time.monotonic() < deadline, f"{seen[-1]}\n{stack.tail()}"
            time.sleep(0.2)


def spawn_astr(args: list[str], env: Mapping[str, str], log: Path) -> subprocess.Popen:
    """Start ``astr <args>`` in its own session (so its group can be stopped), output to ``log``."""
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", "from pipeline.cli import main; main()", *args],
            env=dict(env),
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def running_stack(
    prefect_server: str,
    root: Path,
    *,
    workers: int = 1,
    env: Mapping[str, str] | None = None,
    worker_args: tuple[str, ...] = (),
    timeout: float = 180.0,
) -> Iterator[ApiStack]:
    """``astr api`` (tokens required) and ``workers`` ``astr worker`` processes, one home.

    Parameters
    ----------
    prefect_server : str
        API URL of the Prefect server they all use.
    root : Path
        Directory for the project home (``root / "home"``) and the processes' logs.
    workers : int
        Worker processes (0: none; started runs then wait and are cancelled at the end).
    env : mapping, optional
        Extra environment variables (``ASTR_*`` settings, ``PREFECT_*``...) for all of them.
    worker_args : tuple of str
        Extra ``astr worker`` arguments (``--limit 2``).
    """
    from prefect.client.orchestration import get_client

    base = {k: v for k, v in os.environ.items() if not k.startswith("ASTR_")}
    base.update(
        ASTR_HOME=str(root / "home"),
        ASTR_PREFECT_SERVER_URL=prefect_server,
        ASTR_AUTHENTICATION_ENABLED="true",
        ASTR_API_TOKENS=",".join(TOKENS),
        ASTR_ALERTING_ENABLED="false",
        PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="WARNING",
    )
    base.update(env or {})
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    processes = [spawn_astr(["api", "--port", str(port)], base, root / "api.log")]
    for number in range(workers):
        log = root / ("worker.log" if number == 0 else f"worker-{number + 1}.log")
        processes.append(spawn_astr(["worker", *worker_args], base, log))
    pids = [p.pid for p in processes[1:]]
    stack = ApiStack(
        f"http://127.0.0.1:{port}", root / "home", TOKENS[0], processes[-1].pid, root, pids
    )
    up = False
    try:
        deadline = time.monotonic() + timeout
        while True:
            assert all(p.poll() is None for p in processes), stack.tail()
            assert time.monotonic() < deadline, "the API or the worker did not come up\n" + (
                stack.tail()
            )
            try:
                healthy = httpx.get(f"{stack.url}/health", timeout=5).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if healthy and not workers:
                break
            if healthy:
                with get_client(sync_client=True) as client:
                    try:
                        for name in DEPLOYED:
                            client.read_deployment_by_name(name)
                        break
                    except Exception:
                        pass
            time.sleep(0.5)
        up = True
        yield stack
    finally:
        if up and not workers:
            cancel_leftovers(stack)
        for process in processes:
            stop_group(process)


def cancel_leftovers(stack: ApiStack) -> None:
    """Cancel the runs a stack without a worker left waiting, so no later worker runs them."""
    with stack.client() as client:
        for status in ("PENDING", "RUNNING"):
            page = client.get("/workflows/flows", params={"status": status, "limit": 1000})
            for item in page.json().get("items", []):
                client.post(f"/workflows/flows/{item['flow_id']}/cancel")
