"""Notebook execution engine: one parameterized notebook as one unit of work.

See ``NotebookRunner`` for retries, timeouts, reports and the cache, and
``KernelPool`` for warm kernels.
"""

from pipeline.runner.kernels import DEFAULT_WARMUP, Kernel, KernelPool, kill_all, start_kernel
from pipeline.runner.runner import Attempt, NotebookResult, NotebookRunner, backoff_delay

__all__ = [
    "DEFAULT_WARMUP",
    "Attempt",
    "Kernel",
    "KernelPool",
    "NotebookResult",
    "NotebookRunner",
    "backoff_delay",
    "kill_all",
    "start_kernel",
]
