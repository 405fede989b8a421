"""Keeping freed memory in the process: the settings chosen, and their effect measured."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pipeline.ml.heap import MMAP_THRESHOLD, TRIM_THRESHOLD, heap_settings

GLIBC = sys.platform.startswith("linux")

# Four 8 MB blocks alive at once, then freed, twenty times: with glibc's defaults the
# freed top of the heap is trimmed and its pages fault in again every round.
CHURN = """
import resource, sys
import numpy as np
from pipeline.ml.heap import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
def churn():
    arrays = [np.ones(1 << 20) for _ in range(4)]
    del arrays
churn()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    churn()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20)
"""


def _churn(mode: str, **env: str) -> tuple[str, float]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", CHURN, mode],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.split()
    return out[0], float(out[1])


def test_settings_on_linux_raise_both_thresholds():
    assert heap_settings({}, "linux") == {-3: 32 << 20, -1: 1 << 30}
    assert MMAP_THRESHOLD == 32 * 1024 * 1024 and TRIM_THRESHOLD == 1024**3


@pytest.mark.parametrize(
    "environ",
    [
        {"MALLOC_TRIM_THRESHOLD_": "131072"},
        {"MALLOC_MMAP_THRESHOLD_": "65536"},
        {"MALLOC_TOP_PAD_": "0"},
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"},
    ],
)
def test_the_users_malloc_settings_win(environ):
    assert heap_settings(environ, "linux") == {}


def test_other_tunables_do_not_stop_it():
    assert heap_settings({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F"}, "linux")


def test_nothing_is_set_off_linux():
    assert heap_settings({}, "darwin") == {}
    assert heap_settings({}, "win32") == {}


@pytest.mark.skipif(not GLIBC, reason="glibc malloc settings")
def test_freed_blocks_are_reused_instead_of_faulting_in_again():
    _, faults_default = _churn("none")
    kept, faults_kept = _churn("keep")
    assert kept == "True"
    assert faults_default > 1000  # at least one 8 MB block (2,048 pages) again per round
    assert faults_kept < 50


@pytest.mark.skipif(not GLIBC, reason="glibc malloc settings")
def test_the_environment_turns_it_off():
    kept, faults = _churn("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False"
    assert faults > 1000


@pytest.mark.skipif(not GLIBC, reason="glibc malloc settings")
def test_scoring_keeps_the_heap_from_its_first_call():
    code = (
        "import numpy as np\n"
        "from pipeline.ml import heap\n"
        "from pipeline.ml.model import RealBogusNet\n"
        "from pipeline.ml.train import predict_logits\n"
        "before = heap._applied\n"
        "predict_logits(RealBogusNet().eval(), np.zeros((2, 4, 63, 63), np.float32))\n"
        "print(before, heap._applied)\n"
    )
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    clean.pop("GLIBC_TUNABLES", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=clean,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert out.stdout.split() == ["None", "True"]
