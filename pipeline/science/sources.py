"""Source extraction (SExtractor's algorithm, through sep) and star selection."""

from __future__ import annotations

import threading

import numpy as np
import sep
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.science.masks import dilate_square

__all__ = ["find_sources", "select_stars", "source_footprints"]

sep.set_sub_object_limit(4096)
# the pixel-stack size is global to sep: set and used under one lock, so threads
# extracting from images of different sizes cannot size each other's stack
_EXTRACT_LOCK = threading.Lock()


def find_sources(
    data: np.ndarray,
    rms: np.ndarray | float,
    mask: np.ndarray | None = None,
    *,
    threshold: float = 3.0,
    min_area: int = 5,
) -> Table:
    """Detect sources in a background-subtracted image.

    Parameters
    ----------
    data : 2D ndarray
        Background-subtracted image (ADU); NaN pixels are ignored.
    rms : 2D ndarray or float
        Background noise (ADU).
    mask : 2D ndarray of bool, optional
        Pixels to ignore.
    threshold : float
        Detection threshold in units of ``rms``.
    min_area : int
        Minimum number of connected pixels above threshold.

    Returns
    -------
    astropy.table.Table
        Columns x, y (0-based pixels), flux, flux_err, snr, peak, a, b, theta, r50 (pixels,
        half-light radius), flag (sep flags), npix; brightest first.
    """
    image = np.ascontiguousarray(np.nan_to_num(data), dtype=np.float32)
    ignore = ~np.isfinite(data) if mask is None else (mask | ~np.isfinite(data))
    err = np.array(np.broadcast_to(rms, image.shape), dtype=np.float32, order="C")
    # the pixel stack is allocated on every call: size it to the image, not to the largest
    # image there could be (a 5M stack costs ~80 ms per call even on a small cutout)
    with _EXTRACT_LOCK:
        sep.set_extract_pixstack(int(np.clip(image.size // 2, 300_000, 5_000_000)))
        objects = sep.extract(
            image,
            threshold,
            err=err,
            mask=ignore,
            minarea=min_area,
            deblend_cont=0.005,
            clean=True,
        )
    table = Table()
    if len(objects) == 0:
        for name in ("x", "y", "flux", "flux_err", "snr", "peak", "a", "b", "theta", "r50"):
            table[name] = np.zeros(0)
        table["flag"] = np.zeros(0, dtype=int)
        table["npix"] = np.zeros(0, dtype=int)
        return table
    radius = np.clip(6.0 * np.sqrt(objects["a"] * objects["b"]), 3.0, 30.0)
    flux, flux_err, _ = sep.sum_circle(
        image, objects["x"], objects["y"], radius, err=err, mask=ignore, subpix=5
    )
    r50, _ = sep.flux_radius(
        image, objects["x"], objects["y"], radius, 0.5, normflux=flux, subpix=5
    )
    # windowed centroids (SExtractor's XWIN): far less noisy than isophotal ones, which
    # matters for registration, whose residual scatter becomes ZOGY's astrometric noise
    # (only for sources bright enough to be used for either: it costs per source).
    # subpix=0 takes the window's exact pixel overlaps: within 1e-4 px of sep's default
    # 11×11 sampling and about twice as fast
    x, y = objects["x"].astype(float).copy(), objects["y"].astype(float).copy()
    bright = np.flatnonzero(flux > 10.0 * np.maximum(flux_err, 1e-12))
    if len(bright):
        sig = np.clip(2.0 * np.nan_to_num(r50[bright], nan=1.0) / 2.35, 0.5, 10.0)
        xwin, ywin, wflag = sep.winpos(image, x[bright], y[bright], sig, mask=ignore, subpix=0)
        good = (wflag == 0) & np.isfinite(xwin) & np.isfinite(ywin)
        good &= np.hypot(xwin - x[bright], ywin - y[bright]) < 2.0
        x[bright[good]], y[bright[good]] = xwin[good], ywin[good]
    table["x"] = x
    table["y"] = y
    table["flux"] = flux
    table["flux_err"] = flux_err
    table["snr"] = np.where(flux_err > 0, flux / np.maximum(flux_err, 1e-12), 0.0)
    table["peak"] = objects["peak"]
    table["a"] = objects["a"]
    table["b"] = objects["b"]
    table["theta"] = objects["theta"]
    table["r50"] = r50
    table["flag"] = objects["flag"].astype(int)
    table["npix"] = objects["npix"].astype(int)
    table.sort("flux", reverse=True)
    return table


def select_stars(
    sources: Table,
    shape: tuple[int, int],
    *,
    saturation_level: float = np.inf,
    min_snr: float = 30.0,
    isolation: float = 10.0,
    edge: float = 10.0,
    locus: bool = True,
) -> Table:
    """Bright, isolated, unsaturated point sources on the stellar locus.

    The stellar locus is the narrow band of half-light radii shared by point sources;
    galaxies lie above it and cosmic rays below.

    Parameters
    ----------
    sources : Table
        Output of :func:`find_sources`.
    shape : tuple of int
        Image shape, for the edge cut.
    saturation_level : float
        Peak above which (background-subtracted ADU) a star is too bright.
    min_snr : float
        Minimum aperture S/N.
    isolation : float
        No other source within this many pixels.
    edge : float
        Minimum distance from the image edge (pixels).
    locus : bool
        Keep only sources on the stellar locus (False: every source passing the cuts).

    Returns
    -------
    Table
        The selected rows.
    """
    if len(sources) < 3:
        return sources[:0]
    x, y = np.asarray(sources["x"]), np.asarray(sources["y"])
    distances, _ = cKDTree(np.column_stack([x, y])).query(np.column_stack([x, y]), k=2)
    nearest = distances[:, 1]
    ok = (
        (sources["flag"] == 0)
        & (sources["snr"] >= min_snr)
        & (sources["peak"] < 0.8 * saturation_level)
        & (nearest > isolation)
        & (x > edge)
        & (y > edge)
        & (x < shape[1] - 1 - edge)
        & (y < shape[0] - 1 - edge)
        & (sources["b"] / np.maximum(sources["a"], 1e-6) > 0.6)
    )
    candidates = sources[ok]
    if len(candidates) < 3 or not locus:
        return candidates
    r50 = np.asarray(candidates["r50"])
    # the locus: point sources are the most compact well-populated group (cosmic rays,
    # sharper still, are masked or fail the S/N and shape cuts; galaxies are larger)
    grid = np.quantile(r50, np.linspace(0.02, 0.8, 40))
    counts = np.array([np.sum(np.abs(r50 - g) < 0.1 * g) for g in grid])
    locus = float(grid[np.argmax(counts >= 0.5 * counts.max())])
    on_locus = np.abs(r50 - locus) < 0.15 * locus
    return candidates[on_locus]


def source_footprints(
    data: np.ndarray,
    rms: np.ndarray | float,
    mask: np.ndarray | None = None,
    *,
    threshold: float = 1.0,
    grow: int = 4,
) -> np.ndarray:
    """Pixels of sources: where the 3×3 mean exceeds ``threshold``·rms, grown by ``grow``.

    The 3×3 mean has a third of the pixel noise, so the default threshold is a 3σ cut
    on it: faint wings at one pixel-σ are caught while pure noise almost never is
    (which would bias a background estimated from what is left).

    Parameters
    ----------
    data : 2D ndarray
        Background-subtracted image (ADU).
    rms : 2D ndarray or float
        Background noise (ADU).
    mask : 2D ndarray of bool, optional
        Pixels to ignore.
    threshold : float
        Threshold on the 3×3 mean, in units of the pixel ``rms``.
    grow : int
        Dilation radius in pixels.

    Returns
    -------
    2D ndarray of bool
    """
    image = np.nan_to_num(np.asarray(data, dtype=np.float32))
    if mask is not None:
        image = np.where(mask, 0.0, image)
    smooth = ndimage.uniform_filter(image, size=3)
    footprint = smooth > threshold * np.asarray(rms, dtype=np.float32)
    # keep connected groups of at least five pixels, as an extraction would
    labels, count = ndimage.label(footprint)
    if count:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        footprint = sizes[labels] >= 5
    if grow > 0 and footprint.any():
        footprint = dilate_square(footprint, grow)
    return footprint
