"""Process helpers shared by the kernel manager and the server manager (POSIX)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

__all__ = ["is_zombie", "pid_alive", "signal_group"]


def is_zombie(pid: int) -> bool:
    """Whether ``pid`` has exited but not been reaped (false where /proc is missing)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[:1] == ["Z"]


def pid_alive(pid: int) -> bool:
    """Whether a process exists and has not exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not is_zombie(pid)


def signal_group(pid: int, sig: signal.Signals) -> None:
    """Send ``sig`` to the process group that ``pid`` leads, and to ``pid`` itself."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
