"""Flux scale between two images from matched-star photometry."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from pipeline.errors import ScienceError

__all__ = ["FluxScale", "aperture_fraction", "flux_scale"]


@dataclass
class FluxScale:
    """Science/reference flux ratio.

    Attributes
    ----------
    ratio : float
        F_n / F_r: science flux of a star divided by its reference flux.
    error : float
        Standard error of ``ratio``.
    scatter : float
        Fractional star-to-star scatter beyond photon noise: the systematic flux
        error (PSF and calibration) given to ZOGY as its flux-error floor.
    n_stars : int
        Stars used.
    """

    ratio: float
    error: float
    scatter: float
    n_stars: int


def flux_scale(
    science: np.ndarray,
    reference: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    *,
    radius: float,
    rms_science: np.ndarray | float,
    rms_reference: np.ndarray | float,
    mask: np.ndarray | None = None,
    min_snr: float = 20.0,
    aperture_correction: float = 1.0,
) -> FluxScale:
    """Ratio of aperture fluxes of the same stars in two images on one grid.

    The aperture is wide (several FWHM), so the ratio does not depend on the PSFs.

    Parameters
    ----------
    science, reference : 2D ndarray
        Background-subtracted images on the same grid (ADU).
    x, y : ndarray
        Star positions (0-based pixels).
    radius : float
        Aperture radius in pixels.
    rms_science, rms_reference : 2D ndarray or float
        Background noise of each image.
    mask : 2D ndarray of bool, optional
        Bad pixels; stars touching one are skipped.
    min_snr : float
        Minimum S/N of a star in both images.
    aperture_correction : float
        (Reference PSF's share of flux in the aperture) / (science PSF's share): the
        broader PSF loses more light outside the aperture.

    Returns
    -------
    FluxScale
    """
    fluxes, errors = [], []
    for image, rms in ((science, rms_science), (reference, rms_reference)):
        data = np.ascontiguousarray(np.nan_to_num(image), dtype=np.float32)
        err = np.array(np.broadcast_to(rms, data.shape), dtype=np.float32, order="C")
        bad = ~np.isfinite(image) if mask is None else (mask | ~np.isfinite(image))
        flux, flux_err, flag = sep.sum_circle(data, x, y, radius, err=err, mask=bad, subpix=5)
        flux = np.where(flag & sep.APER_HASMASKED, np.nan, flux)
        fluxes.append(flux)
        errors.append(flux_err)
    fs, fr = fluxes
    es, er = errors
    good = np.isfinite(fs) & np.isfinite(fr) & (fs > min_snr * es) & (fr > min_snr * er)
    if good.sum() < 3:
        raise ScienceError(
            f"only {int(good.sum())} stars are bright enough in both images to measure the flux "
            "scale: give flux_scale explicitly or use deeper images"
        )
    ratios = fs[good] / fr[good]
    noise = ratios * np.sqrt((es[good] / fs[good]) ** 2 + (er[good] / fr[good]) ** 2)
    ratio, error, scatter = _robust_ratio(ratios, noise)
    # the star-to-star scatter beyond noise limits the mean as much as the noise does
    error = float(np.hypot(error, scatter * ratio / np.sqrt(good.sum())))
    ratio *= aperture_correction
    return FluxScale(
        ratio=ratio, error=error * aperture_correction, scatter=scatter, n_stars=int(good.sum())
    )


def _robust_ratio(ratios: np.ndarray, noise: np.ndarray) -> tuple[float, float, float]:
    """Clipped weighted mean, its error and the fractional excess scatter."""
    keep = np.ones(len(ratios), dtype=bool)
    for _ in range(5):
        centre = np.median(ratios[keep])
        spread = 1.4826 * np.median(np.abs(ratios[keep] - centre))
        keep = np.abs(ratios - centre) < 4 * spread + 1e-12
        if keep.sum() < 3:
            keep = np.ones(len(ratios), dtype=bool)
            break
    weights = 1.0 / noise[keep] ** 2
    mean = float(np.sum(weights * ratios[keep]) / np.sum(weights))
    error = float(1.0 / np.sqrt(np.sum(weights)))
    chi = (ratios[keep] - mean) / noise[keep]
    excess = max(0.0, float(np.median(chi**2) / 0.455) - 1.0)  # 0.455: median of χ²(1)
    scatter = float(np.sqrt(excess * np.median((noise[keep] / mean) ** 2)))
    return mean, error, scatter


def aperture_fraction(psf: np.ndarray, radius: float) -> float:
    """Share of a PSF stamp's flux inside a circular aperture of ``radius`` pixels."""
    ny, nx = psf.shape
    yy, xx = np.indices(psf.shape)
    r = np.hypot(yy - (ny - 1) / 2, xx - (nx - 1) / 2)
    return float(psf[r <= radius].sum() / psf.sum())
