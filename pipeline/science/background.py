"""Background level and noise maps."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sep

from pipeline.errors import ScienceError
from pipeline.science.masks import grow

__all__ = ["Background", "estimate_background", "noise_correlation"]


@dataclass
class Background:
    """Smooth background and its noise.

    Attributes
    ----------
    level : 2D ndarray of float32
        Background level (ADU) at every pixel.
    rms : 2D ndarray of float32
        Background noise standard deviation (ADU) at every pixel.
    global_level, global_rms : float
        Their image-wide values.
    """

    level: np.ndarray
    rms: np.ndarray
    global_level: float
    global_rms: float


def estimate_background(
    data: np.ndarray,
    mask: np.ndarray | None = None,
    *,
    box: int = 64,
    filter_size: int = 3,
) -> Background:
    """Estimate the background on a mesh of ``box`` pixels, sources clipped (SExtractor's way).

    Parameters
    ----------
    data : 2D ndarray
        Image in ADU; NaN pixels are ignored.
    mask : 2D ndarray of bool, optional
        True where pixels must be ignored.
    box : int
        Mesh size in pixels.
    filter_size : int
        Median filter size applied to the mesh.

    Returns
    -------
    Background
    """
    image = np.ascontiguousarray(data, dtype=np.float32)
    ignore = ~np.isfinite(image)
    if mask is not None:
        ignore |= mask
    if ignore.all():
        raise ScienceError("every pixel is masked or NaN: cannot estimate a background")
    box = int(min(box, *image.shape))
    filled = np.where(ignore, 0.0, image).astype(np.float32)
    bkg = sep.Background(filled, mask=ignore, bw=box, bh=box, fw=filter_size, fh=filter_size)
    return Background(
        level=bkg.back().astype(np.float32),
        rms=bkg.rms().astype(np.float32),
        global_level=float(bkg.globalback),
        global_rms=float(bkg.globalrms),
    )


def noise_correlation(
    image: np.ndarray,
    rms: np.ndarray | float,
    mask: np.ndarray | None = None,
    *,
    lags: int = 2,
    clip: float = 3.0,
) -> np.ndarray:
    """The autocorrelation of an image's background noise, in units of ``rms²``.

    Resampling (a stack's warping, a science image put on the reference grid) shares
    each pixel's noise with its neighbours: the noise on a PSF's scale is then larger
    than the per-pixel ``rms`` says. Pixels within 3 pixels of a ``clip``-sigma pixel
    are left out, so bright sources do not count; fainter ones still add a little at
    every lag. (Not :func:`~pipeline.science.sources.source_footprints`: its threshold
    on the 3×3 mean assumes white noise, and on correlated noise it cuts the noise's own
    high excursions, which would bias the correlation low.)

    Parameters
    ----------
    image : 2D ndarray
        Background-subtracted image (ADU).
    rms : 2D ndarray or float
        Its background noise per pixel (ADU).
    mask : 2D ndarray of bool, optional
        True where pixels must be ignored.
    lags : int
        Largest offset measured, in pixels along each axis.
    clip : float
        Pixels above this many ``rms`` (and their neighbours) are left out.

    Returns
    -------
    ndarray of shape (2·lags+1, 2·lags+1)
        ⟨z(p) z(p+δ)⟩ for z = image/rms, offset δ = (dy, dx) at ``[lags + dy, lags + dx]``;
        symmetric, 1 at the centre for white noise with the stated ``rms`` and 0 elsewhere.
    """
    z = np.asarray(image, dtype=np.float64) / rms
    ignore = ~np.isfinite(z) if mask is None else (mask | ~np.isfinite(z))
    ignore |= grow(np.abs(np.where(ignore, 0.0, z)) > clip, 3)
    if (~ignore).sum() < 100:
        raise ScienceError("fewer than 100 unmasked background pixels: cannot measure noise")
    z = np.where(ignore, 0.0, z)
    weight = (~ignore).astype(np.float64)
    ny, nx = z.shape
    out = np.zeros((2 * lags + 1, 2 * lags + 1))
    # the offsets δ and -δ pair the same pixels: measure one half-plane, mirror the other
    for dy in range(0, lags + 1):
        for dx in range(-lags if dy else 0, lags + 1):
            a = (slice(dy, ny), slice(max(dx, 0), nx + min(dx, 0)))
            b = (slice(0, ny - dy), slice(max(-dx, 0), nx + min(-dx, 0)))
            pairs = (weight[a] * weight[b]).sum()
            value = (z[a] * z[b]).sum() / pairs if pairs else 0.0
            out[lags + dy, lags + dx] = out[lags - dy, lags - dx] = value
    return out
