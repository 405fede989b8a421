"""Processes and ports for tests: kernels under a worker, process groups, free ports."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path


def processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every process we can see."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] == "Z":
            continue
        found[int(entry.name)] = (int(fields[1]), cmdline)
    return found


def kernels_under(root: int) -> set[int]:
    procs = processes()
    kernels = set()
    for pid, (_, cmdline) in procs.items():
        if "ipykernel" not in cmdline:
            continue
        parent = pid
        while parent in procs and parent != root and parent > 1:
            parent = procs[parent][0]
        if parent == root:
            kernels.add(pid)
    return kernels


def alive(pid: int) -> bool:
    return pid in processes()


def free_port() -> int:
    """A loopback TCP port nothing listens on (now)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_group(process: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM a process started with ``start_new_session=True`` and its group; SIGKILL late."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
