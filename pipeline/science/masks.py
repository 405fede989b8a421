"""Bad-pixel masks: saturation and bleed trails, bad columns, cosmic rays."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = [
    "bad_column_mask",
    "cosmic_ray_mask",
    "grow",
    "saturation_mask",
]


def grow(mask: np.ndarray, radius: int) -> np.ndarray:
    """Dilate a boolean mask by a disc of ``radius`` pixels."""
    if radius <= 0 or not mask.any():
        return mask.copy()
    y, x = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return ndimage.binary_dilation(mask, structure=(x * x + y * y) <= radius * radius)


def saturation_mask(data: np.ndarray, saturation: float, *, radius: int = 2) -> np.ndarray:
    """Pixels at or near saturation, with their bleed trails, grown by ``radius``.

    Bleed trails are runs of saturated pixels along columns, so they are caught by
    the same level test; growing covers the non-linear pixels around them.

    Parameters
    ----------
    data : 2D ndarray
        Image in ADU, background included (saturation is a raw level).
    saturation : float
        Saturation level in ADU; pixels above 98% of it count.
    radius : int
        Growth radius in pixels.

    Returns
    -------
    2D ndarray of bool
    """
    if not np.isfinite(saturation):
        return np.zeros(data.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        hit = data >= 0.98 * saturation
    return grow(hit, radius)


def bad_column_mask(
    data: np.ndarray, rms: np.ndarray | float, *, nsigma: float = 8.0, min_length: int = 16
) -> np.ndarray:
    """Columns (or stretches of them) whose level departs from both neighbours.

    A stretch of at least ``min_length`` pixels where a column differs from the
    median of its two neighbouring columns by more than ``nsigma`` times the noise
    divided by sqrt(min_length) along the whole stretch: hot, dead or offset columns.

    Parameters
    ----------
    data : 2D ndarray
        Image (ADU), background included.
    rms : 2D ndarray or float
        Background noise (ADU).
    nsigma : float
        Threshold on the stretch-averaged deviation.
    min_length : int
        Shortest stretch (pixels) flagged.

    Returns
    -------
    2D ndarray of bool
    """
    image = np.nan_to_num(np.asarray(data, dtype=np.float32))
    left = np.roll(image, 1, axis=1)
    right = np.roll(image, -1, axis=1)
    neighbours = 0.5 * (left + right)
    deviation = image - neighbours
    # average along the column over min_length pixels: stars are round and average out
    smooth = ndimage.uniform_filter1d(deviation, size=min_length, axis=0)
    noise = np.asarray(rms, dtype=np.float32) * np.sqrt(1.5 / min_length)
    # a star's core also deviates from its neighbouring columns: require that the
    # deviation is not explained by a 2-D source (the neighbours' own contrast)
    contrast = np.abs(left - right)
    smooth_contrast = ndimage.uniform_filter1d(contrast, size=min_length, axis=0)
    hit = (np.abs(smooth) > nsigma * noise) & (np.abs(smooth) > 2.0 * smooth_contrast)
    hit[:, 0] = hit[:, -1] = False
    # keep only vertical runs at least min_length long
    opened = ndimage.binary_opening(hit, structure=np.ones((min_length, 1), dtype=bool))
    return ndimage.binary_dilation(opened, structure=np.ones((3, 3), dtype=bool))


def cosmic_ray_mask(
    data: np.ndarray,
    background: np.ndarray | float,
    rms: np.ndarray | float,
    *,
    gain: float,
    nsigma: float = 5.0,
    contrast: float = 2.0,
    neighbour_sigma: float = 2.5,
) -> np.ndarray:
    """Cosmic-ray hits: pixels sharper than any PSF (after L.A.Cosmic, van Dokkum 2001).

    A pixel is a hit when it exceeds its 3×3 median by ``nsigma`` times its noise and
    that excess is ``contrast`` times larger than the image's fine structure there
    (the 3×3 median minus its 7×7 median), which a PSF wider than ~2 px never reaches.
    Neighbours above ``neighbour_sigma`` join the hit, then the mask grows by one pixel.

    Parameters
    ----------
    data : 2D ndarray
        Image (ADU), background included.
    background, rms : 2D ndarray or float
        Background level and noise (ADU).
    gain : float
        Electrons per ADU, for the source Poisson noise.
    nsigma, contrast, neighbour_sigma : float
        Detection threshold, sharpness threshold and growth threshold.

    Returns
    -------
    2D ndarray of bool
    """
    image = np.nan_to_num(np.asarray(data, dtype=np.float32))
    signal = np.clip(image - background, 0, None)
    noise = np.sqrt(np.asarray(rms, dtype=np.float32) ** 2 + signal / gain)
    med3 = ndimage.median_filter(image, size=3)
    excess = (image - med3) / noise
    fine = np.clip(med3 - ndimage.median_filter(med3, size=7), 0, None)
    sharp = (image - med3) > contrast * np.maximum(fine, 0.5 * noise)
    hits = (excess > nsigma) & sharp
    if not hits.any():
        return hits
    near = ndimage.binary_dilation(hits, structure=np.ones((3, 3), dtype=bool))
    hits |= near & (excess > neighbour_sigma)
    return ndimage.binary_dilation(hits, structure=np.ones((3, 3), dtype=bool))
