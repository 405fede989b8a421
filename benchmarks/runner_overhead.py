"""Notebook runner overhead against papermill, on the chain of the five observation notebooks.

Overhead is what a notebook run costs beyond executing its cells: wall time of the call minus
the in-kernel time of its cells (``iopub.execute_input`` to ``shell.execute_reply`` in each
cell's ``execution`` metadata, the same sum for both contenders, see
:func:`pipeline.runner.execute.kernel_seconds`).

* **runner**: :class:`pipeline.runner.NotebookRunner` with a warm :class:`KernelPool`, the
  cache off and ``force=True``, in steady state: one untimed chain first, and before each
  timed notebook the pool is left to refill (not timed), so every run finds a ready kernel.
  ``--no-settle`` runs the chain back to back instead (``kernel_wait`` then shows how far
  the pool's refill falls behind on this machine). Its overhead includes the HTML report.
* **papermill**: ``papermill.execute_notebook`` cold (it starts a kernel for every notebook),
  ``kernel_name="python3"``, no output logging, no progress bar, no save per cell, run in the
  notebook's directory like the runner. One untimed notebook first warms this process.

The two alternate within each repeat (order swapped every repeat), so machine load drifts
over both. Timing is relative: read the ratio, not the seconds (the absolute overhead grows
with the machine's load, printed at the start and the end). The targets are checked and
printed as PASS/FAIL; the exit status is always 0. The kernels' own warnings go to stderr.

Usage::

    python benchmarks/runner_overhead.py [--repeats 3] [--quick] [--sim] [--detail]
                                         [--pool 2] [--no-settle] [--keep]

``--sim`` runs on a simulated 1024x1024 pair instead of the DECam pair in
``tests/data/decam``; ``--detail`` splits the runner's overhead further by timing a few of its
internal calls (kernel connection, cell round trips, kernel kill, HTML rendering).
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks" / "observations"
DECAM = ROOT / "tests" / "data" / "decam"
STEPS = ("01_ingestion", "02_preprocessing", "03_differencing", "04_detection", "05_validation")

OVERHEAD_TARGET_S = 0.3
RATIO_TARGET = 4.0

Row = dict[str, float]


def step_parameters(step: str, science: Path, reference: Path, dirs: dict[str, Path]) -> dict:
    """Parameters of one chain step, wired to the products of the earlier steps.

    Parameters
    ----------
    step : str
        Notebook stem.
    science, reference : Path
        The raw pair given to ingestion.
    dirs : dict
        ``output_dir`` of each earlier step by notebook stem.

    Returns
    -------
    dict
        Parameters without ``output_dir``.
    """
    if step == "01_ingestion":
        return {"science_path": str(science), "reference_path": str(reference)}
    if step == "02_preprocessing":
        ingested = dirs["01_ingestion"]
        return {
            "science_path": str(ingested / "science.fits"),
            "reference_path": str(ingested / "reference.fits"),
        }
    preprocessed = str(dirs["02_preprocessing"] / "preprocessed.fits")
    if step == "03_differencing":
        return {"preprocessed_path": preprocessed}
    difference = str(dirs["03_differencing"] / "difference.fits")
    if step == "04_detection":
        return {"preprocessed_path": preprocessed, "difference_path": difference}
    return {
        "detections_path": str(dirs["04_detection"] / "detections.ecsv"),
        "preprocessed_path": preprocessed,
        "difference_path": difference,
    }


def check_products(step: str, outputs: dict[str, Any], output_dir: Path) -> None:
    """Fail loudly if a step did not write the products it lists."""
    products = outputs.get("products", {})
    names = products.values() if isinstance(products, dict) else products
    missing = [name for name in names if not (output_dir / name).exists()]
    if not products or missing:
        raise RuntimeError(f"{step}: products missing in {output_dir}: {missing or products}")


class Timers:
    """Seconds spent in selected runner internals during one notebook run (``--detail``).

    Wraps functions in place and restores them on ``restore``; a name that no longer exists
    is skipped and reported, so the benchmark keeps working when the runner changes.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.skipped: list[str] = []
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, name: str, key: str) -> None:
        """Time calls of ``owner.name`` under ``key``."""
        original = getattr(owner, name, None)
        if original is None:
            self.skipped.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return
        seconds = self.seconds

        if inspect.iscoroutinefunction(original):

            @functools.wraps(original)
            async def timed(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    seconds[key] += time.perf_counter() - began

        else:

            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                began = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    seconds[key] += time.perf_counter() - began

        setattr(owner, name, timed)
        self._undo.append(lambda: setattr(owner, name, original))

    def wrap_cells(self, client_class: type) -> None:
        """Time each cell's round trip beyond its in-kernel time, under ``cells``."""
        from pipeline.runner.execute import kernel_seconds

        original = client_class.async_execute_cell
        seconds = self.seconds

        @functools.wraps(original)
        async def timed(self: Any, cell: Any, index: int, *args: Any, **kwargs: Any) -> Any:
            began = time.perf_counter()
            result = await original(self, cell, index, *args, **kwargs)
            spent = time.perf_counter() - began
            in_kernel = kernel_seconds(_OneCell(cell)) if cell.cell_type == "code" else 0.0
            seconds["cells"] += max(spent - in_kernel, 0.0)
            return result

        client_class.async_execute_cell = timed
        self._undo.append(lambda: setattr(client_class, "async_execute_cell", original))

    def restore(self) -> None:
        """Put the original functions back."""
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()


class _OneCell:
    """Just enough of a notebook for ``kernel_seconds`` to time one cell."""

    def __init__(self, cell: Any) -> None:
        self.cells = [cell]


DETAIL_KEYS = ("connect", "cells", "kill", "html")


def install_detail_timers() -> Timers:
    """Wrap the runner internals that ``--detail`` reports."""
    from pipeline.runner import execute, kernels, reports

    timers = Timers()
    timers.wrap(execute._StreamingClient, "async_start_new_kernel_client", "connect")
    timers.wrap_cells(execute._StreamingClient)
    timers.wrap(kernels.Kernel, "kill", "kill")
    timers.wrap(reports, "_render_html", "html")
    return timers


def run_runner_chain(
    runner: Any,
    pool: Any,
    science: Path,
    reference: Path,
    *,
    settle: bool,
    timers: Timers | None,
) -> list[Row]:
    """One chain through ``NotebookRunner``; a row of durations per notebook."""
    dirs: dict[str, Path] = {}
    rows = []
    for step in STEPS:
        if settle:
            wait_for_pool(pool)
        if timers is not None:
            timers.seconds.clear()
        result = runner.run(
            NOTEBOOKS / f"{step}.ipynb",
            step_parameters(step, science, reference, dirs),
            force=True,
        )
        check_products(step, result.outputs, result.output_dir)
        dirs[step] = result.output_dir
        d = result.durations
        row = {
            "wall": d["wall"],
            "kernel": d["kernel"],
            "overhead": d["overhead"],
            "kernel_wait": d["kernel_wait"],
            "report": d["report"],
            "rest": d["overhead"] - d["kernel_wait"] - d["report"],
        }
        if timers is not None:
            row.update({key: timers.seconds.get(key, 0.0) for key in DETAIL_KEYS})
        rows.append(row)
    return rows


def run_papermill_chain(work: Path, science: Path, reference: Path) -> list[Row]:
    """One chain through ``papermill.execute_notebook`` (a new kernel per notebook)."""
    import papermill

    from pipeline.runner.execute import kernel_seconds

    work.mkdir(parents=True)
    dirs: dict[str, Path] = {}
    rows = []
    for step in STEPS:
        output_dir = work / step
        output_dir.mkdir()
        parameters = {
            **step_parameters(step, science, reference, dirs),
            "output_dir": str(output_dir),
        }
        began = time.perf_counter()
        nb = papermill.execute_notebook(
            str(NOTEBOOKS / f"{step}.ipynb"),
            str(work / f"{step}.ipynb"),
            parameters=parameters,
            kernel_name="python3",
            log_output=False,
            progress_bar=False,
            request_save_on_cell_execute=False,
            cwd=str(NOTEBOOKS),
        )
        wall = time.perf_counter() - began
        outputs = json.loads((output_dir / "outputs.json").read_text())
        check_products(step, outputs, output_dir)
        dirs[step] = output_dir
        kernel = kernel_seconds(nb)
        rows.append({"wall": wall, "kernel": kernel, "overhead": wall - kernel})
    return rows


def wait_for_pool(pool: Any, timeout: float = 120.0) -> None:
    """Wait (untimed) until every pooled kernel is started and warm, then a moment more."""
    deadline = time.monotonic() + timeout
    while pool.ready < pool.size and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # let the last kernel's teardown and start-up finish on a small machine


def write_simulated_pair(folder: Path) -> tuple[Path, Path]:
    """A simulated 1024x1024 pair written as FITS; the science and reference paths."""
    from pipeline.science.io import write_image
    from pipeline.science.simulate import simulate_pair

    pair = simulate_pair(shape=(1024, 1024), seed=0)
    science, reference = folder / "science.fits", folder / "reference.fits"
    write_image(pair.science, science)
    write_image(pair.reference, reference)
    return science, reference


def median_by_step(chains: list[list[Row]], key: str) -> list[float]:
    """Median of ``key`` for each step over the chains."""
    return [statistics.median(chain[i][key] for chain in chains) for i in range(len(STEPS))]


def table(title: str, chains: list[list[Row]], keys: tuple[str, ...]) -> list[str]:
    """Lines of a table of per-step medians, with an all-notebooks median row."""
    lines = [title, f"  {'notebook':<18}" + "".join(f"{key:>12}" for key in keys)]
    columns = {key: median_by_step(chains, key) for key in keys}
    for i, step in enumerate(STEPS):
        lines.append(f"  {step:<18}" + "".join(f"{columns[key][i]:12.3f}" for key in keys))
    every = {key: [row[key] for chain in chains for row in chain] for key in keys}
    label = f"all ({len(every[keys[0]])} runs)"
    lines.append(f"  {label:<18}" + "".join(f"{statistics.median(every[k]):12.3f}" for k in keys))
    return lines


@contextmanager
def scratch(keep: bool) -> Iterator[Path]:
    """A temporary directory, removed afterwards unless ``keep``."""
    folder = Path(tempfile.mkdtemp(prefix="astr-bench-runner-"))
    try:
        yield folder
    finally:
        if keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


def versions() -> str:
    """Versions of the pieces that matter here."""
    from importlib.metadata import version

    names = ("papermill", "nbclient", "nbconvert", "jupyter_client", "ipykernel", "pyzmq")
    parts = [f"python {platform.python_version()}"]
    for name in names:
        try:
            parts.append(f"{name} {version(name)}")
        except Exception:
            parts.append(f"{name} ?")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed chains per contender")
    parser.add_argument("--quick", action="store_true", help="one timed chain each")
    parser.add_argument("--pool", type=int, default=2, help="kernel pool size (default 2)")
    parser.add_argument("--sim", action="store_true", help="simulated 1024x1024 pair")
    parser.add_argument("--no-settle", action="store_true", help="run the chain back to back")
    parser.add_argument("--detail", action="store_true", help="split the runner's overhead")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    args = parser.parse_args(argv)
    repeats = 1 if args.quick else max(args.repeats, 1)
    settle = not args.no_settle
    os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")

    from pipeline.runner import KernelPool, NotebookRunner

    with scratch(args.keep) as work:
        if args.sim:
            science, reference = write_simulated_pair(work)
            data = "simulated 1024x1024 pair (simulate_pair seed 0)"
        else:
            science, reference = DECAM / "DEC-OBS04a.mini.fits", DECAM / "Stack-DEC-OBS18.fits"
            data = f"DECam pair {science.name} / {reference.name}"
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print("Runner overhead per notebook: NotebookRunner (warm pool) vs papermill (cold)")
        print(f"chain: {' -> '.join(STEPS)}")
        print(f"data: {data}")
        print(
            f"repeats: {repeats}, pool: {args.pool}, settle before each notebook: "
            f"{'yes' if settle else 'no'}, CPUs: {os.cpu_count()}, load average: {load}"
        )
        print(versions())
        print()

        pool = KernelPool(args.pool)
        runner = NotebookRunner(work / "runner", pool=pool, cache_dir=None, retry_attempts=0)
        timers: Timers | None = None
        try:
            wait_for_pool(pool)
            began = time.perf_counter()
            run_runner_chain(runner, pool, science, reference, settle=settle, timers=None)
            first_pm = time.perf_counter()
            warm_papermill(work / "papermill-warmup", science, reference)
            print(
                f"warm-up (untimed): one runner chain {first_pm - began:.1f} s, "
                f"one papermill notebook {time.perf_counter() - first_pm:.1f} s"
            )
            if args.detail:
                timers = install_detail_timers()
            ours: list[list[Row]] = []
            theirs: list[list[Row]] = []
            for rep in range(repeats):
                order = ("runner", "papermill") if rep % 2 == 0 else ("papermill", "runner")
                for who in order:
                    if who == "runner":
                        ours.append(
                            run_runner_chain(
                                runner, pool, science, reference, settle=settle, timers=timers
                            )
                        )
                    else:
                        theirs.append(
                            run_papermill_chain(work / f"papermill-{rep}", science, reference)
                        )
                print(f"repeat {rep + 1}/{repeats} done")
        finally:
            if timers is not None:
                timers.restore()
            pool.close()
        print()
        report(ours, theirs, detail=args.detail, skipped=timers.skipped if timers else [])
        load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"load average at the end: {load} (on {os.cpu_count()} CPUs)")
    return 0


def warm_papermill(work: Path, science: Path, reference: Path) -> None:
    """Warm papermill's side of this process with one untimed notebook."""
    import papermill

    work.mkdir(parents=True)
    papermill.execute_notebook(
        str(NOTEBOOKS / f"{STEPS[0]}.ipynb"),
        str(work / f"{STEPS[0]}.ipynb"),
        parameters={
            **step_parameters(STEPS[0], science, reference, {}),
            "output_dir": str(work),
        },
        kernel_name="python3",
        log_output=False,
        progress_bar=False,
        request_save_on_cell_execute=False,
        cwd=str(NOTEBOOKS),
    )


def report(
    ours: list[list[Row]], theirs: list[list[Row]], *, detail: bool, skipped: list[str]
) -> None:
    """Print the tables, the ratios and the targets."""
    n = len(ours)
    keys = ("wall", "kernel", "overhead", "kernel_wait", "report", "rest")
    if detail:
        keys = (*keys, *DETAIL_KEYS)
    for line in table(f"runner, warm pool: medians over {n} chains (seconds)", ours, keys):
        print(line)
    if detail:
        print(
            "  (rest = overhead - kernel_wait - report; detail columns: connect = client "
            "connection incl. kernel_info and chdir,\n   cells = cell round trips beyond "
            "in-kernel time, kill = Kernel.kill calls, html = HTML rendering inside report)"
        )
        if skipped:
            print(f"  not timed (no longer in the runner): {', '.join(skipped)}")
    print()
    for line in table(
        f"papermill, cold kernel: medians over {len(theirs)} chains (seconds)",
        theirs,
        ("wall", "kernel", "overhead"),
    ):
        print(line)
    print()

    ours_step = median_by_step(ours, "overhead")
    theirs_step = median_by_step(theirs, "overhead")
    print("overhead per notebook, papermill / runner (medians)")
    for step, a, b in zip(STEPS, theirs_step, ours_step, strict=True):
        print(f"  {step:<18}{b:10.3f} s {a:10.3f} s {a / b:8.1f}x")
    chain_ratios = [
        sum(row["overhead"] for row in pm) / sum(row["overhead"] for row in rn)
        for rn, pm in zip(ours, theirs, strict=True)
    ]
    ratio = statistics.median(chain_ratios)
    all_ours = statistics.median(row["overhead"] for chain in ours for row in chain)
    all_theirs = statistics.median(row["overhead"] for chain in theirs for row in chain)
    worst = max(ours_step)
    ours_total = statistics.median(sum(row["overhead"] for row in chain) for chain in ours)
    theirs_total = statistics.median(sum(row["overhead"] for row in chain) for chain in theirs)
    print(
        f"  chain total (median): runner {ours_total:.3f} s, papermill {theirs_total:.3f} s;"
        f" papermill/runner per repeat: {', '.join(f'{r:.1f}x' for r in chain_ratios)}"
    )
    print()
    print("targets")
    verdict = "PASS" if worst <= OVERHEAD_TARGET_S else "FAIL"
    print(
        f"  [{verdict}] runner overhead per notebook <= {OVERHEAD_TARGET_S:.1f} s in steady state:"
        f" median {all_ours:.3f} s, worst notebook median {worst:.3f} s"
    )
    verdict = "PASS" if ratio >= RATIO_TARGET else "FAIL"
    print(
        f"  [{verdict}] runner overhead >= {RATIO_TARGET:.0f}x lower than papermill cold:"
        f" {ratio:.1f}x on the chain (median notebook: papermill {all_theirs:.3f} s"
        f" / runner {all_ours:.3f} s = {all_theirs / all_ours:.1f}x)"
    )


if __name__ == "__main__":
    sys.exit(main())
