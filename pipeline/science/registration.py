"""Put the science image on the reference grid: star matching, WCS refinement, reprojection."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from astropy.coordinates import SkyCoord
from astropy.table import Table
from astropy.wcs import WCS
from astropy.wcs.utils import fit_wcs_from_points
from reproject import reproject_interp
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.errors import ScienceError

__all__ = [
    "Registration",
    "match_points",
    "pixel_map",
    "refine_wcs",
    "reproject_to",
    "resample",
]


@dataclass
class Registration:
    """How the science image's WCS was checked and refined against the reference.

    Attributes
    ----------
    wcs : astropy.wcs.WCS
        Science WCS to use (refined, or the header's when refinement was not needed).
    n_matched : int
        Stars matched between the images.
    offset : tuple of float
        Median (dx, dy) in reference pixels of the header WCS before refinement.
    rms : tuple of float
        Robust rms (x, y) in reference pixels of the bright matched sources'
        leave-one-out residuals after refinement (a source that pins the fit tells
        nothing of the error there): the astrometric noise σ_x, σ_y given to ZOGY.
        It holds the sources' centroid noise besides the mapping's error (several
        times smaller on simulated pairs), a conservative σ that also covers the
        bright stars' PSF-wing residuals.
    refined : bool
        Whether the WCS was refitted.
    shift : tuple of float or None
        When the science grid is the reference grid moved by a sub-pixel translation,
        that translation (dx, dy) in pixels (science pixel = reference pixel + shift):
        the science image is then left unresampled and its PSF carries the shift.
    """

    wcs: WCS
    n_matched: int
    offset: tuple[float, float]
    rms: tuple[float, float]
    refined: bool
    shift: tuple[float, float] | None = None


def match_points(a: np.ndarray, b: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Mutual nearest neighbours between two (N, 2) point sets within ``radius``.

    Returns
    -------
    tuple of ndarray
        Indices into ``a`` and ``b`` of the matched pairs.
    """
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    d_ab, i_ab = cKDTree(b).query(a, distance_upper_bound=radius)
    _, i_ba = cKDTree(a).query(b)
    ia = np.flatnonzero(np.isfinite(d_ab))
    ib = i_ab[ia]
    mutual = i_ba[ib] == ia
    return ia[mutual], ib[mutual]


def _vote_offset(a: np.ndarray, b: np.ndarray, search: float, bin_size: float = 1.0) -> np.ndarray:
    """Most common displacement b - a among pairs closer than ``search`` pixels."""
    tree = cKDTree(b)
    pairs = tree.query_ball_point(a, r=search)
    offsets = [b[j] - a[i] for i, js in enumerate(pairs) for j in js]
    if not offsets:
        return np.zeros(2)
    d = np.asarray(offsets)
    edges = np.arange(-search, search + bin_size, bin_size)
    hist, ex, ey = np.histogram2d(d[:, 0], d[:, 1], bins=[edges, edges])
    ix, iy = np.unravel_index(np.argmax(hist), hist.shape)
    near = (np.abs(d[:, 0] - (ex[ix] + bin_size / 2)) < bin_size) & (
        np.abs(d[:, 1] - (ey[iy] + bin_size / 2)) < bin_size
    )
    return np.median(d[near], axis=0)


def refine_wcs(
    science_wcs: WCS,
    science_stars: Table,
    reference_wcs: WCS,
    reference_stars: Table,
    *,
    search_radius: float = 40.0,
    match_radius: float = 1.5,
    max_stars: int = 400,
    min_matches: int = 8,
) -> Registration:
    """Check the science WCS against the reference's stars and refit it when it is off.

    Science star positions are mapped through both WCSs into reference pixels; the
    dominant offset is found by voting over all pairs within ``search_radius``, the
    stars are matched, and a TAN WCS is fitted from the science pixels to the sky
    positions the reference WCS gives the matched stars.

    Parameters
    ----------
    science_wcs, reference_wcs : WCS
    science_stars, reference_stars : Table
        Sources with x, y, snr (brightest first), from :func:`find_sources`.
    search_radius : float
        Largest WCS error to recover (reference pixels).
    match_radius : float
        Matching tolerance after the offset is removed (pixels).
    max_stars : int
        Brightest stars used from each list.
    min_matches : int
        Fewer matches than this raise ScienceError.

    Returns
    -------
    Registration
    """
    sci = science_stars[:max_stars]
    ref = reference_stars[:max_stars]
    sci_xy = np.column_stack([sci["x"], sci["y"]]).astype(float)
    ref_xy = np.column_stack([ref["x"], ref["y"]]).astype(float)
    world = science_wcs.pixel_to_world(sci_xy[:, 0], sci_xy[:, 1])
    predicted = np.column_stack(reference_wcs.world_to_pixel(world))
    offset = _vote_offset(predicted, ref_xy, search_radius)
    ia, ib = match_points(predicted + offset, ref_xy, match_radius * 2)
    if len(ia) < min_matches:
        raise ScienceError(
            f"only {len(ia)} stars matched between science and reference (need {min_matches}): "
            "the WCS may be off by more than the search radius "
            f"({search_radius} px) or the images do not overlap"
        )
    wcs = _fit_tan(sci_xy[ia], reference_wcs, ref_xy[ib], science_wcs)
    for _ in range(2):  # rematch with the refined solution, tighter
        predicted = np.column_stack(reference_wcs.world_to_pixel(wcs.pixel_to_world(*sci_xy.T)))
        ia, ib = match_points(predicted, ref_xy, match_radius)
        if len(ia) < min_matches:
            raise ScienceError(f"only {len(ia)} stars matched after refining the WCS")
        wcs = _fit_tan(sci_xy[ia], reference_wcs, ref_xy[ib], science_wcs)
    wcs, leverage = _weighted_refit(
        wcs,
        sci_xy[ia],
        ref_xy[ib],
        np.asarray(sci["snr"], dtype=float)[ia],
        np.asarray(ref["snr"], dtype=float)[ib],
        reference_wcs,
    )
    predicted = np.column_stack(reference_wcs.world_to_pixel(wcs.pixel_to_world(*sci_xy[ia].T)))
    # leave-one-out residuals: a match that pins the fit shows its own residual as ~0,
    # which says nothing about the mapping's error there
    residual = (predicted - ref_xy[ib]) / np.clip(1.0 - leverage, 0.05, None)[:, None]
    bright = (np.asarray(sci["snr"])[ia] > 50) & (np.asarray(ref["snr"])[ib] > 50)
    use = residual[bright] if bright.sum() >= 5 else residual
    rms = 1.4826 * np.median(np.abs(use - np.median(use, axis=0)), axis=0)
    shift = _translation(science_wcs, reference_wcs, sci_xy[ia], ref_xy[ib], rms, bright)
    return Registration(
        wcs=wcs,
        n_matched=len(ia),
        offset=(float(offset[0]), float(offset[1])),
        rms=(float(rms[0]), float(rms[1])),
        refined=True,
        shift=shift,
    )


def _translation(
    science_wcs: WCS,
    reference_wcs: WCS,
    sci_xy: np.ndarray,
    ref_xy: np.ndarray,
    rms: np.ndarray,
    bright: np.ndarray,
    *,
    largest: float = 1.0,
) -> tuple[float, float] | None:
    """The sub-pixel shift (science = reference + shift) when that is all that separates them.

    It is, when the header WCSs map one grid onto the other by a translation and the
    matched stars agree with one constant offset as well as with the fitted WCS (a
    full fit on few stars invents small rotations and scale changes from noise).
    """
    # the corners of the region the stars cover
    (x0, y0), (x1, y1) = sci_xy.min(axis=0), sci_xy.max(axis=0)
    corners_x = np.array([x0, x1, x0, x1])
    corners_y = np.array([y0, y0, y1, y1])
    hx, hy = reference_wcs.world_to_pixel(science_wcs.pixel_to_world(corners_x, corners_y))
    header = np.column_stack([hx - corners_x, hy - corners_y])
    if np.ptp(header, axis=0).max() > 0.02:
        return None  # the grids rotate or scale with respect to each other
    base = header.mean(axis=0)
    offsets = ref_xy - sci_xy - base
    use_xy = sci_xy[bright] if bright.sum() >= 8 else sci_xy
    use = offsets[bright] if bright.sum() >= 8 else offsets
    if len(use) < 4:
        return None
    # is there a significant linear trend of the offsets across the field (rotation,
    # scale)? Fit offset = a + B·(position - centre) and compare B's effect at the
    # field's edge with its uncertainty and with a twentieth of a pixel
    centre_xy = use_xy.mean(axis=0)
    design = np.column_stack([np.ones(len(use)), use_xy - centre_xy])
    coef, *_ = np.linalg.lstsq(design, use, rcond=None)
    resid = use - design @ coef
    sigma = 1.4826 * np.median(np.abs(resid - np.median(resid, axis=0)), axis=0) + 1e-3
    cov = np.linalg.inv(design.T @ design)
    reach = np.abs(use_xy - centre_xy).max(axis=0)
    trend = np.abs(coef[1:]) * reach[:, None]  # pixels at the edge, per axis pair
    trend_err = np.sqrt(np.diag(cov)[1:])[:, None] * sigma[None, :] * reach[:, None]
    if np.any(trend > np.maximum(3.0 * trend_err, 0.05)):
        return None
    total = base + np.median(use, axis=0)  # reference pixel = science pixel + total
    if np.abs(total).max() > largest:
        return None
    return float(-total[0]), float(-total[1])


def _weighted_refit(
    wcs: WCS,
    sci_xy: np.ndarray,
    ref_xy: np.ndarray,
    snr_sci: np.ndarray,
    snr_ref: np.ndarray,
    reference_wcs: WCS,
    *,
    clip: float = 3.0,
    floor_snr: float = 500.0,
) -> tuple[WCS, np.ndarray]:
    """Correct a TAN fit for what an equal-weight fit gets wrong: noise and outliers.

    The TAN fit weighs a matched source at S/N 10 (centroid error ~0.1 px) like one at
    S/N 1000, and a blend or a galaxy whose centroid moves with the seeing like a star.
    The residuals of the matches (reference pixels) are fitted here with an affine
    correction, each weighted by its centroid precision (S/N of both images, capped at
    ``floor_snr`` for what no centroid does better), rejecting matches beyond ``clip``
    robust σ until none is; the corrected mapping is then turned back into a TAN WCS
    through a grid of exact points spanning the matches. Fewer than 6 matches (or
    kept matches) leave the WCS as it is.

    Returns
    -------
    wcs : WCS
    leverage : ndarray
        Each match's leverage h on the correction (0 for rejected ones): its residual
        divided by 1 - h is its leave-one-out residual.
    """
    no_leverage = np.zeros(len(sci_xy))
    if len(sci_xy) < 6:
        return wcs, no_leverage
    predicted = np.column_stack(reference_wcs.world_to_pixel(wcs.pixel_to_world(*sci_xy.T)))
    residual = predicted - ref_xy
    # a centroid's error goes as 1/S/N; both images' add up
    inv_snr2 = 1.0 / np.maximum(snr_sci, 1.0) ** 2 + 1.0 / np.maximum(snr_ref, 1.0) ** 2
    weight = 1.0 / (inv_snr2 + 2.0 / floor_snr**2)
    centre = predicted.mean(axis=0)
    span = np.maximum(np.ptp(predicted, axis=0), 1.0)

    def affine_terms(points: np.ndarray) -> np.ndarray:
        return np.column_stack([np.ones(len(points)), (points - centre) / span])

    design = affine_terms(predicted)
    keep = np.ones(len(predicted), dtype=bool)
    for _ in range(10):
        if keep.sum() < 6:
            return wcs, no_leverage
        used = keep  # the matches this fit used (keep is rebound below)
        w = np.sqrt(weight[used])[:, None]
        weighted = design[used] * w
        coef, *_ = np.linalg.lstsq(weighted, residual[used] * w, rcond=None)
        normalised = (residual - design @ coef) * np.sqrt(weight)[:, None]
        scale = 1.4826 * np.median(np.abs(normalised[keep]), axis=0)
        worst = np.abs(normalised) / np.maximum(scale, 1e-12)
        within = (worst < clip).all(axis=1)
        if (within == keep).all():
            break
        keep = within
    # exact points: science pixels whose reference pixel is the corrected prediction
    gx, gy = np.meshgrid(
        np.linspace(sci_xy[:, 0].min(), sci_xy[:, 0].max(), 8),
        np.linspace(sci_xy[:, 1].min(), sci_xy[:, 1].max(), 8),
    )
    grid = np.column_stack([gx.ravel(), gy.ravel()])
    at = np.column_stack(reference_wcs.world_to_pixel(wcs.pixel_to_world(*grid.T)))
    target = at - affine_terms(at) @ coef
    # the hat matrix's diagonal of the weighted fit
    leverage = np.zeros(len(sci_xy))
    inverse = np.linalg.pinv(weighted.T @ weighted)
    leverage[used] = np.einsum("nk,kl,nl->n", weighted, inverse, weighted)
    return _fit_tan(grid, reference_wcs, target, wcs), leverage


def _fit_tan(sci_xy: np.ndarray, reference_wcs: WCS, ref_xy: np.ndarray, start: WCS) -> WCS:
    """TAN WCS mapping science pixels to the sky positions of their reference matches."""
    sky = reference_wcs.pixel_to_world(ref_xy[:, 0], ref_xy[:, 1])
    sky = SkyCoord(sky.ra, sky.dec, frame=sky.frame)
    return fit_wcs_from_points((sci_xy[:, 0], sci_xy[:, 1]), sky, projection="TAN")


def reproject_to(
    data: np.ndarray,
    wcs: WCS,
    target_wcs: WCS,
    shape: tuple[int, int],
    *,
    order: str = "bicubic",
) -> tuple[np.ndarray, np.ndarray]:
    """Resample an image onto another grid with ``reproject``.

    Parameters
    ----------
    data : 2D ndarray
        Image to resample (NaN where invalid).
    wcs : WCS
        Its celestial WCS.
    target_wcs : WCS
        WCS of the output grid.
    shape : tuple of int
        (ny, nx) of the output grid.
    order : str
        Interpolation order for :func:`reproject.reproject_interp`.

    Returns
    -------
    resampled : 2D ndarray of float32
        NaN where the input does not cover the output.
    footprint : 2D ndarray of bool
        Where the output has valid data.
    """
    out, footprint = reproject_interp(
        (np.asarray(data, dtype=np.float64), wcs),
        target_wcs,
        shape_out=shape,
        order=order,
        roundtrip_coords=False,
    )
    valid = (footprint > 0) & np.isfinite(out)
    return np.where(valid, out, np.nan).astype(np.float32), valid


def pixel_map(
    wcs: WCS, target_wcs: WCS, shape: tuple[int, int], *, step: int = 16
) -> tuple[np.ndarray, np.ndarray]:
    """Source-image pixel coordinates of every target pixel.

    The exact WCS transformation is evaluated on a grid every ``step`` pixels and
    interpolated bilinearly in between; sky projections vary slowly, so the result
    agrees with a per-pixel evaluation to well under a thousandth of a pixel while
    costing a few hundredths of the time.

    Parameters
    ----------
    wcs : WCS
        WCS of the image to be resampled.
    target_wcs : WCS
        WCS of the output grid.
    shape : tuple of int
        (ny, nx) of the output grid.
    step : int
        Spacing of the exactly transformed grid (pixels).

    Returns
    -------
    tuple of 2D ndarray of float32
        (y, x) coordinates in the source image of each output pixel.
    """
    ny, nx = shape
    # a uniform grid reaching one step beyond the image, so no pixel sits near its edge
    gy = np.arange(-step, ny + 2 * step, step, dtype=float)
    gx = np.arange(-step, nx + 2 * step, step, dtype=float)
    xx, yy = np.meshgrid(gx, gy)
    sx, sy = wcs.world_to_pixel(target_wcs.pixel_to_world(xx, yy))
    # bilinear interpolation of the map: exact for affine maps; the curvature of sky
    # projections over one step leaves errors far below a thousandth of a pixel. It is
    # separable: rows then columns, two matrix products with 2-tap weight matrices
    wy, wx = _linear_weights(ny, len(gy), step), _linear_weights(nx, len(gx), step)
    out = [(wy @ np.asarray(grid, dtype=np.float64) @ wx.T).astype(np.float32) for grid in (sy, sx)]
    return out[0], out[1]


def _linear_weights(n: int, n_grid: int, step: int) -> np.ndarray:
    """(n, n_grid) matrix interpolating linearly, at pixels 0..n-1, a grid starting at -step."""
    position = (np.arange(n, dtype=float) + step) / step
    lower = np.floor(position).astype(int)
    frac = position - lower
    weights = np.zeros((n, n_grid))
    weights[np.arange(n), lower] = 1.0 - frac
    weights[np.arange(n), np.minimum(lower + 1, n_grid - 1)] += frac
    return weights


def resample(
    data: np.ndarray,
    wcs: WCS,
    target_wcs: WCS,
    shape: tuple[int, int],
    *,
    order: int = 3,
    coords: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Bicubic-spline resampling of an image onto another grid (fast path of reprojection).

    Equivalent to :func:`reproject_to` with ``order="bicubic"`` but uses
    :func:`pixel_map` instead of transforming every pixel through the WCS.

    Parameters
    ----------
    data : 2D ndarray
        Image to resample; must be finite (fill masked pixels first).
    wcs, target_wcs : WCS
        WCSs of the input and of the output grid.
    shape : tuple of int
        (ny, nx) of the output grid.
    order : int
        Spline order (3: bicubic, 1: bilinear for smooth maps such as noise).
    coords : tuple of 2D ndarray, optional
        The output of :func:`pixel_map` for these WCSs, when already computed.

    Returns
    -------
    resampled : 2D ndarray of float32
        NaN where the input does not cover the output.
    footprint : 2D ndarray of bool
        Where the output has valid data.
    """
    sy, sx = pixel_map(wcs, target_wcs, shape) if coords is None else coords
    out = ndimage.map_coordinates(
        np.asarray(data, dtype=np.float32),
        [sy, sx],
        order=order,
        mode="constant",
        cval=np.nan,
        prefilter=True,
    )
    valid = (sy >= -0.5) & (sx >= -0.5) & (sy <= data.shape[0] - 0.5) & (sx <= data.shape[1] - 0.5)
    valid &= np.isfinite(out)
    return np.where(valid, out, np.nan).astype(np.float32), valid
