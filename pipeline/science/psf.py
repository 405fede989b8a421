"""Empirical PSFs from an image's own stars, varying smoothly across the field."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from astropy.table import Table
from scipy import ndimage, optimize

from pipeline.errors import ScienceError

__all__ = [
    "PSFModel",
    "build_psf",
    "choose_degree",
    "measure_fwhm",
    "psf_stamp_size",
    "stamp_size_for",
]


@dataclass
class PSFModel:
    """A PSF whose every pixel is a polynomial in the position on the image.

    Attributes
    ----------
    basis : 3D ndarray of float32, shape (n_terms, size, size)
        Stamps multiplying the terms 1, u, v, u², uv, v² (as many as the degree needs),
        where u, v run from -1 to 1 across the image.
    shape : tuple of int
        (ny, nx) of the image the model describes.
    n_stars : int
        Stars used.
    fwhm : float
        FWHM at the image centre in pixels.
    model_error : float
        Fractional error of the model beyond noise (see :func:`build_psf`).
    """

    basis: np.ndarray
    shape: tuple[int, int]
    n_stars: int
    fwhm: float
    model_error: float = 0.0

    @property
    def size(self) -> int:
        """Stamp size in pixels (odd)."""
        return int(self.basis.shape[-1])

    @property
    def degree(self) -> int:
        """Polynomial degree of the spatial variation (0, 1 or 2)."""
        return {1: 0, 3: 1, 6: 2}[int(self.basis.shape[0])]

    def at(self, x: float, y: float) -> np.ndarray:
        """PSF stamp at pixel (x, y), normalised to sum 1."""
        terms = _terms(np.atleast_1d(float(x)), np.atleast_1d(float(y)), self.shape, self.degree)
        stamp = np.tensordot(terms[0], self.basis, axes=1)
        return (stamp / stamp.sum()).astype(np.float32)

    @property
    def global_stamp(self) -> np.ndarray:
        """PSF at the image centre."""
        return self.at((self.shape[1] - 1) / 2, (self.shape[0] - 1) / 2)


def _terms(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], degree: int) -> np.ndarray:
    """Polynomial terms (n, n_terms) of positions scaled to [-1, 1]."""
    u = 2.0 * x / max(shape[1] - 1, 1) - 1.0
    v = 2.0 * y / max(shape[0] - 1, 1) - 1.0
    columns = [np.ones_like(u)]
    if degree >= 1:
        columns += [u, v]
    if degree >= 2:
        columns += [u * u, u * v, v * v]
    return np.column_stack(columns)


def psf_stamp_size(fwhm: float, *, minimum: int = 15, maximum: int = 81) -> int:
    """Odd stamp size that holds a PSF's wings: about ten FWHM."""
    size = int(np.ceil(10.0 * fwhm)) | 1
    return int(np.clip(size, minimum | 1, maximum | 1))


def measure_fwhm(psf: np.ndarray) -> float:
    """FWHM (pixels) of a PSF stamp from the area above half maximum: 2·sqrt(A/π).

    The stamp is interpolated onto a grid 8 times finer (cubic spline, sample points
    at the original pixel centres' subdivisions) so the area counts fractional pixels.
    """
    peak = float(psf.max())
    if peak <= 0:
        raise ScienceError("PSF stamp has no positive peak")
    factor = 8
    ny, nx = psf.shape
    fy = (np.arange(ny * factor) + 0.5) / factor - 0.5
    fx = (np.arange(nx * factor) + 0.5) / factor - 0.5
    grid = np.meshgrid(fy, fx, indexing="ij")
    fine = ndimage.map_coordinates(psf.astype(np.float64), grid, order=3, mode="nearest")
    area = np.count_nonzero(fine >= 0.5 * fine.max()) / factor**2
    return float(2.0 * np.sqrt(area / np.pi))


def stamp_size_for(stars: Table, shape: tuple[int, int]) -> int:
    """:func:`build_psf`'s default stamp size for these stars in an image of ``shape``."""
    # r50 of a Moffat profile is ~0.6 FWHM, of a Gaussian 0.5 FWHM
    fwhm_guess = 1.8 * float(np.median(stars["r50"]))
    return psf_stamp_size(fwhm_guess, maximum=max(15, min(shape) // 4) | 1)


def build_psf(
    data: np.ndarray,
    stars: Table,
    *,
    size: int | None = None,
    degree: int | None = None,
    mask: np.ndarray | None = None,
) -> PSFModel:
    """Fit a spatially varying PSF to recentred, normalised star stamps.

    Every stamp pixel is fitted as a polynomial of the star position (degree 0, 1 or 2),
    with outlying star pixels (neighbours, cosmic rays) clipped and refitted.

    Parameters
    ----------
    data : 2D ndarray
        Background-subtracted image (ADU).
    stars : Table
        Point sources with x, y and r50 (from :func:`pipeline.science.sources.select_stars`).
    size : int, optional
        Stamp size (odd); default from the stars' half-light radius.
    degree : int, optional
        Degree of the spatial variation; by default the one that predicts each star's
        core best from the other stars (:func:`choose_degree`).
    mask : 2D ndarray of bool, optional
        Bad pixels: stars with one in the core are skipped, elsewhere the pixel is ignored.

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
        size = stamp_size_for(stars, data.shape)
    # r50 of a Moffat profile is ~0.6 FWHM (see stamp_size_for)
    fwhm_guess = 1.8 * float(np.median(stars["r50"])) if "r50" in stars.colnames else size / 10
    stamps, xs, ys, fluxes = _star_stamps(data, stars, size, mask, fwhm_guess)
    if len(stamps) < 2:
        raise ScienceError(f"only {len(stamps)} PSF stars have clean {size}×{size} stamps")
    # a normalised stamp's noise in the background-limited wings goes as 1/flux, so
    # rows are scaled by flux (inverse-variance weights ∝ flux²), within limits so a
    # few bright stars do not stand alone
    weights = np.clip(fluxes / np.median(fluxes), 0.2, 10.0)
    if degree is None:
        degree = choose_degree(stamps, xs, ys, data.shape, weights)
    terms = _terms(xs, ys, data.shape, degree)
    basis = _fit_basis(stamps, terms, weights)
    fwhm = measure_fwhm(basis[0])
    basis = _smooth_wings(basis, fwhm)
    model = PSFModel(basis.astype(np.float32), data.shape, len(stamps), 0.0)
    model.fwhm = measure_fwhm(model.global_stamp)
    model.model_error = _model_error(stamps, terms @ basis.reshape(len(basis), -1))
    return model


def _smooth_wings(basis: np.ndarray, fwhm: float) -> np.ndarray:
    """Replace the noisy outer stamp by its azimuthal average.

    Far from the centre a star stack is noise-dominated; convolved with a bright star,
    that noise would print speckles around it in the difference. Beyond ``2.5·FWHM``
    the constant term blends (cosine taper up to ``4·FWHM``) into its radial profile,
    averaged over whole annuli, and the spatially varying terms fade to zero.
    """
    size = basis.shape[-1]
    centre = (size - 1) / 2
    yy, xx = np.indices((size, size))
    radius = np.hypot(yy - centre, xx - centre)
    # annuli follow the PSF's own ellipticity, so the averaged wings keep the shape of
    # the real ones
    ellip = _elliptical_radius(basis[0], 2.0 * fwhm)
    if ellip is None:
        ellip = radius
    inner, outer = 2.0 * fwhm, 3.5 * fwhm
    weight = np.clip((outer - ellip) / max(outer - inner, 1e-6), 0.0, 1.0)
    weight = 0.5 - 0.5 * np.cos(np.pi * weight)
    rings = np.rint(ellip).astype(int)
    profile = _wing_profile(basis[0], rings, fwhm)
    smooth = basis.copy()
    smooth[0] = weight * basis[0] + (1.0 - weight) * profile[rings]
    smooth[1:] = weight * basis[1:]
    # beyond the inscribed circle only the stamp's corners remain, too few pixels for a
    # profile: fade the wings to zero there (they hold a negligible share of the flux)
    edge = np.clip((centre - radius) / max(0.15 * centre, 1.0), 0.0, 1.0)
    return smooth * edge


def _elliptical_radius(stamp: np.ndarray, core_radius: float) -> np.ndarray | None:
    """Each pixel's radius along ellipses of the stamp's core, scaled to keep areas.

    The ellipses are the second moments of the light within ``core_radius`` of the
    centre; None for a core with no light.
    """
    centre = (stamp.shape[0] - 1) / 2
    yy, xx = np.indices(stamp.shape)
    dy, dx = yy - centre, xx - centre
    core = np.clip(stamp, 0, None) * (np.hypot(dy, dx) < core_radius)
    if not core.sum() > 0:
        return None
    moments = np.array(
        [
            [np.sum(core * dx * dx), np.sum(core * dx * dy)],
            [np.sum(core * dx * dy), np.sum(core * dy * dy)],
        ]
    )
    det = np.linalg.det(moments)
    if not det > 0:
        return None
    inv = np.linalg.inv(moments) * np.sqrt(det)  # unit-determinant metric
    squared = inv[0, 0] * dx * dx + 2 * inv[0, 1] * dx * dy + inv[1, 1] * dy * dy
    return np.sqrt(np.clip(squared, 0.0, None))


def _wing_profile(stamp: np.ndarray, rings: np.ndarray, fwhm: float) -> np.ndarray:
    """Mean of ``stamp`` per ring, replaced by a fitted Moffat profile where it is noisy.

    Faint PSF stars leave the outer rings' means uncertain, even negative; those values
    would print a ring around every bright star in the difference. A Moffat profile is
    fitted to every ring beyond 0.75 FWHM, each weighted by its standard error (the core
    is left out: pixel integration flattens it), and from the first ring beyond 1.5 FWHM
    measured to worse than 10 % the profile follows the fit (β bounded to 1.5–6, the
    range of seeing-limited PSFs).
    """
    flat, values = rings.ravel(), stamp.ravel().astype(np.float64)
    count = np.maximum(np.bincount(flat), 1)
    mean = np.bincount(flat, weights=values) / count
    spread = np.bincount(flat, weights=values**2) / count - mean**2
    error = np.sqrt(np.clip(spread, 0.0, None) / count) + 1e-12
    radius = np.arange(len(mean), dtype=np.float64)
    noisy = np.flatnonzero((radius > 1.5 * fwhm) & ~(mean > 10.0 * error))
    if len(noisy) == 0:
        return mean
    first = int(noisy[0])
    # rings cut by the stamp's edge hold only corners: leave them out of the fit
    fit = (radius >= 0.75 * fwhm) & (radius <= (stamp.shape[0] - 1) / 2)
    if fit.sum() < 4 or mean[0] <= 0:
        return np.clip(mean, 0.0, None)

    def moffat(r: np.ndarray, peak: float, alpha: float, beta: float) -> np.ndarray:
        return peak * (1.0 + (r / alpha) ** 2) ** -beta

    try:
        params, _ = optimize.curve_fit(
            moffat,
            radius[fit],
            mean[fit],
            p0=(mean[0], max(fwhm, 1.0), 3.0),
            sigma=error[fit],
            bounds=([0.0, 0.1, 1.5], [np.inf, 10.0 * fwhm, 6.0]),
        )
    except (RuntimeError, ValueError):
        return np.clip(mean, 0.0, None)
    out = mean.copy()
    tail = radius >= first
    out[tail] = moffat(radius[tail], *params)
    return out


def _model_error(stamps: np.ndarray, model: np.ndarray) -> float:
    """Fractional error of the PSF model beyond noise, as a matched filter sees it.

    For each star, the residual energy in the core (model above a tenth of its peak)
    minus what noise alone would put there (estimated from the stamp's outskirts),
    relative to the model's energy; the median over stars, square-rooted.
    """
    values = stamps.reshape(len(stamps), -1)
    errors = []
    for stamp, fit in zip(values, model, strict=True):
        good = np.isfinite(stamp)
        core = good & (fit > 0.1 * fit.max())
        outer = good & (fit < 0.01 * fit.max())
        if core.sum() < 5 or outer.sum() < 20:
            continue
        resid = stamp - fit
        noise = np.median(resid[outer] ** 2) / 0.455  # χ²(1) median, robust to neighbours
        excess = np.sum(resid[core] ** 2) - noise * core.sum()
        errors.append(max(excess, 0.0) / np.sum(fit[core] ** 2))
    return float(np.sqrt(np.median(errors))) if errors else 0.0


def choose_degree(
    stamps: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    shape: tuple[int, int],
    weights: np.ndarray,
    *,
    max_degree: int = 2,
) -> int:
    """Spatial degree whose model predicts each star's core best from the other stars.

    For each degree the stars can constrain (at least twice as many stars as terms),
    the core of every stamp (within a sixth of the stamp's width, about 1.5 FWHM) is
    predicted by the weighted fit to the others (the exact leave-one-out residual of
    linear least squares, ``r / (1 - h)``); the degree with the smallest weighted sum
    of squares wins. A PSF that varies across the field earns its spatial terms; a
    handful of stars, or a PSF that does not vary, keeps the constant model, whose
    extrapolation to the field's corners cannot go wrong.

    Parameters
    ----------
    stamps : 3D ndarray
        Normalised star stamps (n, size, size), NaN where missing.
    xs, ys : ndarray
        Star positions (pixels).
    shape : tuple of int
        Image shape (for scaling positions).
    weights : ndarray
        Per-star weights (as in the fit).
    max_degree : int
        Highest degree tried.

    Returns
    -------
    int
    """
    n, size, _ = stamps.shape
    centre = (size - 1) / 2
    yy, xx = np.indices((size, size))
    core = np.hypot(yy - centre, xx - centre) <= max(1.5, size / 6.0)
    values = stamps[:, core]
    present = np.isfinite(values)
    values = np.where(present, values, 0.0)
    w2 = (weights[:, None] * present * ~_far_from_median(values, present)) ** 2
    best, best_score = 0, np.inf
    for degree in range(max_degree + 1):
        terms = _terms(xs, ys, shape, degree)
        if n < 2 * terms.shape[1]:
            break
        inverse = np.linalg.inv(_normal_matrices(terms, w2))
        coef = np.einsum("jkl,nl,nj->jk", inverse, terms, w2 * values)
        resid = values - np.einsum("nk,jk->nj", terms, coef)
        leverage = w2 * np.einsum("nk,jkl,nl->nj", terms, inverse, terms)
        loo = resid / np.clip(1.0 - leverage, 1e-3, None)
        score = float(np.sum(w2 * loo**2))
        if score < best_score:
            best, best_score = degree, score
    return best


def _fit_basis(stamps: np.ndarray, terms: np.ndarray, star_weights: np.ndarray) -> np.ndarray:
    """Weighted least-squares polynomial per pixel, with clipping of outlying pixels.

    All pixels are solved at once through their (terms × terms) normal equations.
    """
    n, sy, sx = stamps.shape
    values = stamps.reshape(n, -1)
    present = np.isfinite(values)
    values = np.where(present, values, 0.0)
    weights = star_weights[:, None] * present
    if terms.shape[1] > 1:
        # start from the pixels near the median of the stars: a least-squares fit with
        # spatial terms that begins with a bright neighbour in one stamp bends those
        # terms towards it, and leaves residuals too spread for the clipping to find it
        weights = weights * ~_far_from_median(values, present)
    for _ in range(3):
        w2 = weights**2
        normal = _normal_matrices(terms, w2)
        rhs = np.einsum("nk,nj->jk", terms, w2 * values)
        coef = np.linalg.solve(normal, rhs[..., None])[..., 0].T
        resid = values - terms @ coef
        seen = present.any(axis=0)
        spread = np.full(values.shape[1], np.inf)
        absolute = np.where(present, np.abs(resid), np.nan)[:, seen]
        spread[seen] = 1.4826 * _nanmedian_columns(absolute) + 1e-9
        weights = star_weights[:, None] * present * (np.abs(resid) < 3.0 * spread)
    basis = coef.reshape(terms.shape[1], sy, sx)
    return _recentre(basis)


def _normal_matrices(terms: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """Per-pixel normal matrices (pixels, terms, terms) of a weighted polynomial fit.

    ``terms`` is (stars, terms), ``w2`` the squared weights (stars, pixels); a tiny ridge
    keeps pixels that no star covers solvable.
    """
    return np.einsum("nk,nj,nl->jkl", terms, w2, terms) + 1e-12 * np.eye(terms.shape[1])


def _far_from_median(values: np.ndarray, present: np.ndarray, nsigma: float = 5.0) -> np.ndarray:
    """Star pixels more than ``nsigma`` robust deviations from the stars' median."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # pixels no star covers
        data = np.where(present, values, np.nan)
        median = _nanmedian_columns(data)
        spread = 1.4826 * _nanmedian_columns(np.abs(data - median))
    return np.abs(values - median) > nsigma * spread + 1e-9


def _recentre(basis: np.ndarray) -> np.ndarray:
    """Shift every basis stamp so the constant term's centroid sits on the centre pixel."""
    mean = basis[0]
    centre = (np.asarray(mean.shape) - 1) / 2
    core = np.clip(mean, 0, None)
    yy, xx = np.indices(mean.shape)
    weight = core * np.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / (2 * 9.0))
    cy, cx = (weight * yy).sum() / weight.sum(), (weight * xx).sum() / weight.sum()
    shift = (centre[0] - cy, centre[1] - cx)
    return np.stack([ndimage.shift(b, shift, order=3, mode="constant") for b in basis])


def _star_stamps(
    data: np.ndarray,
    stars: Table,
    size: int,
    mask: np.ndarray | None,
    fwhm: float | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Recentre each star on its stamp centre and normalise it by its central flux.

    Stamps may reach past the image edge (those pixels count as missing), so stars
    near the border still help; each is normalised by the flux in a central box that
    must be complete, and the model is renormalised to unit sum at the end. With
    ``fwhm``, faint neighbours in each stamp's wings are left out (:func:`_neighbours`).
    """
    half = size // 2
    pad = 3
    big = half + pad
    box = min(half, max(3, (3 * size) // 20))  # about 1.5 FWHM
    padded = np.pad(np.asarray(data, dtype=np.float64), big, constant_values=np.nan)
    bad_all = ~np.isfinite(padded)
    if mask is not None:
        bad_all[big:-big, big:-big] |= mask
    stamps, xs, ys, fluxes = [], [], [], []
    for x, y in zip(np.asarray(stars["x"]), np.asarray(stars["y"]), strict=True):
        ix, iy = int(np.rint(x)) + big, int(np.rint(y)) + big
        window = (slice(iy - big, iy + big + 1), slice(ix - big, ix + big + 1))
        cut, bad = padded[window], bad_all[window]
        if bad[big - box : big + box + 1, big - box : big + box + 1].any():
            continue  # the centre must be complete; missing wing pixels are skipped
        shift = (iy - big - y, ix - big - x)
        shifted = ndimage.shift(np.where(bad, 0.0, cut), shift, order=3, mode="nearest")
        lost = ndimage.shift(bad.astype(float), shift, order=1) > 0.01
        stamp = np.where(lost, np.nan, shifted)[pad:-pad, pad:-pad]
        total = float(np.sum(stamp[half - box : half + box + 1, half - box : half + box + 1]))
        if not total > 0:
            continue
        stamps.append(stamp / total)
        xs.append(x)
        ys.append(y)
        fluxes.append(total)
    if fwhm is not None and stamps:
        # the stars at or above the median flux carry the fit (its weights go as flux²):
        # a neighbour in a fainter one's stamp weighs little and the clipping across
        # stars takes it out. The central box normalises a stamp: it stays whole
        for i in np.flatnonzero(np.asarray(fluxes) >= np.median(fluxes)):
            drop = _neighbours(stamps[i], fwhm)
            drop[half - box : half + box + 1, half - box : half + box + 1] = False
            stamps[i] = np.where(drop, np.nan, stamps[i])
    return np.asarray(stamps), np.asarray(xs), np.asarray(ys), np.asarray(fluxes)


def _neighbours(
    stamp: np.ndarray, fwhm: float, *, nsigma: float = 7.0, relative: float = 0.5
) -> np.ndarray:
    """Pixels of faint sources in a star's wings: what the star's own profile does not explain.

    The brightest PSF stars weigh most in the fit, so a faint neighbour in the wings
    of one of them (too close or too faint for the source extraction to split it from
    the star: a transient beside it, above all) becomes a bump in the PSF, and the
    difference image then subtracts that neighbour from itself. Here the star's own
    profile is its median along ellipses (the core's second moments, so an elliptical
    PSF leaves no residual lobes); the residual, smoothed by a Gaussian of the FWHM
    (a matched filter for a point source), is searched beyond 1.5 FWHM for peaks above
    ``nsigma`` times its noise, measured on the stamp's outskirts, and above
    ``relative`` times the smoothed profile there. The pixels within 1.5 FWHM of those
    (most of a point source's light) are returned.
    """
    centre = (stamp.shape[0] - 1) / 2
    yy, xx = np.indices(stamp.shape)
    radius = np.hypot(yy - centre, xx - centre)
    finite = np.isfinite(stamp)
    values = np.where(finite, stamp, 0.0)
    ellip = _elliptical_radius(values, 1.5 * fwhm)
    if ellip is None:
        return np.zeros(stamp.shape, dtype=bool)
    profile = _ring_medians(values[finite], np.rint(ellip[finite]).astype(int))
    # interpolated between rings: a ring's median is its centre's, and within one ring
    # the profile of a bright core changes by tens of per cent
    model = np.interp(ellip, np.arange(len(profile)), profile)
    residual = np.where(finite, values - model, 0.0)
    outskirts = finite & (radius > 3.0 * fwhm)
    if outskirts.sum() < 50:
        outskirts = finite & (radius > 1.5 * fwhm)
    if outskirts.sum() < 20:
        return np.zeros(stamp.shape, dtype=bool)
    pixel_noise = 1.4826 * float(np.median(np.abs(residual[outskirts])))
    sigma = fwhm / 2.3548
    weight = ndimage.gaussian_filter(finite.astype(float), sigma, mode="constant")
    smooth = ndimage.gaussian_filter(residual, sigma, mode="constant") / np.maximum(weight, 1e-3)
    noise = pixel_noise / (2.0 * np.sqrt(np.pi) * sigma)  # white noise through the filter
    # a PSF's own departures from its elliptical profile (coma, trefoil, wings of
    # another shape) are a fraction of it; a neighbour in the wings outshines them
    level = ndimage.gaussian_filter(np.where(finite, model, 0.0), sigma, mode="constant")
    level /= np.maximum(weight, 1e-3)
    peaks = (smooth > np.maximum(nsigma * noise, relative * level)) & (radius > 1.5 * fwhm)
    peaks &= weight > 0.5
    if not peaks.any():
        return np.zeros(stamp.shape, dtype=bool)
    reach = int(np.ceil(1.5 * fwhm))
    disc = np.hypot(*np.mgrid[-reach : reach + 1, -reach : reach + 1]) <= 1.5 * fwhm
    return ndimage.binary_dilation(peaks, structure=disc)


def _ring_medians(values: np.ndarray, rings: np.ndarray) -> np.ndarray:
    """Median of ``values`` per ring index 0..max(rings) (0 for an empty ring), sorted once."""
    order = np.lexsort((values, rings))
    ordered, keys = values[order], rings[order]
    index = np.arange(int(rings.max()) + 1)
    start = np.searchsorted(keys, index, side="left")
    count = np.searchsorted(keys, index, side="right") - start
    low = np.clip(start + (count - 1) // 2, 0, len(ordered) - 1)
    high = np.clip(start + count // 2, 0, len(ordered) - 1)
    return np.where(count > 0, 0.5 * (ordered[low] + ordered[high]), 0.0)


def _nanmedian_columns(values: np.ndarray) -> np.ndarray:
    """``np.nanmedian(values, axis=0)`` by one sort.

    numpy's own takes a slow per-column path as soon as a column holds a NaN (masked
    neighbours, stamps past the image's edge).
    """
    present = np.isfinite(values)
    ordered = np.sort(np.where(present, values, np.inf), axis=0)
    count = present.sum(axis=0)
    low = np.clip((count - 1) // 2, 0, None)[None]
    high = (count // 2)[None]
    low_value = np.take_along_axis(ordered, low, axis=0)[0]
    high_value = np.take_along_axis(ordered, np.minimum(high, len(values) - 1), axis=0)[0]
    with np.errstate(invalid="ignore"):
        return np.where(count > 0, 0.5 * (low_value + high_value), np.nan)
