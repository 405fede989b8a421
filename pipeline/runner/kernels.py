"""Jupyter kernels for notebook runs: IPC transport, a warm pool, and no survivors.

Kernels talk over IPC (Unix sockets in a private directory), so any number can start
at once without racing for TCP ports. Each kernel runs in its own process session
(jupyter_client starts it that way), so killing the flow's process group would miss
it: every kernel this process starts is recorded here and killed by process group on
``kill``, on interpreter exit, and by ``kill_all``. A kernel also exits by itself
within about a second if this process dies (ipykernel polls its parent's pid).

The pool starts kernels ahead of need and imports the heavy modules in them, so a
notebook does not pay for the kernel start or for importing the science stack. A
pooled kernel runs one notebook and is then killed, except inside a
:func:`~pipeline.runner.runner.kernel_session` (the steps of one pipeline run), where
the next notebook gets it cleared; kernels never pass from one run to another. A
background thread refills the pool.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import shutil
import signal
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

from jupyter_client import AsyncKernelManager

from pipeline.errors import KernelDiedError
from pipeline.processes import pid_alive, signal_group

__all__ = [
    "DEFAULT_WARMUP",
    "Kernel",
    "KernelPool",
    "busy_kernel_pids",
    "kill_all",
    "start_kernel",
    "wait_until_connected",
]

log = logging.getLogger(__name__)

#: Modules imported in pooled kernels before they are handed out.
DEFAULT_WARMUP: tuple[str, ...] = (
    "numpy",
    "scipy.fft",
    "astropy.io.fits",
    "astropy.table",
    "astropy.visualization",
    "matplotlib.pyplot",
    "pipeline.science.preprocessing",
    "pipeline.science.differencing",
    "pipeline.science.detection",
    "pipeline.science.validation",
    "pipeline.science.products",
)

_LIVE: dict[int, Kernel] = {}
_LIVE_LOCK = threading.Lock()


@dataclass(eq=False)
class Kernel:
    """A started kernel that runs at most one notebook.

    Attributes
    ----------
    manager : AsyncKernelManager
        The jupyter_client manager; hand it to ``nbclient.NotebookClient(km=...)``.
        It is asynchronous so that nbclient never needs jupyter's sync wrappers,
        which leave an event loop (and a helper thread) behind in every thread.
    pid : int
        Process id of the kernel (also its process-group id).
    started_at : float
        ``time.monotonic()`` when the kernel was ready.
    warm_seconds : float
        Time spent starting it and importing the warm-up modules.
    """

    manager: AsyncKernelManager
    pid: int
    runtime_dir: Path
    started_at: float = field(default_factory=time.monotonic)
    warm_seconds: float = 0.0
    busy: bool = False
    _killed: bool = False

    def is_alive(self) -> bool:
        """Whether the kernel process still runs."""
        return not self._killed and pid_alive(self.pid)

    def kill(self, *, wait: bool = True) -> None:
        """Kill the kernel's whole process group and remove its sockets. Idempotent.

        The signal is always sent at once; with ``wait=False`` the process is reaped
        and its sockets removed by a background thread.
        """
        with _LIVE_LOCK:
            _LIVE.pop(self.pid, None)
            already = self._killed
            self._killed = True
        if not already:
            signal_group(self.pid, signal.SIGKILL)
            if wait:
                self._reap()
            else:  # a big kernel takes a while to give its memory back: don't wait for it
                threading.Thread(target=self._reap, name=f"reap-{self.pid}", daemon=True).start()
        else:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def _reap(self) -> None:
        process = getattr(self.manager.provisioner, "process", None)
        with contextlib.suppress(Exception):  # reap it: no zombie, no ResourceWarning
            process.wait(timeout=5)
        with contextlib.suppress(Exception):  # the manager's control socket and context
            self.manager._close_control_socket()
            self.manager.context.destroy(linger=0)
        # The connection file and the IPC sockets live in the runtime directory.
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def start_kernel(
    kernel_name: str = "python3",
    *,
    warmup: tuple[str, ...] = (),
    startup_timeout: float = 60.0,
) -> Kernel:
    """Start a kernel over IPC and optionally import modules in it.

    Parameters
    ----------
    kernel_name : str
        Jupyter kernel spec name.
    warmup : tuple of str
        Modules to import before returning (silently, outside the execution history).
    startup_timeout : float
        Seconds to wait for the kernel to answer.

    Returns
    -------
    Kernel

    Raises
    ------
    KernelDiedError
        If the kernel does not start, or dies while importing the warm-up modules.
    """
    began = time.monotonic()
    # Short path: Unix socket paths are limited to ~107 bytes.
    runtime_dir = Path(tempfile.mkdtemp(prefix="astr-k-"))
    manager = AsyncKernelManager(
        kernel_name=kernel_name,
        transport="ipc",
        ip=str(runtime_dir / "k"),
        connection_file=str(runtime_dir / "connection.json"),
    )
    loop = asyncio.new_event_loop()
    try:
        try:
            loop.run_until_complete(manager.start_kernel())
        except Exception as exc:
            shutil.rmtree(runtime_dir, ignore_errors=True)
            raise KernelDiedError(f"kernel {kernel_name!r} could not start: {exc}") from exc
        pid = int(manager.provisioner.process.pid)  # type: ignore[union-attr]
        kernel = Kernel(manager=manager, pid=pid, runtime_dir=runtime_dir)
        with _LIVE_LOCK:
            _LIVE[pid] = kernel
        try:
            loop.run_until_complete(_wait_ready_and_import(manager, warmup, startup_timeout))
        except BaseException:
            kernel.kill()
            raise
    finally:
        loop.close()
    kernel.started_at = time.monotonic()
    kernel.warm_seconds = kernel.started_at - began
    return kernel


async def _wait_ready_and_import(
    manager: AsyncKernelManager, warmup: tuple[str, ...], timeout: float
) -> None:
    client = open_client(manager)
    try:
        try:
            await wait_until_connected(client, manager, timeout=timeout)
        except RuntimeError as exc:
            raise KernelDiedError(f"kernel did not become ready: {exc}") from exc
        if not warmup:
            return
        code = "\n".join(f"import {name}" for name in warmup)
        reply = await client.execute_interactive(
            code, silent=True, store_history=False, timeout=timeout, output_hook=lambda m: None
        )
        if reply["content"].get("status") != "ok":
            content = reply["content"]
            raise KernelDiedError(
                f"warm-up imports failed in the kernel: {content.get('ename')}: "
                f"{content.get('evalue')}"
            )
    except TimeoutError as exc:
        raise KernelDiedError(f"kernel warm-up took longer than {timeout:.0f} s") from exc
    finally:
        close_client(client)


async def wait_until_connected(client: Any, manager: Any, *, timeout: float) -> None:
    """Wait until the kernel answers ``client`` on shell and its IOPub reaches ``client``.

    jupyter_client's ``wait_for_ready`` checks the same two things but waits 0.2 s on IOPub
    after the reply and then 0.2 s more for IOPub to fall silent: at least 0.2 s per
    notebook, which was most of the runner's overhead with a warm kernel. Here any message
    on IOPub that answers one of our own ``kernel_info`` requests proves the subscription is
    live (a freshly connected SUB socket misses what was published before it joined, so the
    request is repeated, with a growing wait, until one is seen), and nothing else is waited
    for. Messages left on either channel are harmless: nbclient matches each to its request.

    Parameters
    ----------
    client : AsyncKernelClient
        A client with its channels started.
    manager : AsyncKernelManager
        The kernel's manager, asked whether the kernel still runs.
    timeout : float
        Seconds to wait in all.

    Raises
    ------
    RuntimeError
        The kernel died, or did not answer within ``timeout`` (as ``wait_for_ready``).
    """
    deadline = time.monotonic() + timeout
    sent: set[str] = set()
    reply: dict[str, Any] | None = None
    iopub_wait = 0.01
    while True:
        sent.add(client.kernel_info())
        ask_until = min(time.monotonic() + 1.0, deadline)
        while reply is None:  # the first reply only; later ones are skipped by nbclient
            try:
                msg = await client.shell_channel.get_msg(
                    timeout=max(ask_until - time.monotonic(), 0.0)
                )
            except Empty:
                break
            if msg["msg_type"] == "kernel_info_reply" and _parent(msg) in sent:
                reply = msg
        if reply is not None and await _iopub_answers(client, sent, iopub_wait):
            client._handle_kernel_info_reply(reply)  # protocol adaptation, as wait_for_ready
            return
        iopub_wait = min(2 * iopub_wait, 0.5)
        if not await manager.is_alive():
            raise RuntimeError("Kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kernel didn't respond in {timeout:.0f} seconds")


async def _iopub_answers(client: Any, sent: set[str], wait: float) -> bool:
    """Whether IOPub brings, within ``wait`` seconds, a message caused by one of ``sent``."""
    until = time.monotonic() + wait
    while True:
        try:
            msg = await client.iopub_channel.get_msg(timeout=max(until - time.monotonic(), 0.0))
        except Empty:
            return False
        if _parent(msg) in sent:
            return True


def _parent(msg: dict[str, Any]) -> str | None:
    return (msg.get("parent_header") or {}).get("msg_id")


def open_client(manager: AsyncKernelManager) -> Any:
    """An asynchronous client with its channels started, without the heartbeat.

    The heartbeat channel runs a thread with its own event loop that is never closed;
    the manager already knows whether the kernel process is alive.
    """
    client = manager.client()
    client.start_channels(hb=False)
    return client


def close_client(client: Any) -> None:
    """Stop a client's channels and destroy its zmq context."""
    with contextlib.suppress(Exception):
        client.stop_channels()
    with contextlib.suppress(Exception):
        if getattr(client, "_created_context", False) and not client.context.closed:
            client.context.destroy(linger=0)


class KernelPool:
    """Kernels started ahead of need, each handed out once.

    Parameters
    ----------
    size : int
        How many ready kernels to keep. 0 disables the pool (``acquire`` starts one).
    warmup : tuple of str
        Modules imported in each kernel before it is ready.
    kernel_name : str
        Jupyter kernel spec name.
    """

    def __init__(
        self,
        size: int = 2,
        *,
        warmup: tuple[str, ...] = DEFAULT_WARMUP,
        kernel_name: str = "python3",
    ) -> None:
        if size < 0:
            raise ValueError(f"kernel pool size must be >= 0, got {size}")
        self.size = size
        self.warmup = warmup
        self.kernel_name = kernel_name
        self._ready: deque[Kernel] = deque()
        self._starting = 0
        self._demand: int | None = None  # acquisitions still expected (None: unbounded)
        self._closed = False
        self._cond = threading.Condition()
        self._errors: deque[BaseException] = deque(maxlen=3)
        self._threads: list[threading.Thread] = []
        self._refill()

    def __enter__(self) -> KernelPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def ready(self) -> int:
        """Number of kernels ready now."""
        with self._cond:
            return len(self._ready)

    def expect(self, acquisitions: int) -> None:
        """Warm no more kernels than the next ``acquisitions`` calls to :meth:`acquire` take.

        A process that runs one known sequence of notebooks (the process a worker starts
        for one pipeline run) otherwise warms a spare behind its last notebook that no
        one takes: a kernel start and the science imports (about 2 CPU-s) thrown away
        per run. Acquisitions beyond the expected ones start a kernel on the spot.
        """
        if acquisitions < 0:
            raise ValueError(f"acquisitions must be >= 0, got {acquisitions}")
        with self._cond:
            self._demand = acquisitions

    def acquire(self, timeout: float = 120.0) -> Kernel:
        """Take a ready kernel (waiting for one being started), or start one now.

        Raises
        ------
        KernelDiedError
            If no kernel could be started.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._closed:
                raise KernelDiedError("the kernel pool is closed")
            if self._demand is not None:
                self._demand = max(self._demand - 1, 0)
            while True:
                while self._ready:
                    kernel = self._ready.popleft()
                    if kernel.is_alive():
                        break
                    kernel.kill()
                else:
                    kernel = None
                if kernel is not None or self._starting == 0 or self.size == 0:
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
        self._refill()
        if kernel is not None:
            return kernel
        return start_kernel(self.kernel_name, warmup=self.warmup)

    def close(self, wait: float = 60.0) -> None:
        """Kill the ready kernels, stop refilling, and wait for kernels being started."""
        with self._cond:
            self._closed = True
            kernels = list(self._ready)
            self._ready.clear()
            threads = list(self._threads)
            self._cond.notify_all()
        for kernel in kernels:
            kernel.kill()
        deadline = time.monotonic() + wait
        for thread in threads:
            thread.join(max(deadline - time.monotonic(), 0.0))

    def _refill(self) -> None:
        with self._cond:
            missing = self.size - len(self._ready) - self._starting
            if self._demand is not None:
                missing = min(missing, self._demand - len(self._ready) - self._starting)
            if self._closed or missing <= 0:
                return
            self._starting += missing
        for _ in range(missing):
            thread = threading.Thread(target=self._start_one, name="astr-kernel-pool", daemon=True)
            with self._cond:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def _start_one(self) -> None:
        kernel: Kernel | None = None
        try:
            kernel = start_kernel(self.kernel_name, warmup=self.warmup)
        except BaseException as exc:  # reported when acquire falls back to a direct start
            log.warning("kernel pool: a kernel failed to start: %s", exc)
            self._errors.append(exc)
        with self._cond:
            self._starting -= 1
            if kernel is not None and not self._closed:
                self._ready.append(kernel)
                kernel = None
            self._cond.notify_all()
        if kernel is not None:  # pool closed meanwhile
            kernel.kill()


def busy_kernel_pids() -> list[int]:
    """Pids of this process's kernels that are running a notebook now."""
    with _LIVE_LOCK:
        return [pid for pid, kernel in _LIVE.items() if kernel.busy and pid_alive(pid)]


def kill_all() -> None:
    """Kill every kernel this process started (pooled, running or leaked)."""
    with _LIVE_LOCK:
        kernels = list(_LIVE.values())
    for kernel in kernels:
        kernel.kill()


atexit.register(kill_all)
