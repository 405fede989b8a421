"""The notebook runner against real kernels."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from pipeline.errors import (
    KernelDiedError,
    NotebookCancelledError,
    NotebookCellError,
    NotebookError,
    NotebookTimeoutError,
)
from pipeline.runner import (
    KernelPool,
    NotebookRunner,
    backoff_delay,
    kernel_session,
    start_kernel,
)
from pipeline.runner.cache import cache_key, source_digest
from pipeline.runner.kernels import busy_kernel_pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


@pytest.fixture
def runner(tmp_path: Path) -> NotebookRunner:
    return NotebookRunner(
        tmp_path / "work", retry_attempts=1, backoff=0.05, cache_dir=tmp_path / "cache"
    )


def test_parameters_injected_and_outputs_returned(runner, make_notebook, tmp_path):
    nb = make_notebook()
    lines: list[str] = []
    progress: list[tuple[int, int]] = []
    result = runner.run(
        nb,
        {"x": 42},
        on_text=lambda cell, text: lines.append(text),
        on_progress=lambda done, total, cell: progress.append((done, total)),
    )
    assert result.outputs["x"] == 42
    assert result.outputs["cwd"] == str(nb.parent.resolve())  # relative paths as in JupyterLab
    assert not result.cached and result.attempt_count == 1
    assert (result.output_dir / "result.txt").read_text() == "42"
    assert result.output_dir.is_relative_to(tmp_path / "work" / "probe")
    executed = nbformat.read(result.executed_notebook, as_version=4)
    assert executed.metadata["astr"]["status"] == "completed"
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    assert "started 42" in result.html_report.read_text()
    assert result.html_report_uri.startswith("file://")
    assert "started 42\n" in "".join(lines)
    total = progress[-1][1]
    assert progress[-1] == (total, total) and total == 9  # parameters, injected parameters, 7 cells
    assert result.durations["wall"] >= result.durations["kernel"] > 0
    assert result.attempts[0].kernel_seconds == pytest.approx(result.durations["kernel"])


def test_cache_hit_force_and_invalidation(runner, make_notebook, tmp_path):
    nb = make_notebook()
    data = tmp_path / "input.txt"
    data.write_text("a")
    first = runner.run(nb, {"x": 1}, inputs={"data": data})
    second = runner.run(nb, {"x": 1}, inputs={"data": data})
    assert second.cached and second.outputs == first.outputs
    assert second.output_dir == first.output_dir and second.cache_key == first.cache_key
    assert not runner.run(nb, {"x": 1}, inputs={"data": data}, force=True).cached
    assert not runner.run(nb, {"x": 2}, inputs={"data": data}).cached  # parameters
    data.write_text("b")
    assert not runner.run(nb, {"x": 1}, inputs={"data": data}).cached  # input checksum
    # a product changed behind the cache's back: the entry is not trusted
    latest = runner.run(nb, {"x": 1}, inputs={"data": data})
    assert latest.cached
    (latest.output_dir / "result.txt").write_text("tampered")
    assert not runner.run(nb, {"x": 1}, inputs={"data": data}).cached


def test_cache_key_ignores_output_dir_only():
    base = cache_key(b"nb", {"x": 1, "output_dir": "/a"}, {"i": "0" * 64})
    assert base == cache_key(b"nb", {"output_dir": "/b", "x": 1}, {"i": "0" * 64})
    assert base != cache_key(b"nb2", {"x": 1}, {"i": "0" * 64})
    assert base != cache_key(b"nb", {"x": 2}, {"i": "0" * 64})
    assert base != cache_key(b"nb", {"x": 1}, {"i": "1" * 64})


def test_cache_key_changes_with_the_code(tmp_path):
    """An upgraded pipeline or library must not be served results of the old code."""
    package = tmp_path / "pkg"
    (package / "science").mkdir(parents=True)
    module = package / "science" / "zogy.py"
    module.write_text("THRESHOLD = 5\n")
    (package / "notes.txt").write_text("not code")
    versions = {"numpy": "2.4.6"}
    old = source_digest(package, versions)
    (package / "notes.txt").write_text("changed, still not code")
    assert source_digest(package, versions) == old
    module.write_text("THRESHOLD = 4\n")
    edited = source_digest(package, versions)
    assert edited != old
    assert source_digest(package, {"numpy": "2.5.0"}) != edited
    module.rename(package / "science" / "zogy2.py")  # same bytes, another module
    assert source_digest(package, versions) != edited
    args = (b"nb", {"x": 1}, {"i": "0" * 64})
    assert cache_key(*args, code=old) != cache_key(*args, code=edited)
    assert cache_key(*args) == cache_key(*args)  # the installed code, stable in a process


def test_cell_error_fails_at_once_with_source_and_traceback(runner, make_notebook):
    nb = make_notebook()
    with pytest.raises(NotebookCellError) as info:
        runner.run(nb, {"fail": "bad pixel scale"})
    message = str(info.value)
    assert "ValueError: bad pixel scale" in message
    assert "raise ValueError(fail)" in message  # the cell's source
    assert "Traceback" in message and "\x1b[" not in message
    assert len(info.value.attempts) == 1  # a bug is not retried
    attempt = info.value.attempts[0]
    assert attempt.status == "failed" and attempt.notebook.name == "probe.failed.ipynb"
    kept = nbformat.read(attempt.notebook, as_version=4)
    assert kept.metadata["astr"]["status"] == "failed"
    assert "FAILED" in kept.cells[0].source and "FAILED" in attempt.html.read_text()


def test_transient_error_is_retried(runner, make_notebook, tmp_path):
    result = runner.run(make_notebook(), {"flaky": str(tmp_path / "flaky.marker")})
    assert [a.status for a in result.attempts] == ["failed", "completed"]
    assert "ConnectionError" in result.attempts[0].error


def test_kernel_death_is_retried_and_both_attempts_kept(runner, make_notebook, tmp_path):
    result = runner.run(make_notebook(), {"crash": str(tmp_path / "crash.marker")})
    assert [a.status for a in result.attempts] == ["kernel_died", "completed"]
    for attempt in result.attempts:
        assert attempt.notebook.exists() and attempt.html.exists()
    died = nbformat.read(result.attempts[0].notebook, as_version=4)
    assert died.metadata["astr"]["status"] == "kernel_died"


def test_notebook_timeout_fails_with_a_message_saying_so(runner, make_notebook):
    with pytest.raises(NotebookTimeoutError, match="time limit") as info:
        runner.run(make_notebook(), {"sleep": 60}, timeout=2)
    assert [a.status for a in info.value.attempts] == ["timed_out", "timed_out"]
    kept = nbformat.read(info.value.attempts[0].notebook, as_version=4)
    printed = [o.get("text", "") for c in kept.cells for o in c.get("outputs", [])]
    assert "started 1\n" in printed and "slept\n" not in printed


def test_cell_timeout(tmp_path, make_notebook):
    runner = NotebookRunner(tmp_path / "w", retry_attempts=0, cell_timeout=2)
    with pytest.raises(NotebookTimeoutError, match="per-cell limit"):
        runner.run(make_notebook(), {"sleep": 60})


def test_cancel_stops_the_kernel_and_marks_the_partial_notebook(runner, make_notebook):
    cancel = threading.Event()
    pids: list[int] = []

    def on_text(cell: int, text: str) -> None:
        if text.startswith("started"):
            pids.extend(busy_kernel_pids())
            cancel.set()

    began = time.monotonic()
    with pytest.raises(NotebookCancelledError) as info:
        runner.run(make_notebook(), {"sleep": 60}, cancel_event=cancel, on_text=on_text)
    assert time.monotonic() - began < 10
    assert pids and all(_wait_gone(pid, 5) for pid in pids)
    attempt = info.value.attempts[-1]
    assert attempt.status == "cancelled" and attempt.notebook.name == "probe.cancelled.ipynb"
    kept = nbformat.read(attempt.notebook, as_version=4)
    assert "CANCELLED" in kept.cells[0].source
    assert "started" in attempt.notebook.read_text()  # the output so far is kept


class _Stop(BaseException):
    """What a stop signal's handler raises (as Prefect's TerminationSignal on SIGTERM)."""


def _stop_on(sig: signal.Signals):
    """Install a handler of ``sig`` that raises ``_Stop`` in the main thread; yield it."""

    def handler(signum, frame):
        raise _Stop()

    previous = signal.signal(sig, handler)
    try:
        yield handler
    finally:
        signal.signal(sig, previous)


@pytest.fixture
def stop_on_sigusr1():
    """SIGUSR1 raises ``_Stop`` in the main thread, as SIGTERM raises in a flow run."""
    yield from _stop_on(signal.SIGUSR1)


def test_a_stop_while_the_report_is_written_keeps_the_report(
    runner, make_notebook, monkeypatch, stop_on_sigusr1
):
    # The orchestrator's SIGTERM for a cancel can arrive while the cancelled notebook's
    # report is being written; the attempt must still keep its marked notebook.
    from pipeline.runner import reports

    render = reports._render_html

    def slow_render(nb):
        os.kill(os.getpid(), signal.SIGUSR1)  # handled in the main thread, mid-write
        time.sleep(0.3)
        return render(nb)

    monkeypatch.setattr(reports, "_render_html", slow_render)
    cancel = threading.Event()

    def on_text(cell: int, text: str) -> None:
        if text.startswith("started"):
            cancel.set()

    with pytest.raises(_Stop):
        runner.run(make_notebook(), {"sleep": 60}, cancel_event=cancel, on_text=on_text)
    (attempt,) = runner.work_dir.glob("probe/*/attempt-*")
    assert sorted(p.name for p in attempt.iterdir() if p.is_file()) == [
        "probe.cancelled.html",
        "probe.cancelled.ipynb",
    ]
    kept = nbformat.read(attempt / "probe.cancelled.ipynb", as_version=4)
    assert "CANCELLED" in kept.cells[0].source and "started" in str(kept.cells)
    assert "CANCELLED" in (attempt / "probe.cancelled.html").read_text()


@pytest.fixture
def stop_on_sigterm():
    """SIGTERM raises ``_Stop`` in the main thread (Prefect's handler in a flow run)."""
    yield from _stop_on(signal.SIGTERM)


def test_sigterm_reaches_the_process_handler_and_the_notebook_is_kept(
    runner, make_notebook, stop_on_sigterm
):
    # A cancel's SIGTERM must reach the handler the process installed (not one of the
    # notebook client's), and the handler must still be there after every notebook.
    runner.run(make_notebook("first"), {})
    assert signal.getsignal(signal.SIGTERM) is stop_on_sigterm
    seen = []

    def on_text(cell: int, text: str) -> None:
        if text.startswith("started"):
            seen.append(signal.getsignal(signal.SIGTERM))
            seen.extend(busy_kernel_pids())
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(_Stop):
        runner.run(make_notebook(), {"sleep": 60}, on_text=on_text)
    assert seen[0] is stop_on_sigterm
    assert all(_wait_gone(pid, 5) for pid in seen[1:])
    assert signal.getsignal(signal.SIGTERM) is stop_on_sigterm
    (attempt,) = runner.work_dir.glob("probe/*/attempt-*")  # no second attempt
    kept = nbformat.read(attempt / "probe.cancelled.ipynb", as_version=4)
    assert "CANCELLED" in kept.cells[0].source and "started" in str(kept.cells)


def test_a_stop_while_waiting_for_a_kernel_leaves_a_marked_notebook(
    runner, make_notebook, monkeypatch
):
    def stopped(self, session=None):
        raise _Stop()

    monkeypatch.setattr(NotebookRunner, "_kernel", stopped)
    with pytest.raises(_Stop):
        runner.run(make_notebook(), {})
    (attempt,) = runner.work_dir.glob("probe/*/attempt-*")
    kept = nbformat.read(attempt / "probe.cancelled.ipynb", as_version=4)
    assert kept.metadata["astr"]["status"] == "cancelled"
    assert "stopped before the notebook started" in kept.cells[0].source


def test_missing_outputs_json_is_a_contract_error(runner, make_notebook):
    with pytest.raises(NotebookError, match=r"outputs\.json"):
        runner.run(make_notebook(), {"write_outputs": False})


def test_unreadable_notebook(runner, tmp_path):
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    with pytest.raises(NotebookError, match="cannot read notebook"):
        runner.run(bad)


def test_pool_kernels_are_warm_used_once_and_share_no_state(tmp_path, make_notebook):
    with KernelPool(1, warmup=("numpy",)) as pool:
        runner = NotebookRunner(tmp_path / "w", pool=pool)
        nb = make_notebook()
        first = runner.run(nb, {"x": 1})
        second = runner.run(nb, {"x": 2})
    assert first.outputs["numpy_preloaded"] and second.outputs["numpy_preloaded"]
    assert first.outputs["pid"] != second.outputs["pid"]
    assert not first.outputs["leak"] and not second.outputs["leak"]
    assert not _alive(first.outputs["pid"]) and not _alive(second.outputs["pid"])


def test_pool_warms_no_kernel_beyond_the_expected_notebooks() -> None:
    with KernelPool(1, warmup=()) as pool:
        pool.expect(2)
        kernels = [pool.acquire(), pool.acquire()]  # the second was warmed behind the first
        time.sleep(3.0)  # a kernel without imports starts in well under a second
        assert pool.ready == 0  # none warmed behind the last expected one
        kernels.append(pool.acquire())  # one more than expected: started on the spot
        assert all(kernel.is_alive() for kernel in kernels)
        assert len({kernel.pid for kernel in kernels}) == 3
        for kernel in kernels:
            kernel.kill()
    with pytest.raises(ValueError, match="acquisitions"):
        KernelPool(0).expect(-1)


def test_a_kernel_session_runs_notebooks_in_one_cleared_kernel(tmp_path, make_notebook):
    nb = make_notebook()
    with KernelPool(1, warmup=("numpy",)) as pool:
        runner = NotebookRunner(tmp_path / "w", pool=pool, retry_attempts=1, backoff=0.01)
        with kernel_session():
            first = runner.run(nb, {"x": 1})
            second = runner.run(nb, {"x": 2})
            # a failed notebook's kernel is never reused: the retry and the next get new ones
            with pytest.raises(NotebookCellError):
                runner.run(nb, {"x": 3, "fail": "boom"})
            third = runner.run(nb, {"x": 4})
        outside = runner.run(nb, {"x": 5})
    pids = [r.outputs["pid"] for r in (first, second, third, outside)]
    assert pids[0] == pids[1]  # the second notebook ran in the first one's kernel
    assert len({pids[1], pids[2], pids[3]}) == 3
    # cleared in between: no name, no figure state, execution counts from 1 again
    assert not any(r.outputs["leak"] for r in (first, second, third, outside))
    executed = nbformat.read(second.attempts[-1].notebook, as_version=4)
    counts = [c.execution_count for c in executed.cells if c.cell_type == "code"]
    assert counts[0] == 1
    assert second.outputs["numpy_preloaded"]
    # the session's kernels are gone once it ends
    assert _wait_gone(pids[2], 5) and _wait_gone(pids[0], 5)


def test_kernels_use_ipc_and_run_concurrently(tmp_path, make_notebook):
    kernel = start_kernel()
    try:
        info = json.loads(Path(kernel.manager.connection_file).read_text())
        assert info["transport"] == "ipc"
    finally:
        kernel.kill()
    assert _wait_gone(kernel.pid, 5)
    runner = NotebookRunner(tmp_path / "w", retry_attempts=0)
    nb = make_notebook()
    results: dict[int, int] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            results[i] = runner.run(nb, {"x": i}).outputs["x"]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == {i: i for i in range(4)}


SCRIPT = """
import sys, time
from pipeline.runner import KernelPool
pool = KernelPool(1, warmup=())
kernel = pool.acquire()
print(kernel.pid, flush=True)
sys.stdin.readline()  # exit (or hang) when told
if sys.argv[1] == "hang":
    time.sleep(60)
"""


@pytest.mark.parametrize("how", ["exit", "sigkill"])
def test_no_kernel_outlives_its_process(how):
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, "exit" if how == "exit" else "hang"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    pid = int(proc.stdout.readline())
    assert _alive(pid)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    if how == "sigkill":
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stdin.close()
    proc.stdout.close()
    assert _wait_gone(pid, 10), f"kernel {pid} outlived its process ({how})"


def test_backoff_is_exponential_with_jitter():
    rng = random.Random(0)
    delays = [[backoff_delay(n, 1.0, 30.0, rng) for _ in range(200)] for n in (1, 2, 3, 9)]
    for n, sample in zip((1, 2, 3), delays, strict=False):
        centre = 2 ** (n - 1)
        assert 0.5 * centre <= min(sample) and max(sample) < 1.5 * centre
        assert max(sample) - min(sample) > 0.5 * centre  # jittered
    assert max(delays[3]) < 45  # capped at 30 s x jitter


def test_kernel_that_cannot_start_is_reported(tmp_path, make_notebook):
    runner = NotebookRunner(tmp_path / "w", retry_attempts=0, kernel_name="no-such-kernel")
    with pytest.raises(KernelDiedError, match="no-such-kernel"):
        runner.run(make_notebook())
