"""ZOGY image differencing (Zackay, Ofek & Gal-Yam 2016, ApJ 830, 27).

Notation follows the paper: N is the new (science) image, R the reference, P_n and P_r
their PSFs (sum 1), σ_n and σ_r their background noise, F_n and F_r their flux
zero points (here F_r = 1 and F_n the science/reference flux ratio). All images are
background-subtracted, on one pixel grid, with bad pixels set to zero.

The score image S is the matched-filter (likelihood-ratio) statistic for a point
source; S_corr divides it by the square root of its full variance, including the
source noise of both images and the astrometric noise of the registration, plus an
optional fractional flux-error floor for PSF and calibration systematics, so that
S_corr is ~N(0, 1) wherever nothing changed. α = S / F_S estimates the flux of a
point transient (in reference units) at every pixel.

Fourier transforms are real (``rfft2``) in float32/complex64 with all cores, or
``torch.fft`` on a GPU when asked and available.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.fft

from pipeline.errors import ScienceError

__all__ = ["ZogyResult", "detection_efficiency", "psf_to_otf_shape", "torch_available", "zogy"]

_TINY = 1e-12


@dataclass
class ZogyResult:
    """Products of one ZOGY subtraction, all on the input grid (float32).

    Attributes
    ----------
    D : 2D ndarray
        Proper difference image, white noise of unit variance on empty sky.
    P_D : 2D ndarray
        PSF of D (a centred stamp of the input PSF stamp size, sum F_D-normalised to 1).
    F_D : float
        Flux zero point of D.
    S : 2D ndarray
        Score image (D correlated with P_D, times F_D).
    S_corr : 2D ndarray
        S divided by the square root of its full variance V_S.
    V_S : 2D ndarray
        Variance of S: background and source noise of both images, astrometric noise
        and the flux-error floor.
    F_S : float
        Flux normalisation of S: the transient flux is ``alpha = S / F_S``.
    alpha : 2D ndarray
        PSF-fit flux of a point transient centred on each pixel, in reference units.
    alpha_err : 2D ndarray
        1σ error of ``alpha``.
    S_N, S_R : 2D ndarray
        The two terms of S (S = S_N - S_R): each image's matched-filter response, the
        scale of residuals from PSF or flux-scale errors.
    """

    D: np.ndarray
    P_D: np.ndarray
    F_D: float
    S: np.ndarray
    S_corr: np.ndarray
    V_S: np.ndarray
    F_S: float
    alpha: np.ndarray
    alpha_err: np.ndarray
    S_N: np.ndarray
    S_R: np.ndarray


def torch_available() -> bool:
    """Whether torch with a CUDA device can be used for the transforms."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return bool(torch.cuda.is_available())


def detection_efficiency(
    psf_new: np.ndarray,
    psf_ref: np.ndarray,
    sigma_new: float,
    sigma_ref: float,
    flux_new: float = 1.0,
    flux_ref: float = 1.0,
    *,
    correlation_new: np.ndarray | None = None,
    correlation_ref: np.ndarray | None = None,
) -> float:
    """ZOGY's S/N for a point transient on empty sky over the science image's own S/N.

    The science image alone, matched-filtered with its PSF, detects a point source of
    flux F at S/N = F·F_n / (σ_n √N_eff); the proper difference pays for the reference's
    noise (paper eq. 17): S/N² = F² Σ_k F_n² F_r² |P̂_n|² |P̂_r|² / (σ_r² F_n² |P̂_n|² +
    σ_n² F_r² |P̂_r|²). Their ratio is 1 for a noiseless reference and 1/√2 for twin
    images; ``threshold / efficiency`` is then the injected S/N at which half of the point
    transients on empty sky reach ``threshold`` in S_corr (the best any subtraction of
    this pair can do before source noise and systematics).

    Parameters
    ----------
    psf_new, psf_ref : 2D ndarray
        Centred, odd-sized PSF stamps (any sums: each is normalised to 1).
    sigma_new, sigma_ref : float
        Background noise per pixel of each image, in its own units (> 0 and >= 0).
    flux_new, flux_ref : float
        Flux zero points (science/reference flux ratio as ``flux_new`` with
        ``flux_ref`` = 1, as in :func:`zogy`).
    correlation_new, correlation_ref : 2D ndarray, optional
        Each image's noise autocorrelation in units of its ``sigma²``, centred, odd-sized
        (:func:`~pipeline.science.background.noise_correlation`); default white. The
        noise power at each frequency is then ``sigma²`` times its transform, and ZOGY's
        weights follow it. The science image's own S/N stays that of white noise at
        ``sigma_new`` (how injected S/N is defined).

    Returns
    -------
    float
        In (0, 1].
    """
    if not sigma_new > 0 or not sigma_ref >= 0 or not flux_new > 0 or not flux_ref > 0:
        raise ValueError(
            "detection_efficiency needs sigma_new > 0, sigma_ref >= 0 and positive "
            f"fluxes, got {sigma_new}, {sigma_ref}, {flux_new}, {flux_ref}"
        )
    side = 2 * max(*psf_new.shape, *psf_ref.shape)
    otf_new, otf_ref = (
        np.abs(np.fft.rfft2(psf_to_otf_shape(p / p.sum(), (side, side)).astype(float))) ** 2
        for p in (psf_new, psf_ref)
    )
    weight = np.full(otf_new.shape, 2.0)  # rfft2: the other half-plane mirrors these
    weight[:, 0] = 1.0
    if side % 2 == 0:
        weight[:, -1] = 1.0
    spectra = [
        1.0 if c is None else _noise_spectrum(c, name, (side, side))
        for c, name in ((correlation_new, "correlation_new"), (correlation_ref, "correlation_ref"))
    ]
    fn2, fr2 = flux_new**2, flux_ref**2
    below = sigma_ref**2 * spectra[1] * fn2 * otf_new + sigma_new**2 * spectra[0] * fr2 * otf_ref
    terms = np.divide(
        fn2 * fr2 * otf_new * otf_ref, below, out=np.zeros_like(below), where=below > 0
    )
    ours = float((weight * terms).sum())
    alone = float((weight * fn2 * otf_new).sum()) / sigma_new**2
    return float(np.sqrt(ours / alone))


def _noise_spectrum(correlation: np.ndarray, name: str, shape: tuple[int, int]) -> np.ndarray:
    """The noise power spectrum (rfft2 half-plane) of an autocorrelation stamp."""
    c = np.asarray(correlation, dtype=float)
    if c.ndim != 2 or c.shape[0] % 2 == 0 or c.shape[1] % 2 == 0 or not np.all(np.isfinite(c)):
        raise ValueError(f"{name} must be a finite 2-D stamp of odd sides, got shape {c.shape}")
    if c.shape[0] > shape[0] or c.shape[1] > shape[1]:
        raise ValueError(f"{name} ({c.shape}) is larger than the PSFs' grid {shape}")
    power = np.fft.rfft2(psf_to_otf_shape(c, shape)).real
    # a measured autocorrelation is noisy: its transform may dip below zero where the
    # true spectrum is small, and no noise has negative power
    return np.clip(power, 1e-3 * max(float(power.max()), 1e-12), None)


def psf_to_otf_shape(psf: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Embed a centred, odd-sized PSF stamp in a zero array with its centre at pixel (0, 0).

    Parameters
    ----------
    psf : 2D ndarray
        PSF stamp with odd dimensions, centred on its central pixel.
    shape : tuple of int
        (ny, nx) of the image; each must be at least the stamp size.

    Returns
    -------
    2D ndarray of float32
        Wrapped PSF whose discrete Fourier transform is the optical transfer function.
    """
    wrapped, hy, hx = _wrapped_psf(psf, shape)
    return _place_wrapped(wrapped, shape, hy, hx)


def _wrapped_psf(psf: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, int, int]:
    """The stamp rolled so its centre is at index 0, and its half sizes (for placing)."""
    ny, nx = psf.shape
    if ny % 2 == 0 or nx % 2 == 0:
        raise ScienceError(f"PSF stamp must have odd dimensions, got {psf.shape}")
    if ny > shape[0] or nx > shape[1]:
        raise ScienceError(f"PSF stamp {psf.shape} is larger than the image {shape}")
    wrapped = np.roll(np.asarray(psf, dtype=np.float32), (-(ny // 2), -(nx // 2)), axis=(0, 1))
    return wrapped, ny // 2, nx // 2


def _float32_normal(a: np.ndarray) -> np.ndarray:
    """A kernel in float32 with its negligible far tails set to zero.

    A kernel's far tails (a PSF's outer pixels, and even more their squares in the
    variance kernels: 10705 of the 15625 values of κ_n² for a 4.2-pixel PSF) fall into
    float32's subnormal range, or near enough that the transforms' products land there,
    and every operation on a subnormal takes a slow path in the processor. At 2048² on
    2 cores the transform of the placed κ_n² took 23 ms, and 11 ms with its tails
    zeroed (best of 8). Values under 1e-20 of the kernel's peak (below float32's
    precision squared) change no float32 sum.
    """
    out = np.asarray(a, dtype=np.float32).copy()
    peak = float(np.max(np.abs(out))) if out.size else 0.0
    out[np.abs(out) < max(1e-20 * peak, float(np.finfo(np.float32).tiny))] = 0.0
    return out


def _place_wrapped(kernel: np.ndarray, shape: tuple[int, int], hy: int, hx: int) -> np.ndarray:
    """Copy a small wrapped kernel (centre at index 0) into a zero array of ``shape``.

    The kernel holds offsets ``-hy … gy-hy-1`` (rows) and ``-hx … gx-hx-1`` (columns); the
    non-negative ones go to the array's start and the negative ones to its end, as a
    roll of the whole array would put them, without moving the whole array twice.
    """
    kernel = _float32_normal(kernel)  # every kernel transform goes through here
    gy, gx = kernel.shape
    ny, nx = shape
    py, px = gy - hy, gx - hx  # how many non-negative offsets
    out = np.zeros(shape, dtype=np.float32)
    out[:py, :px] = kernel[:py, :px]
    if hx:
        out[:py, nx - hx :] = kernel[:py, px:]
    if hy:
        out[ny - hy :, :px] = kernel[py:, :px]
    if hy and hx:
        out[ny - hy :, nx - hx :] = kernel[py:, px:]
    return out


def zogy(
    new: np.ndarray,
    ref: np.ndarray,
    psf_new: np.ndarray,
    psf_ref: np.ndarray,
    *,
    sigma_new: float,
    sigma_ref: float,
    flux_new: float = 1.0,
    flux_ref: float = 1.0,
    var_new: np.ndarray | float | None = None,
    var_ref: np.ndarray | float | None = None,
    gain_new: float | None = None,
    gain_ref: float | None = None,
    background_var_new: np.ndarray | float | None = None,
    background_var_ref: np.ndarray | float | None = None,
    astrometric_sigma: tuple[float, float] = (0.0, 0.0),
    flux_error_fraction: float = 0.0,
    backend: str = "numpy",
    fft_workers: int = -1,
) -> ZogyResult:
    """Subtract ``ref`` from ``new`` with ZOGY and compute the corrected score.

    Parameters
    ----------
    new, ref : 2D ndarray
        Background-subtracted science and reference images on the same grid (ADU),
        finite everywhere (set masked pixels to zero).
    psf_new, psf_ref : 2D ndarray
        Centred PSF stamps (odd size), normalised here to sum 1.
    sigma_new, sigma_ref : float
        Background noise standard deviation of each image (ADU).
    flux_new, flux_ref : float
        Flux zero points F_n and F_r (flux ratio science/reference and 1).
    var_new, var_ref : 2D ndarray or float, optional
        Full per-pixel variance (background plus source Poisson noise, ADU²), convolved
        with the squared matched filters for V_S (paper eq. 26-27): two more image-size
        transforms. Default: the background variance alone.
    gain_new, gain_ref : float, optional
        Gains (e⁻/ADU) for the source Poisson noise taken from the images themselves:
        V(ε_n) = σ_n² + N / g_n, and likewise for R. The images' transforms, which D
        needs anyway, give the convolved source variance with no transform of a variance
        map (8 image-size transforms instead of 10). Unlike a clipped variance map, the
        source term uses N unclipped; its convolution is clipped at zero. Not with
        ``var_new``/``var_ref``.
    background_var_new, background_var_ref : 2D ndarray or float, optional
        Background variance (ADU²) that goes with ``gain_*``; default ``sigma²``. A map
        is taken as constant over the filters' width (a background noise map varies
        on the scale of its background meshes): it is multiplied by Σκ² pixel by pixel.
    astrometric_sigma : tuple of float
        Registration error (σ_x, σ_y) in pixels between the two images; adds the
        astrometric-noise variance of the paper (eq. 30-33) to V_S.
    flux_error_fraction : float
        Fractional flux error of static sources from PSF and calibration systematics;
        adds ``(f·S_N)² + (f·S_R)²`` to V_S so bright-star residuals are not significant.
    backend : {"numpy", "torch", "auto"}
        Where the transforms run; ``"auto"`` picks torch when a GPU is present.
    fft_workers : int
        Threads per CPU transform (-1: all cores). Callers that run several tiles at
        once give 1, since small transforms gain little from threads of their own.

    Returns
    -------
    ZogyResult
    """
    _check_inputs(new, ref, psf_new, psf_ref, sigma_new, sigma_ref, flux_new, flux_ref)
    own = _check_noise(var_new, var_ref, gain_new, gain_ref, background_var_new, background_var_ref)
    if backend == "auto":
        backend = "torch" if torch_available() else "numpy"
    if backend not in ("numpy", "torch"):
        raise ScienceError(f"backend must be 'numpy', 'torch' or 'auto', got {backend!r}")
    shape = new.shape
    fft = _transforms(backend, fft_workers)

    psf_new = psf_new / psf_new.sum()
    psf_ref = psf_ref / psf_ref.sum()
    fn, fr = float(flux_new), float(flux_ref)
    f_d = fn * fr / np.sqrt(sigma_new**2 * fr**2 + sigma_ref**2 * fn**2)
    # the kernels and P_D are compact: compute them on a small grid, on the CPU
    small = _Kernels(psf_new, psf_ref, shape, sigma_new, sigma_ref, fn, fr, f_d)
    psf_new_w, hy_n, hx_n = _wrapped_psf(psf_new, shape)
    psf_ref_w, hy_r, hx_r = _wrapped_psf(psf_ref, shape)
    pn = fft.rfft2_placed(psf_new_w, shape, hy_n, hx_n)
    pr = fft.rfft2_placed(psf_ref_w, shape, hy_r, hx_r)
    source = None
    if own:  # the κ² spectra, over the gains, to weight the images' own spectra
        source = tuple(
            None if gain is None else fft.rfft2_placed(k2 / gain, shape, *small.half)
            for k2, gain in ((small.kn2, gain_new), (small.kr2, gain_ref))
        )
    n_hat = fft.rfft2(new)
    r_hat = fft.rfft2(ref)
    spec_n, spec_r, spec_d, spec_v, fs_columns = fft.spectra(
        pn, pr, n_hat, r_hat, sigma_new**2 * fr**2, sigma_ref**2 * fn**2, fn, fr, source
    )
    del n_hat, r_hat, pn, pr, source
    s_new = fft.irfft2(spec_n, shape)
    del spec_n
    s_ref = fft.irfft2(spec_r, shape)
    del spec_r
    d = fft.irfft2(spec_d, shape)
    del spec_d
    f_s = _full_sum(fs_columns, shape[1]) / (shape[0] * shape[1])

    if own:
        convolved = fft.irfft2(spec_v, shape)  # a gain is given: there is a source term
        del spec_v
        background = _background_terms(
            fft, small, sigma_new**2 if background_var_new is None else background_var_new,
            sigma_ref**2 if background_var_ref is None else background_var_ref,
        )  # fmt: skip
    else:
        var_new = sigma_new**2 if var_new is None else var_new
        var_ref = sigma_ref**2 if var_ref is None else var_ref
        convolved, background = _convolved_variance(fft, small, var_new, var_ref, shape), ()
    maps = fft.scores(
        s_new, s_ref, convolved, background, astrometric_sigma, flux_error_fraction, f_s
    )
    maps.update(D=d, S_N=s_new, S_R=s_ref)
    p_d = _centred_stamp(small.p_d, psf_new.shape)
    return ZogyResult(
        **{k: fft.to_numpy(v).astype(np.float32, copy=False) for k, v in maps.items()},
        P_D=p_d / p_d.sum(),
        F_D=float(f_d),
        F_S=float(f_s),
    )


def _check_noise(
    var_new: np.ndarray | float | None,
    var_ref: np.ndarray | float | None,
    gain_new: float | None,
    gain_ref: float | None,
    background_new: np.ndarray | float | None,
    background_ref: np.ndarray | float | None,
) -> bool:
    """Whether the source noise comes from the images (gains given); refuse mixed forms."""
    own = gain_new is not None or gain_ref is not None
    if own and (var_new is not None or var_ref is not None):
        raise ScienceError(
            "give either var_new/var_ref (full variance maps) or gain_new/gain_ref (source "
            "noise from the images themselves), not both"
        )
    if not own and (background_new is not None or background_ref is not None):
        raise ScienceError("background_var_new/background_var_ref go with gain_new/gain_ref")
    for name, gain in (("gain_new", gain_new), ("gain_ref", gain_ref)):
        if gain is not None and not (np.isfinite(gain) and gain > 0):
            raise ScienceError(f"{name} must be a positive finite number, got {gain!r}")
    for name, var in (("background_var_new", background_new),
                      ("background_var_ref", background_ref)):  # fmt: skip
        # two reductions, not whole-map temporaries: NaN or ±inf make the sum non-finite
        if var is not None and not (
            np.isfinite(np.sum(var, dtype=np.float64)) and np.min(var) >= 0
        ):
            raise ScienceError(f"{name} must be finite and non-negative")
    return own


def _background_terms(
    fft: _NumpyFFT, kernels: _Kernels, var_new: np.ndarray | float, var_ref: np.ndarray | float
) -> tuple[tuple[float, Any], ...]:
    """(Σκ_n², σ_n²) and (Σκ_r², σ_r²): V_S's background terms, weight times variance.

    The variances may be maps; :func:`_scores` adds the products row block by row
    block, where they are cheap, rather than in whole-image passes here.
    """
    return tuple(
        (float(k2.sum()), var if np.ndim(var) == 0 else fft.array(var))
        for k2, var in ((kernels.kn2, var_new), (kernels.kr2, var_ref))
    )


class _Kernels:
    """κ_n, κ_r (paper eq. 28-29) and P_D on a small grid around the origin."""

    def __init__(
        self,
        psf_new: np.ndarray,
        psf_ref: np.ndarray,
        shape: tuple[int, int],
        sigma_new: float,
        sigma_ref: float,
        fn: float,
        fr: float,
        f_d: float,
    ) -> None:
        size = max(psf_new.shape[0], psf_ref.shape[0])
        grid = tuple(min(n, scipy.fft.next_fast_len(4 * size, real=True)) for n in shape)
        pn = scipy.fft.rfft2(psf_to_otf_shape(psf_new, grid).astype(np.float64))
        pr = scipy.fft.rfft2(psf_to_otf_shape(psf_ref, grid).astype(np.float64))
        pn2, pr2 = np.abs(pn) ** 2, np.abs(pr) ** 2
        den2 = sigma_new**2 * fr**2 * pr2 + sigma_ref**2 * fn**2 * pn2 + _TINY
        self.grid = grid
        self.kn = scipy.fft.irfft2(fn * fr**2 * np.conj(pn) * pr2 / den2, s=grid)
        self.kr = scipy.fft.irfft2(fr * fn**2 * np.conj(pr) * pn2 / den2, s=grid)
        self.p_d = scipy.fft.irfft2(fr * fn * pr * pn / (f_d * np.sqrt(den2)), s=grid)
        # κ², the kernels of the variances through the matched filters
        self.kn2, self.kr2 = self.kn * self.kn, self.kr * self.kr
        self.half = (grid[0] // 2, grid[1] // 2)  # the small grid's centre, for placing


def _spectra(
    pn: Any, pr: Any, n_hat: Any, r_hat: Any, a_n: float, a_r: float, fn: float, fr: float,
    source: tuple[Any, Any] | None, conj: Callable, sqrt: Callable,
) -> tuple[Any, Any, Any, Any, Any]:  # fmt: skip
    """The spectra of S_N, S_R, D and the source variance, and F_S's integrand, on any rows.

    ``a_n`` = σ_n² F_r² and ``a_r`` = σ_r² F_n² (the two terms of the denominator);
    ``source`` holds the spectra of κ_n²/g_n and κ_r²/g_r (either may be None), which
    weight the images' own spectra into that of the convolved source variance (None
    when not asked). ``conj`` must return a new array (never a view that writes through
    to its input). Works on NumPy and torch arrays alike, on the whole half-plane or on
    a block of its rows.
    """
    # in place wherever the arrays are this function's own: each pass over a block
    # costs as much as the arithmetic, and a fresh temporary one more
    pn2 = pn.real * pn.real
    pn2 += pn.imag * pn.imag
    pr2 = pr.real * pr.real
    pr2 += pr.imag * pr.imag
    inv_den2 = a_n * pr2
    inv_den2 += a_r * pn2
    inv_den2 += _TINY
    inv_den2 = 1.0 / inv_den2
    # real weights of the two matched filters: κ̂_n = conj(P̂_n)·w_n, κ̂_r = conj(P̂_r)·w_r
    w_n = pr2 * inv_den2
    w_n *= fn * fr**2
    w_r = pn2 * inv_den2
    w_r *= fr * fn**2
    spec_n = conj(pn)
    spec_n *= n_hat
    spec_n *= w_n
    spec_r = conj(pr)
    spec_r *= r_hat
    spec_r *= w_r
    # D: (F_r P̂_r N̂ - F_n P̂_n R̂) / √den², the scalars folded into the real root
    root = sqrt(inv_den2)
    spec_d = pr * n_hat
    other = pn * r_hat
    other *= fn / fr
    spec_d -= other
    root *= fr
    spec_d *= root
    w_n *= pn2  # F_S's integrand |P̂_n|² w_n F_n, in w_n's memory
    w_n *= fn
    spec_v = None
    for weight, image in zip(source or (), (n_hat, r_hat), strict=False):
        if weight is not None:
            if spec_v is None:
                spec_v = weight * image
            else:
                spec_v += weight * image
    return spec_n, spec_r, spec_d, spec_v, w_n


def _scores(
    s_new: Any,
    s_ref: Any,
    convolved: Any,
    background: tuple[tuple[float, Any], ...],
    gradient: tuple[Any, Any] | None,
    sigma: tuple[float, float],
    flux_error_fraction: float,
    f_s: float,
    clamp_min: Callable,
    sqrt: Callable,
) -> dict[str, Any]:
    """S, V_S, S_corr, α and its error from S_N, S_R and their convolved variance.

    V_S is ``convolved`` (clipped at zero: transforms leave rounding, and an image's own
    source term dips below zero on empty sky) plus the ``background`` terms (weight
    times a variance, a number or a map's rows), plus the astrometric term
    σ_x² (∂S_N/∂x)² + σ_y² (∂S_N/∂y)² (paper eq. 30-31) when ``gradient``
    (∂S_N/∂y, ∂S_N/∂x) is given, and the flux-error floor.
    """
    variance = clamp_min(convolved, 0.0)  # a new array: safe to add to in place
    for weight, var in background:
        variance += weight * var
    if gradient is not None:  # the gradient's arrays are scratch from here on
        gy, gx = gradient
        sx, sy = sigma
        gx *= gx
        gx *= sx**2
        variance += gx
        gy *= gy
        gy *= sy**2
        variance += gy
    if flux_error_fraction > 0:
        floor = s_new * s_new
        floor += s_ref * s_ref
        floor *= flux_error_fraction**2
        variance += floor
    variance = clamp_min(variance, _TINY)
    sigma_s = sqrt(variance)
    score = s_new - s_ref
    s_corr = score / sigma_s
    sigma_s *= 1.0 / float(f_s)  # α's error, in the root's memory
    return {
        "S": score,
        "S_corr": s_corr,
        "V_S": variance,
        "alpha": score / float(f_s),
        "alpha_err": sigma_s,
    }


def _full_sum(columns: np.ndarray, nx: int) -> float:
    """Sum over the full spectrum of a Hermitian array from its rfft half's column sums."""
    weights = np.full(columns.shape[0], 2.0)
    weights[0] = 1.0
    if nx % 2 == 0:
        weights[-1] = 1.0  # the Nyquist column appears once
    return float((np.asarray(columns, dtype=np.float64) * weights).sum())


def _rows_of(a: Any, rows: slice) -> Any:
    """The rows of an array, or a number (or None) as it is."""
    return a[rows] if getattr(a, "ndim", 0) >= 1 else a


def _row_blocks(n: int, rows: int) -> list[slice]:
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


@functools.cache
def _pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per thread count and process.

    A forked child must not reuse its parent's pool: the pool's threads did not survive
    the fork, and work sent there would never run.
    """
    return ThreadPoolExecutor(threads, thread_name_prefix="zogy")


def _check_inputs(
    new: np.ndarray,
    ref: np.ndarray,
    psf_new: np.ndarray,
    psf_ref: np.ndarray,
    sigma_new: float,
    sigma_ref: float,
    flux_new: float,
    flux_ref: float,
) -> None:
    if new.ndim != 2 or new.shape != ref.shape:
        raise ScienceError(
            f"new and ref must be 2-D images of one shape, got {new.shape} and {ref.shape}"
        )
    for name, image in (("new", new), ("ref", ref)):
        if not np.all(np.isfinite(image)):
            raise ScienceError(f"{name} has non-finite pixels: set masked pixels to 0 first")
    for name, psf in (("psf_new", psf_new), ("psf_ref", psf_ref)):
        if psf.ndim != 2 or not np.all(np.isfinite(psf)) or psf.sum() <= 0:
            raise ScienceError(f"{name} must be a finite 2-D stamp with a positive sum")
    for name, value in (("sigma_new", sigma_new), ("sigma_ref", sigma_ref),
                        ("flux_new", flux_new), ("flux_ref", flux_ref)):  # fmt: skip
        if not (np.isfinite(value) and value > 0):
            raise ScienceError(f"{name} must be a positive finite number, got {value!r}")


def _convolved_variance(
    fft: _NumpyFFT,
    kernels: _Kernels,
    var_new: np.ndarray | float,
    var_ref: np.ndarray | float,
    shape: tuple[int, int],
) -> object:
    """V(S_N) + V(S_R): each image's variance map convolved with its kernel squared."""
    constant = 0.0
    spectrum = None
    for k2, var in ((kernels.kn2, var_new), (kernels.kr2, var_ref)):
        if np.ndim(var) == 0:
            constant += float(var) * float(k2.sum())
        else:
            term = fft.rfft2(var) * fft.rfft2_placed(k2, shape, *kernels.half)
            spectrum = term if spectrum is None else spectrum + term
    if spectrum is None:
        return fft.full(shape, constant)
    return fft.irfft2(spectrum, shape) + float(constant)


def _transforms(backend: str, fft_workers: int) -> _NumpyFFT:
    """The transform backend: torch on the GPU, or scipy.fft with ``fft_workers`` threads."""
    return _TorchFFT() if backend == "torch" else _NumpyFFT(fft_workers)


def _centred_stamp(wrapped: np.ndarray, stamp_shape: tuple[int, int]) -> np.ndarray:
    """Cut a centred stamp out of an array whose centre is at pixel (0, 0)."""
    hy, hx = stamp_shape[0] // 2, stamp_shape[1] // 2
    rolled = np.roll(wrapped, (hy, hx), axis=(0, 1))
    return rolled[: stamp_shape[0], : stamp_shape[1]].astype(np.float32)


class _NumpyFFT:
    """Real transforms on the CPU with scipy.fft (all cores unless told otherwise)."""

    def __init__(self, workers: int = -1) -> None:
        self.workers = workers

    def rfft2(self, a: np.ndarray) -> np.ndarray:
        return scipy.fft.rfft2(np.asarray(a, dtype=np.float32), workers=self.workers)

    def irfft2(self, a: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        return scipy.fft.irfft2(a, s=shape, workers=self.workers)

    def rfft2_placed(
        self, kernel: np.ndarray, shape: tuple[int, int], hy: int, hx: int
    ) -> np.ndarray:
        """``rfft2(_place_wrapped(kernel, shape, hy, hx))`` without transforming zero rows.

        The placed kernel fills only its first and last few rows: the row transforms
        run on those alone, and only the column transforms on the whole array, which
        halves the cost of a full-size transform of a compact kernel.
        """
        ny = shape[0]
        gy = kernel.shape[0]
        py = gy - hy  # rows of non-negative offsets, at the array's start
        rows = _place_wrapped(kernel, (gy, shape[1]), 0, hx)  # columns placed, rows kept
        spectra = scipy.fft.rfft(rows, axis=1, workers=self.workers)
        full = np.zeros((ny, spectra.shape[1]), dtype=spectra.dtype)
        full[:py] = spectra[:py]
        if hy:
            full[ny - hy :] = spectra[py:]
        return scipy.fft.fft(full, axis=0, overwrite_x=True, workers=self.workers)

    @staticmethod
    def full(shape: tuple[int, int], value: float) -> np.ndarray:
        return np.full(shape, value, dtype=np.float32)

    def spectra(
        self, pn: np.ndarray, pr: np.ndarray, n_hat: np.ndarray, r_hat: np.ndarray,
        a_n: float, a_r: float, fn: float, fr: float,
        source: tuple[np.ndarray | None, np.ndarray | None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:  # fmt: skip
        """:func:`_spectra` on blocks of rows shared out between the transform's threads.

        About thirty element-wise passes over the half-plane, single-threaded in NumPy;
        on blocks (see :meth:`_rows`) they run side by side. Returns the spectra of S_N,
        S_R, D and the source variance (None unless ``source``), and the column sums of
        F_S's integrand.

        The spectra are written over ``n_hat``, ``r_hat``, ``pn`` and ``pr``, block by
        block once each block is read: four fresh half-planes would cost more in first
        touches of new memory (page faults) than the arithmetic that fills them.
        """
        outputs = [n_hat, r_hat, pn, pr][: 3 if source is None else 4]

        def block(rows: slice) -> np.ndarray:
            weights = None if source is None else tuple(_rows_of(w, rows) for w in source)
            *spectra, integrand = _spectra(
                pn[rows], pr[rows], n_hat[rows], r_hat[rows], a_n, a_r, fn, fr, weights,
                np.conj, np.sqrt,
            )  # fmt: skip
            for out, spectrum in zip(outputs, spectra, strict=False):
                out[rows] = spectrum
            return integrand.sum(axis=0, dtype=np.float64)

        columns = self._map(block, _row_blocks(n_hat.shape[0], self._rows(n_hat)))
        spec_v = None if source is None else outputs[3]
        return (*outputs[:3], spec_v, np.sum(columns, axis=0))

    def scores(
        self, s_new: np.ndarray, s_ref: np.ndarray, convolved: np.ndarray,
        background: tuple[tuple[float, Any], ...], sigma: tuple[float, float],
        flux_error_fraction: float, f_s: float,
    ) -> dict[str, np.ndarray]:  # fmt: skip
        """:func:`_scores` on blocks of rows (the gradient takes one row either side).

        V_S is written over ``convolved``.
        """
        ny = s_new.shape[0]
        astrometric = sigma[0] > 0 or sigma[1] > 0
        names = ("S", "S_corr", "V_S", "alpha", "alpha_err")
        outputs = {name: np.empty(s_new.shape, dtype=np.float32) for name in names if name != "V_S"}
        outputs["V_S"] = convolved  # written over, block by block, once read

        def block(rows: slice) -> None:
            gradient = None
            if astrometric:
                lo, hi = max(rows.start - 1, 0), min(rows.stop + 1, ny)
                inner = slice(rows.start - lo, rows.stop - lo)
                gy, gx = np.gradient(s_new[lo:hi])
                gradient = (gy[inner], gx[inner])
            maps = _scores(
                s_new[rows], s_ref[rows], convolved[rows],
                tuple((weight, _rows_of(var, rows)) for weight, var in background),
                gradient, sigma, flux_error_fraction, f_s, np.maximum, np.sqrt,
            )  # fmt: skip
            for name in names:
                outputs[name][rows] = maps[name]

        self._map(block, _row_blocks(ny, self._rows(s_new)))
        return outputs

    @staticmethod
    def array(a: np.ndarray) -> np.ndarray:
        return a

    def _rows(self, a: np.ndarray) -> int:
        """Rows per block: about 1 MiB of one array, and at least one block per thread.

        Measured at 2048² on 2 cores: blocks of 1-4 MiB make the element-wise work of
        one ZOGY call about 25 % faster than whole arrays; blocks of 64 kB are slower
        than whole arrays (the per-call overhead of ~30 NumPy operations per block).
        """
        per_row = a.shape[1] * a.itemsize
        rows = max(16, (1 << 20) // max(per_row, 1))
        return max(1, min(rows, -(-a.shape[0] // self._threads())))

    def _threads(self) -> int:
        return (os.cpu_count() or 1) if self.workers == -1 else max(1, self.workers)

    def _map(self, func: Callable, blocks: list[slice]) -> list:
        threads = min(self._threads(), len(blocks))
        if threads <= 1:
            return [func(rows) for rows in blocks]
        return list(_pool(threads, os.getpid()).map(func, blocks))

    @staticmethod
    def to_numpy(a: np.ndarray) -> np.ndarray:
        return a


class _TorchFFT(_NumpyFFT):
    """The same transforms with torch (float32/complex64), on the GPU.

    ``device`` other than CUDA is for tests: it runs this backend's code where no GPU is.
    """

    def __init__(self, device: str = "cuda") -> None:
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise ScienceError("backend='torch' needs a CUDA GPU; use backend='numpy'")
        self.torch = torch
        self.device = torch.device(device)

    def _tensor(self, a: object) -> object:
        if isinstance(a, np.ndarray):
            return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(self.device)
        return a

    def rfft2(self, a: object) -> object:
        return self.torch.fft.rfft2(self._tensor(a))

    def irfft2(self, a: object, shape: tuple[int, int]) -> object:
        return self.torch.fft.irfft2(a, s=shape)

    def rfft2_placed(self, kernel: np.ndarray, shape: tuple[int, int], hy: int, hx: int) -> object:
        return self.rfft2(_place_wrapped(kernel, shape, hy, hx))

    def full(self, shape: tuple[int, int], value: float) -> object:
        return self.torch.full(shape, value, dtype=self.torch.float32, device=self.device)

    def spectra(
        self, pn: Any, pr: Any, n_hat: Any, r_hat: Any, a_n: float, a_r: float, fn: float,
        fr: float, source: tuple[Any, Any] | None = None,
    ) -> tuple[Any, Any, Any, Any, np.ndarray]:  # fmt: skip
        # torch.conj is a view: an in-place product on it would write into P̂ itself
        *spectra, integrand = _spectra(
            pn, pr, n_hat, r_hat, a_n, a_r, fn, fr, source, self.torch.conj_physical,
            self.torch.sqrt,
        )  # fmt: skip
        columns = integrand.sum(dim=0, dtype=self.torch.float64).cpu().numpy()
        return (*spectra, columns)

    def scores(
        self, s_new: Any, s_ref: Any, convolved: Any, background: Any,
        sigma: tuple[float, float], flux_error_fraction: float, f_s: float,
    ) -> dict[str, Any]:  # fmt: skip
        gradient = None
        if sigma[0] > 0 or sigma[1] > 0:
            gradient = self.torch.gradient(s_new)
        return _scores(
            s_new, s_ref, convolved, background, gradient, sigma,
            flux_error_fraction, f_s, lambda a, value: self.torch.clamp(a, min=value),
            self.torch.sqrt,
        )  # fmt: skip

    def array(self, a: Any) -> Any:
        return self._tensor(a)

    def to_numpy(self, a: object) -> np.ndarray:
        if isinstance(a, np.ndarray):
            return a
        return a.detach().cpu().numpy()
