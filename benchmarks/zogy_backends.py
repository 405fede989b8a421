"""ZOGY on the CPU (scipy.fft) and on a GPU (torch.fft): agreement and speed.

Prints, for square pure-noise-plus-sources pairs of several sizes, the time of one scipy
rfft2+irfft2 pair (the baseline), of :func:`pipeline.science.zogy.zogy` with each backend,
their ratios, and the largest S_corr difference between the backends. Needs only numpy,
scipy and torch (a CUDA device for the torch rows).

Usage::

    python benchmarks/zogy_backends.py [--sizes 1024 2048 4096]
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
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    psf_new, psf_ref = gaussian(31, 4.2), gaussian(31, 3.0)
    gpu = torch_available()
    print(f"GPU available: {gpu}")
    print("size   fft_pair_ms  numpy_ms  numpy/fft  torch_ms  torch/fft  numpy/torch  max|dS_corr|")
    for n in args.sizes:
        row = run_size(n, rng, psf_new, psf_ref, args.repeats, gpu)
        print(row)
    return 0


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
        a = zogy(new, ref, psf_new, psf_ref, backend="numpy", **kwargs).S_corr
        b = on_gpu().S_corr
        row += f" {gpu_time * 1e3:9.1f} {gpu_time / fft:10.2f} {cpu / gpu_time:12.1f}"
        row += f" {float(np.max(np.abs(a - b))):13.2e}"
    return row


if __name__ == "__main__":
    sys.exit(main())
