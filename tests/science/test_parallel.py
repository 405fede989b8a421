"""thread_map: the same list as a loop, in order, with the first error raised."""

from __future__ import annotations

import threading

import pytest

from pipeline.science.parallel import thread_map


def test_results_come_back_in_the_items_order() -> None:
    assert thread_map(lambda x: x * x, range(10), threads=3) == [x * x for x in range(10)]
    assert thread_map(lambda x: x, [], threads=4) == []


def test_one_thread_runs_in_the_callers_thread() -> None:
    here = threading.get_ident()
    assert thread_map(lambda _: threading.get_ident(), [1, 2], threads=1) == [here, here]
    assert set(thread_map(lambda _: threading.get_ident(), [1, 2], threads=2)) != {here}


def test_the_first_failing_item_raises() -> None:
    def check(x: int) -> int:
        if x >= 2:
            raise ValueError(f"item {x}")
        return x

    with pytest.raises(ValueError, match="item 2"):
        thread_map(check, [0, 1, 2, 3], threads=2)
