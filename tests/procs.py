"""Processes seen in /proc: find notebook kernels under a worker and check they are gone."""

from __future__ import annotations

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
