"""How many spare kernels a process keeps warm."""

from __future__ import annotations

from pipeline.flows.runtime import pool_size


def test_a_process_started_for_one_run_keeps_one_spare_kernel() -> None:
    # its spares die with it: each extra one is a wasted kernel start per run
    assert pool_size({"PREFECT__FLOW_RUN_ID": "0b7e6c1e-1a6f-4d55-9f3e-2f0b8a4c7d11"}) == 1


def test_a_long_lived_process_keeps_three() -> None:
    assert pool_size({}) == 3
    assert pool_size({"PREFECT__FLOW_RUN_ID": ""}) == 3
