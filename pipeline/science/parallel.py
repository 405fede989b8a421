"""Independent pieces of one step side by side in threads (the heavy work releases the GIL)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

__all__ = ["thread_map"]


def thread_map(func: Callable[[Any], Any], items: Sequence, threads: int | None = None) -> list:
    """``[func(item) for item in items]``, in up to ``threads`` threads (default: the cores).

    Worth it where the work is NumPy, scipy.ndimage or scipy.fft on large arrays, which
    release the GIL: the two images of a pair, the tiles of a difference. With one
    thread, or one item, it runs in the caller's thread. The first exception raised, in
    the items' order, propagates.
    """
    count = min(len(items), threads or os.cpu_count() or 1)
    if count <= 1:
        return [func(item) for item in items]
    with ThreadPoolExecutor(max_workers=count) as pool:
        return list(pool.map(func, items))
