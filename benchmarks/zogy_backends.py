"""ZOGY on the CPU (scipy.fft) and on a GPU (torch.fft): agreement and speed.

Prints, for square pure-noise-plus-sources pairs of several sizes, the time of one scipy
rfft2+irfft2 pair (the baseline), of :func:`pipeline.science.zogy.zogy` with each backend,
their ratios, and the largest S_corr difference between the backends. Needs only numpy,
scipy and torch (a CUDA device for the torch rows).

With ``--pair N`` it also runs the whole chain on a simulated N×N pair (preprocessing
once, then the tiled differencing with each backend and detection on each result) and
prints the differencing time per backend, the largest S_corr difference and how many
candidates each backend's difference yields and how many of them the other one shares.

Usage::

    python benchmarks/zogy_backends.py [--sizes 1024 2048 4096] [--pair 2048]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import scipy.fft

from pipeline.science.zogy import torch_available, zogy


def gaussian(size: int, fwhm: float) -> np.ndarray:
    sigma = fwhm / 2.3548
    y, x = np.mgrid[-(size // 2) : size // 2 + 1, -(size // 2) : size // 2 + 1]
    g = np.exp(-(x * x + y * y) / (2 * sigma**2))
    return g / g.sum()


def timed(call, repeats: int) -> float:
    call()  # warm-up: plans, caches, CUDA context
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pair", type=int, default=0, help="side of a simulated pair (0: none)")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    psf_new, psf_ref = gaussian(31, 4.2), gaussian(31, 3.0)
    gpu = torch_available()
    print(f"GPU available: {gpu}")
    print(
        "size   fft_pair_ms  numpy_ms  numpy/fft  torch_ms  torch/fft  numpy/torch  "
        "max|dS_corr|  max|dD|/|D|"
    )
    for n in args.sizes:
        row = run_size(n, rng, psf_new, psf_ref, args.repeats, gpu)
        print(row)
    if args.pair:
        print(run_pair(args.pair, gpu))
    return 0


def run_pair(n: int, gpu: bool) -> str:
    """Tiled differencing of a simulated n×n pair with each backend, and its detections."""
    import warnings

    from scipy.spatial import cKDTree

    from pipeline.science.detection import NoDetectionsWarning, detect_candidates
    from pipeline.science.differencing import difference_pair
    from pipeline.science.preprocessing import preprocess_pair
    from pipeline.science.simulate import simulate_pair

    scale = (n / 1024) ** 2  # the densities of the default 1024² pair
    sim = simulate_pair(
        (n, n),
        seed=11,
        n_stars=round(600 * scale),
        n_galaxies=round(150 * scale),
        n_transients=round(60 * scale),
    )
    start = time.perf_counter()
    pair = preprocess_pair(sim.science, sim.reference)
    lines = [f"pair {n}x{n}: preprocessing {time.perf_counter() - start:.2f} s"]
    results = {}
    for backend in ("numpy", "torch") if gpu else ("numpy",):
        difference_pair(pair, backend=backend)  # warm-up
        times = []
        for _ in range(3):
            start = time.perf_counter()
            diff = difference_pair(pair, backend=backend)
            times.append(time.perf_counter() - start)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NoDetectionsWarning)
            start = time.perf_counter()
            found = detect_candidates(diff, pair)
            detect_s = time.perf_counter() - start
        results[backend] = (diff, found)
        lines.append(
            f"  {backend:<6} differencing {min(times):.3f} s ({len(diff.tiles)} tiles), "
            f"detection {detect_s:.2f} s, {len(found)} candidates"
        )
    if len(results) == 2:
        (a, fa), (b, fb) = results["numpy"], results["torch"]
        valid = ~(a.invalid | b.invalid)
        delta = float(np.max(np.abs(a.S_corr[valid] - b.S_corr[valid])))
        d_scale = float(np.max(np.abs(a.D[valid])))
        d_delta = float(np.max(np.abs(a.D[valid] - b.D[valid]))) / d_scale
        shared = 0
        if len(fa) and len(fb):
            tree = cKDTree(np.column_stack([fb["x"], fb["y"]]))
            dist, _ = tree.query(np.column_stack([fa["x"], fa["y"]]))
            shared = int(np.sum(dist < 1.0))
        lines.append(
            f"  max|dS_corr| {delta:.2e}, max|dD|/max|D| {d_delta:.2e}; "
            f"candidates found by both: {shared}"
        )
    return "\n".join(lines)


def run_size(n, rng, psf_new, psf_ref, repeats: int, gpu: bool) -> str:
    """One table row for an n×n pair."""
    new = rng.normal(0, 10, (n, n)).astype(np.float32)
    ref = rng.normal(0, 5, (n, n)).astype(np.float32)
    var_new = np.full((n, n), 100.0, np.float32) + np.abs(new)
    kwargs = dict(
        sigma_new=10.0,
        sigma_ref=5.0,
        flux_new=0.8,
        var_new=var_new,
        astrometric_sigma=(0.05, 0.05),
        flux_error_fraction=0.01,
    )
    fft = timed(
        lambda: scipy.fft.irfft2(scipy.fft.rfft2(new, workers=-1), s=new.shape, workers=-1),
        repeats,
    )
    cpu = timed(lambda: zogy(new, ref, psf_new, psf_ref, backend="numpy", **kwargs), repeats)
    row = f"{n:<6} {fft * 1e3:11.1f} {cpu * 1e3:9.1f} {cpu / fft:10.1f}"
    if gpu:
        import torch

        def on_gpu():
            result = zogy(new, ref, psf_new, psf_ref, backend="torch", **kwargs)
            torch.cuda.synchronize()
            return result

        gpu_time = timed(on_gpu, repeats)
        a = zogy(new, ref, psf_new, psf_ref, backend="numpy", **kwargs)
        b = on_gpu()
        row += f" {gpu_time * 1e3:9.1f} {gpu_time / fft:10.2f} {cpu / gpu_time:12.1f}"
        row += f" {float(np.max(np.abs(a.S_corr - b.S_corr))):13.2e}"
        row += f" {float(np.max(np.abs(a.D - b.D)) / np.max(np.abs(a.D))):13.2e}"
    return row


if __name__ == "__main__":
    sys.exit(main())
