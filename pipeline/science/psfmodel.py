"""Analytic point-spread-function stamps (pixel-integrated elliptical Moffat) and their N_eff."""

from __future__ import annotations

import numpy as np

__all__ = ["effective_pixels", "moffat_alpha", "moffat_psf"]


def moffat_alpha(fwhm: float, beta: float) -> float:
    """Moffat core width alpha for a given FWHM.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in pixels.
    beta : float
        Moffat power index (> 1).

    Returns
    -------
    float
        ``alpha`` in pixels such that ``(1 + (r / alpha)**2) ** -beta`` has that FWHM; the same
        relation as :class:`astropy.modeling.functional_models.Moffat2D` (``gamma`` there).
    """
    return fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))


def _check_psf_args(size: int, fwhm: float, beta: float, ellipticity: float, oversample: int):
    if int(size) != size or size < 1 or size % 2 == 0:
        raise ValueError(f"size={size!r}: the PSF stamp size must be a positive odd integer")
    if not fwhm > 0:
        raise ValueError(f"fwhm={fwhm!r}: the FWHM must be positive (pixels)")
    if not beta > 1:
        raise ValueError(f"beta={beta!r}: a Moffat beta must exceed 1 to have finite flux")
    if not 0 <= ellipticity < 1:
        raise ValueError(f"ellipticity={ellipticity!r}: must lie in [0, 1) (e = 1 - b/a)")
    if int(oversample) != oversample or oversample < 1:
        raise ValueError(f"oversample={oversample!r}: must be a positive integer")


def moffat_psf(
    size: int,
    fwhm: float,
    beta: float = 3.5,
    ellipticity: float = 0.0,
    angle: float = 0.0,
    center: tuple[float, float] | None = None,
    oversample: int = 5,
) -> np.ndarray:
    """Pixel-integrated elliptical Moffat PSF stamp, normalised to sum 1 over the stamp.

    The profile is ``(1 + (u / a)**2 + (v / b)**2) ** -beta`` with ``u`` along the major axis,
    ``a = moffat_alpha(fwhm, beta)`` and ``b = a * (1 - ellipticity)``: ``fwhm`` is the FWHM
    along the major axis, the minor-axis FWHM is ``fwhm * (1 - ellipticity)``. Each pixel is the
    mean of ``oversample**2`` sub-pixel samples (midpoint rule), i.e. the profile integrated
    over the pixel area.

    Parameters
    ----------
    size : int
        Odd side length of the square stamp in pixels.
    fwhm : float
        Major-axis full width at half maximum in pixels.
    beta : float
        Moffat power index (> 1); smaller means broader wings.
    ellipticity : float
        ``1 - b/a``, in [0, 1).
    angle : float
        Position angle of the major axis in radians, counter-clockwise from the +x axis.
    center : tuple of float, optional
        Sub-pixel position ``(x, y)`` of the profile centre in stamp pixel coordinates
        (0-based, pixel ``i`` spans ``[i - 0.5, i + 0.5]``). Default: the central pixel's centre,
        ``((size - 1) / 2, (size - 1) / 2)``.
    oversample : int
        Sub-pixel samples per pixel along each axis.

    Returns
    -------
    psf : 2D ndarray of float64, shape (size, size)
        Indexed ``[y, x]``; sums to 1.
    """
    _check_psf_args(size, fwhm, beta, ellipticity, oversample)
    size, oversample = int(size), int(oversample)
    half = (size - 1) / 2.0
    cx, cy = (half, half) if center is None else (float(center[0]), float(center[1]))
    alpha = moffat_alpha(fwhm, beta)
    sub = (np.arange(size * oversample) + 0.5) / oversample - 0.5
    dx = (sub - cx)[np.newaxis, :]
    dy = (sub - cy)[:, np.newaxis]
    cos_a, sin_a = np.cos(angle), np.sin(angle)
    u = (dx * cos_a + dy * sin_a) / alpha
    v = (dy * cos_a - dx * sin_a) / (alpha * (1.0 - ellipticity))
    profile = np.exp(-beta * np.log1p(u * u + v * v))
    n = size * oversample
    # Two single-axis reductions are faster than one over axes (1, 3).
    binned = profile.reshape(n, size, oversample).sum(-1).reshape(size, oversample, size).sum(1)
    return binned / binned.sum()


def effective_pixels(psf: np.ndarray) -> float:
    """Effective number of pixels of a PSF, ``N_eff = 1 / sum(P**2)`` with ``sum(P) = 1``.

    For a Gaussian of standard deviation ``s`` pixels, ``N_eff = 4 pi s**2``. The S/N of an
    optimally (PSF-)weighted flux on a background of per-pixel noise ``sigma`` is
    ``F / (sigma * sqrt(N_eff))``.

    Parameters
    ----------
    psf : 2D ndarray
        PSF stamp; it is normalised to sum 1 here, so any positive scale works.

    Returns
    -------
    float
        N_eff in pixels.
    """
    p = np.asarray(psf, dtype=float)
    total = p.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("psf must have a finite, positive sum to define N_eff")
    p = p / total
    return float(1.0 / np.sum(p * p))
