"""Empirical PSFs from an image's own stars, per tile to follow spatial variation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy import ndimage

from pipeline.errors import ScienceError

__all__ = ["PSFModel", "build_psf", "measure_fwhm", "psf_stamp_size"]


@dataclass
class PSFModel:
    """PSF stamps on a grid of tiles.

    Attributes
    ----------
    stamps : 4D ndarray of float32, shape (ny_tiles, nx_tiles, size, size)
        Centred PSF of each tile, each summing to 1.
    shape : tuple of int
        (ny, nx) of the image the model describes.
    n_stars : 2D ndarray of int
        Stars used per tile (0 where the tile fell back to the global PSF).
    fwhm : float
        FWHM of the global PSF in pixels.
    """

    stamps: np.ndarray
    shape: tuple[int, int]
    n_stars: np.ndarray
    fwhm: float

    @property
    def size(self) -> int:
        """Stamp size in pixels (odd)."""
        return int(self.stamps.shape[-1])

    @property
    def grid(self) -> tuple[int, int]:
        """(ny_tiles, nx_tiles)."""
        return int(self.stamps.shape[0]), int(self.stamps.shape[1])

    def at(self, x: float, y: float) -> np.ndarray:
        """PSF at pixel (x, y): bilinear interpolation between tile centres."""
        ty, tx = self.grid
        fy = np.clip((y + 0.5) / self.shape[0] * ty - 0.5, 0, ty - 1)
        fx = np.clip((x + 0.5) / self.shape[1] * tx - 0.5, 0, tx - 1)
        y0, x0 = int(np.floor(fy)), int(np.floor(fx))
        y1, x1 = min(y0 + 1, ty - 1), min(x0 + 1, tx - 1)
        wy, wx = fy - y0, fx - x0
        stamp = (
            (1 - wy) * (1 - wx) * self.stamps[y0, x0]
            + (1 - wy) * wx * self.stamps[y0, x1]
            + wy * (1 - wx) * self.stamps[y1, x0]
            + wy * wx * self.stamps[y1, x1]
        )
        return (stamp / stamp.sum()).astype(np.float32)

    @property
    def global_stamp(self) -> np.ndarray:
        """PSF at the image centre."""
        return self.at((self.shape[1] - 1) / 2, (self.shape[0] - 1) / 2)


def psf_stamp_size(fwhm: float, *, minimum: int = 15, maximum: int = 51) -> int:
    """Odd stamp size that holds a PSF's wings: about five FWHM."""
    size = int(np.ceil(5.0 * fwhm)) | 1
    return int(np.clip(size, minimum | 1, maximum | 1))


def measure_fwhm(psf: np.ndarray) -> float:
    """FWHM (pixels) of a PSF stamp from the area above half maximum: 2·sqrt(A/π)."""
    peak = float(psf.max())
    if peak <= 0:
        raise ScienceError("PSF stamp has no positive peak")
    # upsample so the area counts fractional pixels well
    fine = ndimage.zoom(psf.astype(np.float64), 4, order=3)
    area = np.count_nonzero(fine >= 0.5 * fine.max()) / 16.0
    return float(2.0 * np.sqrt(area / np.pi))


def build_psf(
    data: np.ndarray,
    stars: Table,
    *,
    size: int | None = None,
    tiles: tuple[int, int] | None = None,
    min_stars_per_tile: int = 12,
    mask: np.ndarray | None = None,
) -> PSFModel:
    """Stack recentred, normalised star stamps into a PSF per tile.

    Parameters
    ----------
    data : 2D ndarray
        Background-subtracted image (ADU).
    stars : Table
        Point sources with x, y and r50 (from :func:`pipeline.science.sources.select_stars`).
    size : int, optional
        Stamp size (odd); default from the stars' half-light radius.
    tiles : tuple of int, optional
        (ny, nx) tiles; default: as many as keep ``min_stars_per_tile`` stars each, up to 4×4.
    min_stars_per_tile : int
        Tiles with fewer stars use the global PSF.
    mask : 2D ndarray of bool, optional
        Bad pixels; stars with a bad pixel in their stamp are skipped.

    Returns
    -------
    PSFModel
    """
    if len(stars) < 2:
        raise ScienceError(
            f"only {len(stars)} usable PSF stars found: the image needs at least 2 bright, "
            "isolated, unsaturated stars (check the saturation level and detection threshold)"
        )
    if size is None:
        # r50 of a Moffat profile is ~0.6 FWHM, of a Gaussian 0.5 FWHM
        fwhm_guess = 1.8 * float(np.median(stars["r50"]))
        size = psf_stamp_size(fwhm_guess)
    stamps, xs, ys = _star_stamps(data, stars, size, mask)
    if len(stamps) < 2:
        raise ScienceError(f"only {len(stamps)} PSF stars have clean {size}×{size} stamps")
    global_psf = _combine(stamps)
    if tiles is None:
        per_tile = len(stamps) / max(min_stars_per_tile, 1)
        n = int(np.clip(np.floor(np.sqrt(per_tile)), 1, 4))
        tiles = (n, n)
    ny, nx = tiles
    out = np.empty((ny, nx, size, size), dtype=np.float32)
    counts = np.zeros((ny, nx), dtype=int)
    for ty in range(ny):
        for tx in range(nx):
            inside = (
                (ys >= ty * data.shape[0] / ny)
                & (ys < (ty + 1) * data.shape[0] / ny)
                & (xs >= tx * data.shape[1] / nx)
                & (xs < (tx + 1) * data.shape[1] / nx)
            )
            if inside.sum() >= min_stars_per_tile:
                out[ty, tx] = _combine(stamps[inside])
                counts[ty, tx] = int(inside.sum())
            else:
                out[ty, tx] = global_psf
    return PSFModel(out, data.shape, counts, measure_fwhm(global_psf))


def _star_stamps(
    data: np.ndarray, stars: Table, size: int, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Recentre each star on its stamp centre and normalise it to unit flux."""
    half = size // 2
    pad = 3
    big = half + pad
    core = max(2, size // 7)
    stamps, xs, ys = [], [], []
    for x, y in zip(np.asarray(stars["x"]), np.asarray(stars["y"]), strict=True):
        ix, iy = int(np.rint(x)), int(np.rint(y))
        if iy - big < 0 or ix - big < 0 or iy + big >= data.shape[0] or ix + big >= data.shape[1]:
            continue
        cut = data[iy - big : iy + big + 1, ix - big : ix + big + 1].astype(np.float64)
        bad = ~np.isfinite(cut)
        if mask is not None:
            bad |= mask[iy - big : iy + big + 1, ix - big : ix + big + 1]
        if bad[big - core : big + core + 1, big - core : big + core + 1].any():
            continue  # a bad pixel in the core spoils the star; in the wings it is skipped
        shifted = ndimage.shift(np.where(bad, 0.0, cut), (iy - y, ix - x), order=3, mode="nearest")
        lost = ndimage.shift(bad.astype(float), (iy - y, ix - x), order=1) > 0.01
        stamp = np.where(lost, np.nan, shifted)[pad:-pad, pad:-pad]
        stamp = stamp - _ring_median(stamp)
        total = np.nansum(stamp)
        if total <= 0:
            continue
        stamps.append(stamp / total)
        xs.append(x)
        ys.append(y)
    return np.asarray(stamps), np.asarray(xs), np.asarray(ys)


def _ring_median(stamp: np.ndarray) -> float:
    """Residual background from the stamp's outermost ring of pixels."""
    edge = np.concatenate([stamp[0], stamp[-1], stamp[1:-1, 0], stamp[1:-1, -1]])
    return float(np.nanmedian(edge)) if np.isfinite(edge).any() else 0.0


def _combine(stamps: np.ndarray) -> np.ndarray:
    """Sigma-clipped mean of normalised stamps, recentred and renormalised."""
    median = np.nanmedian(stamps, axis=0)
    spread = 1.4826 * np.nanmedian(np.abs(stamps - median), axis=0) + 1e-12
    good = np.abs(stamps - median) < 3.0 * spread  # NaN compares False
    mean = np.where(good, stamps, 0).sum(axis=0) / np.maximum(good.sum(axis=0), 1)
    mean = np.where(good.any(axis=0), mean, 0.0)
    centre = (np.asarray(mean.shape) - 1) / 2
    core = np.clip(mean, 0, None)
    yy, xx = np.indices(mean.shape)
    weight = core * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 9.0))
    cy, cx = (weight * yy).sum() / weight.sum(), (weight * xx).sum() / weight.sum()
    mean = ndimage.shift(mean, (centre[0] - cy, centre[1] - cx), order=3, mode="constant")
    return (mean / mean.sum()).astype(np.float32)
