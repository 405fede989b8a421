"""Faults with real processes: a worker killed mid-flow, the Prefect server restarted mid-batch.

A Prefect server this module owns (on a throwaway PostgreSQL cluster, so it can be
stopped and started again on the same port and database), a real ``astr api`` and real
``astr worker`` processes, and small simulated pairs (256²) started through the API.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apistack import TOKENS, ApiStack, wait_for
from pg import running_cluster
from procs import free_port, processes, stop_group

from pipeline.config import load_config
from pipeline.store import ArtifactStore, Catalogue
from pipeline.workflow.concurrency import OBSERVATION_LIMIT

# Minutes of waiting for crash detection and a server restart: CI runs them, make test not.
pytestmark = [pytest.mark.integration, pytest.mark.slow]

#: Side of the simulated images (pixels): small, so a pipeline takes seconds.
SIZE = 256
#: Most seconds a killed run may stay RUNNING before it must read as crashed.
CRASH_DEADLINE = 150.0
#: Seconds the Prefect server stays down in the restart test.
OUTAGE = 5.0
_FINAL = {"COMPLETED", "FAILED", "CANCELLED"}


# -- the stack -------------------------------------------------------------------------


@dataclasses.dataclass
class FaultStack:
    """An owned Prefect server, the API and a worker over one project home."""

    api: ApiStack
    server: object  # PrefectServer
    port: int
    env: dict[str, str]
    root: Path
    worker: subprocess.Popen
    api_process: subprocess.Popen

    def start_worker(self, name: str) -> subprocess.Popen:
        """Start another ``astr worker`` (log ``<name>.log``) and make it the stack's."""
        self.worker = _spawn(["worker"], self.env, self.root / f"{name}.log")
        self.api.worker_pid = self.worker.pid
        return self.worker

    def catalogue(self) -> Catalogue:
        return Catalogue.from_config(load_config(environ={"ASTR_HOME": str(self.api.home)}))

    def store(self) -> ArtifactStore:
        config = load_config(environ={"ASTR_HOME": str(self.api.home)})
        return ArtifactStore(config.storage_config)


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-c", "from pipeline.cli import main; main()", *args],
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _wait_up(url: str, processes_: list[subprocess.Popen], tail, seconds: float = 180) -> None:
    """Until the API answers /health and the worker has served the pipeline deployment."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + seconds
    while True:
        assert all(p.poll() is None for p in processes_), tail()
        assert time.monotonic() < deadline, "the API or the worker did not come up\n" + tail()
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                with get_client(sync_client=True) as client, contextlib.suppress(Exception):
                    client.read_deployment_by_name("observation_pipeline/astr")
                    return
        time.sleep(0.5)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultStack]:
    """PostgreSQL, a Prefect server on it that the tests may stop, the API and a worker."""
    from pipeline.workflow.prefect_server import PrefectServer, using_server

    root = tmp_path_factory.mktemp("faults")
    with running_cluster() as cluster, pytest.MonkeyPatch.context() as patch:
        patch.setenv("PREFECT_HOME", str(root / "client"))
        patch.setenv("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        patch.delenv("PREFECT_API_AUTH_STRING", raising=False)
        config = dataclasses.replace(
            load_config(environ={}),
            home=root / "server-home",
            prefect_database_url=cluster.create_database("prefect"),
        )
        server = PrefectServer(config, start_timeout=180)
        port = free_port()
        server.start_server("127.0.0.1", port)
        try:
            with using_server(server.api_url) as url:
                yield from _services(root, server, port, url)
        finally:
            server.stop_server()


def _services(root: Path, server: object, port: int, url: str) -> Iterator[FaultStack]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ASTR_")}
    env.update(
        ASTR_HOME=str(root / "home"),
        ASTR_PREFECT_SERVER_URL=url,
        PREFECT_API_URL=url,
        ASTR_AUTHENTICATION_ENABLED="true",
        ASTR_API_TOKENS=",".join(TOKENS),
        ASTR_ALERTING_ENABLED="false",
        ASTR_MAX_CONCURRENT_FLOWS="2",
        PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL="WARNING",
    )
    api_port = free_port()
    api_process = _spawn(["api", "--port", str(api_port)], env, root / "api.log")
    worker = _spawn(["worker"], env, root / "worker-1.log")
    api = ApiStack(f"http://127.0.0.1:{api_port}", root / "home", TOKENS[0], worker.pid, root)
    stack = FaultStack(api, server, port, env, root, worker, api_process)
    try:
        _wait_up(api.url, [api_process, worker], api.tail)
        yield stack
    finally:
        for process in (stack.worker, api_process):
            stop_group(process, grace=15)


# -- pairs and checks --------------------------------------------------------------------


def _pair(directory: Path, seed: int) -> dict:
    """Write a simulated 256² pair; the API start body of its observation pipeline."""
    from pipeline.science import io
    from pipeline.science.simulate import simulate_pair

    pair = simulate_pair(
        (SIZE, SIZE),
        seed=seed,
        n_stars=300,
        n_galaxies=10,
        n_transients=4,
        cosmic_rays=5,
        saturated_stars=1,
    )  # enough stars for a PSF on 256² (seeds 100-107 checked)
    directory.mkdir(parents=True, exist_ok=True)
    science, reference = directory / "science.fits", directory / "reference.fits"
    io.write_image(pair.science, science)
    io.write_image(pair.reference, reference)
    return {"observation_data": {"science_path": str(science), "reference_path": str(reference)}}


def _start(stack: FaultStack, body: dict) -> str:
    with stack.api.client() as client:
        answer = client.post("/workflows/flows/observation_pipeline/start", json=body)
    assert answer.status_code == 202, answer.text + stack.api.tail()
    return answer.json()["flow_id"]


def _status(stack: FaultStack, flow_id: str) -> dict:
    with stack.api.client() as client:
        answer = client.get(f"/workflows/flows/{flow_id}/status")
    assert answer.status_code == 200, answer.text
    return answer.json()


def _prefect_state(flow_id: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_flow_run(uuid.UUID(flow_id)).state.type.value


def _descendants(root: int) -> set[int]:
    """Every process under ``root`` (kernels in their own sessions included), and root."""
    table = processes()
    found = {root}
    grew = True
    while grew:
        grew = False
        for pid, (parent, _) in table.items():
            if parent in found and pid not in found:
                found.add(pid)
                grew = True
    return found & set(table) | {root}


def _kill_tree(root: int) -> set[int]:
    """Freeze the tree under ``root`` (SIGSTOP until it stops growing), then SIGKILL it all."""
    frozen: set[int] = set()
    while True:
        tree = _descendants(root) - frozen
        if not tree:
            break
        for pid in tree:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= tree
    for pid in frozen:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return frozen


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_products(stack: FaultStack, body: dict) -> uuid.UUID:
    """One observation for the pair; one product per (step, kind), stored intact; no temp files.

    Returns the observation's id.
    """
    science = Path(body["observation_data"]["science_path"])
    digest = _sha256(science)
    store = stack.store()
    with stack.catalogue() as catalogue:
        mine = [
            o
            for o in catalogue.list_observations(limit=1000)
            if (o.raw_checksums or {}).get("science") == digest
        ]
        assert len(mine) == 1, [o.id for o in mine]
        observation = mine[0]
        assert observation.status == "validated", (observation.status, observation.steps)
        products = catalogue.products(observation.id)
    by_slot: dict[tuple[str, str], list] = {}
    for product in products:
        by_slot.setdefault((product.step, product.kind), []).append(product)
    doubled = {slot: [p.uri for p in found] for slot, found in by_slot.items() if len(found) > 1}
    assert not doubled, f"products registered more than once: {doubled}"
    kinds = {kind for _, kind in by_slot}
    assert {"raw_science", "raw_reference", "difference", "candidates"} <= kinds, kinds
    assert {step for step, _ in by_slot} == {
        "ingestion",
        "preprocessing",
        "differencing",
        "detection",
        "validation",
    }
    for product in products:
        key = store.key_of(product.uri)
        assert store.exists(key), product.uri
        assert store.checksum(key) == product.sha256, product.uri
    leftovers = [p for p in Path(store.root).rglob("*") if p.name.startswith(".tmp-")]
    assert not leftovers, leftovers
    return observation.id


def _active_slots() -> int:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_global_concurrency_limit_by_name(OBSERVATION_LIMIT).active_slots


def _wait_slots_free(seconds: float) -> float:
    """Seconds until the observation limit holds no slot; fails after ``seconds``."""
    started = time.monotonic()
    while _active_slots() != 0:
        assert time.monotonic() - started < seconds, f"{_active_slots()} slots still held"
        time.sleep(1)
    return time.monotonic() - started


# -- the tests ---------------------------------------------------------------------------


def test_worker_killed_mid_flow_run_crashes_and_a_retry_completes(
    stack: FaultStack, tmp_path: Path, record_property
):
    body = _pair(tmp_path / "pair", seed=100)
    flow_id = _start(stack, body)
    deadline = time.monotonic() + 240
    while True:
        status = _status(stack, flow_id)
        if (status["current_step"] or "").startswith("differencing: cell"):
            break
        assert status["status"] in ("PENDING", "RUNNING"), status
        assert time.monotonic() < deadline, stack.api.tail()
        time.sleep(0.05)
    killed = _kill_tree(stack.worker.pid)
    killed_at = time.monotonic()
    stack.worker.wait(timeout=10)
    # SIGKILL is immediate, but a process tearing down a large address space (a kernel
    # holding images) can take a moment to leave the process table on a loaded machine
    gone_by = time.monotonic() + 30
    while any(pid in processes() for pid in killed):
        assert time.monotonic() < gone_by, sorted(set(killed) & set(processes()))
        time.sleep(0.1)

    crashed = wait_for(stack.api, flow_id, _FINAL, CRASH_DEADLINE)[-1]
    to_crashed = time.monotonic() - killed_at
    record_property("seconds_to_crashed", round(to_crashed, 1))
    print(f"killed mid-differencing; the API said {crashed['status']} after {to_crashed:.1f} s")
    assert _prefect_state(flow_id) == "CRASHED"
    assert crashed["status"] == "FAILED", crashed
    assert "crash" in (crashed["error_message"] or "").lower(), crashed

    stack.start_worker("worker-2")
    with stack.api.client() as client:
        retried = client.post(f"/workflows/flows/{flow_id}/retry")
    assert retried.status_code == 202, retried.text
    done = wait_for(stack.api, flow_id, _FINAL, 240)[-1]
    assert done["status"] == "COMPLETED", f"{done}\n{stack.api.tail()}"

    observation_id = _check_products(stack, body)
    with stack.catalogue() as catalogue:
        record = catalogue.get_flow_run(flow_id)
        assert record.status == "COMPLETED" and record.observation_id == observation_id
        stale = [c for c in catalogue.child_flow_runs(flow_id) if c.status == "RUNNING"]
    assert not stale, [(c.id, c.flow_type) for c in stale]
    freed = _wait_slots_free(120)
    print(f"the dead run's concurrency slot was free {freed:.1f} s after the retry completed")


def test_prefect_server_restart_mid_batch_every_run_completes(
    stack: FaultStack, tmp_path: Path, record_property
):
    from pipeline.workflow.prefect_server import is_healthy

    if stack.worker.poll() is not None:  # the killed-worker test stopped before restarting one
        stack.start_worker("worker-restart")
    bodies = [_pair(tmp_path / f"pair-{n}", seed=101 + n) for n in range(4)]
    ids = [_start(stack, body) for body in bodies]
    deadline = time.monotonic() + 240
    while sum(_status(stack, i)["status"] == "RUNNING" for i in ids) < 2:
        assert time.monotonic() < deadline, stack.api.tail()
        time.sleep(0.2)

    down_at = time.monotonic()
    stack.server.stop_server()
    assert not is_healthy(stack.server.url)
    time.sleep(OUTAGE)
    stack.server.start_server("127.0.0.1", stack.port)
    outage = time.monotonic() - down_at
    record_property("outage_seconds", round(outage, 1))
    print(f"the Prefect server was down {outage:.1f} s")

    finals = {i: wait_for(stack.api, i, _FINAL, 300)[-1] for i in ids}
    failed = {i: s for i, s in finals.items() if s["status"] != "COMPLETED"}
    assert not failed, f"{failed}\n{stack.api.tail()}"
    assert stack.worker.poll() is None and stack.api_process.poll() is None
    for body in bodies:
        _check_products(stack, body)
    _wait_slots_free(90)
