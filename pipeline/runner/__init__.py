"""Notebook execution engine: one parameterized notebook as one unit of work.

See ``NotebookRunner`` for retries, timeouts, reports and the cache, and
``KernelPool`` for warm kernels.
"""

from pipeline.runner.kernels import DEFAULT_WARMUP, Kernel, KernelPool, kill_all, start_kernel
from pipeline.runner.runner import (
    Attempt,
    KernelSession,
    NotebookResult,
    NotebookRunner,
    backoff_delay,
    kernel_session,
)

__all__ = [
    "DEFAULT_WARMUP",
    "Attempt",
    "Kernel",
    "KernelPool",
    "KernelSession",
    "NotebookResult",
    "NotebookRunner",
    "backoff_delay",
    "kernel_session",
    "kill_all",
    "start_kernel",
]
