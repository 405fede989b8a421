"""Each bright star's own shift between the epochs, fitted in the score and removed.

One registration maps the science grid onto the reference for the whole field, but
stars do not all sit where it puts them: differential chromatic refraction moves each
by an amount that depends on its colour and the airmasses, proper motions move some,
and the registration itself is uncertain. A bright star shifted by δ leaves a dipole
``-δ·∇S_N`` in ZOGY's score S. ZOGY's astrometric-noise term (paper eq. 30-31) covers
it with one σ for the whole field, the scatter of the matched stars; near bright stars
that term is large, and a transient there loses its significance with the dipole.

A bright star's own δ is measurable: its gradient is large, so S around it fixes
δ to a small fraction of that scatter. :func:`correct_star_shifts` fits δ per star from
S within one FWHM, removes the fitted dipole from S, and replaces the field's σ by the
fit's own error in the astrometric variance around that star. A transient on the star
itself is even about the star's centre and the dipole odd, so the fit leaves it in S.
"""

from __future__ import annotations

import numpy as np
from astropy.table import Table
from scipy.spatial import cKDTree

__all__ = ["correct_star_shifts"]

_COLUMNS = ("x", "y", "dx", "dy", "dx_err", "dy_err")


def correct_star_shifts(
    maps: dict[str, np.ndarray],
    sources: Table,
    sigma: tuple[float, float],
    fwhm: float,
    invalid: np.ndarray,
    *,
    max_shift: float = 1.0,
    min_error: float = 0.05,
    gain: float = 2.0,
    clip: float = 4.0,
) -> Table:
    """Fit each bright source's shift from the score's dipole and remove it (in place).

    Parameters
    ----------
    maps : dict
        ``S``, ``V`` (its variance, with the astrometric term of ``sigma``) and ``S_N``
        (the science part of S), float32 maps on the reference grid; ``S`` and ``V``
        are corrected in place around every fitted source.
    sources : Table
        Point-like reference sources with x, y (0-based reference pixels).
    sigma : tuple of float
        The field's astrometric σ (x, y) in pixels that ``V`` holds.
    fwhm : float
        PSF FWHM in pixels: S is fitted within one FWHM of each source and corrected
        within three, in the part of that disc nearer to it than to any other source;
        the variance takes the fit's σ within 1.5 FWHM, blending into the field's by 2.5.
    invalid : 2D ndarray of bool
        Pixels not to fit; a source with one in its fitting disc is left alone.
    max_shift : float
        Largest shift (pixels) taken as a shift: a larger dipole is something else
        (a blend, a moving object) and keeps the field's σ.
    min_error : float
        Smallest σ (pixels) a star's own shift is given in the variance, whatever its
        fit says: the two PSF models' centroids, and the asymmetries that read as a
        shift, agree to no better than a few hundredths of a pixel. Never more than the
        field's σ.
    gain : float
        A shift is removed, axis by axis, only where its fit's σ is at least this many
        times smaller than the field's.
    clip : float
        Pixels whose residual exceeds this many σ are left out of a second fit (a
        transient beside the star).

    Returns
    -------
    Table
        One row per corrected source: x, y, the shift dx, dy (science minus reference,
        pixels; 0 along an axis left alone) and the fit's errors dx_err, dy_err.
    """
    sx, sy = float(sigma[0]), float(sigma[1])
    rows: list[tuple[float, ...]] = []
    if len(sources) == 0 or max(sx, sy) <= 0:
        return _table(rows)
    xy = np.column_stack([sources["x"], sources["y"]]).astype(float)
    ny, nx = invalid.shape
    fit_radius, reach = max(fwhm, 1.5), 3.0 * fwhm
    half = int(np.ceil(reach)) + 1
    candidates = _bright(maps, xy, sx, sy, gain, fwhm, invalid.shape)
    tree = cKDTree(xy)
    for i in candidates:
        x, y = xy[i]
        ix, iy = int(np.rint(x)), int(np.rint(y))
        y0, y1, x0, x1 = (
            max(0, iy - half),
            min(ny, iy + half + 1),
            max(0, ix - half),
            min(nx, ix + half + 1),
        )
        window = (slice(y0, y1), slice(x0, x1))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        radius = np.hypot(xx - x, yy - y)
        disc = radius <= fit_radius
        if invalid[window][disc].any() or disc.sum() < 9:
            continue
        gy, gx = np.gradient(maps["S_N"][window].astype(np.float64))
        score = maps["S"][window].astype(np.float64)
        # V without the field's astrometric term: background and source noise
        noise = maps["V"][window] - sx**2 * gx**2 - sy**2 * gy**2
        noise = np.maximum(noise, 1e-3 * maps["V"][window])
        fitted = _fit_dipole(score, gx, gy, noise, disc, clip)
        if fitted is None:
            continue
        coef, error = fitted
        if np.hypot(*coef) > max_shift:
            continue
        # axis by axis: where the fit does not beat the field's σ by ``gain``, that
        # component stays in S and the variance keeps the field's σ
        field_sigma = np.array([sx, sy])
        useful = error * gain <= field_sigma
        if not useful.any():
            continue
        coef = np.where(useful, coef, 0.0)
        star_sigma = np.where(useful, np.clip(error, min_error, field_sigma), field_sigma)
        _, owner = tree.query(np.column_stack([xx.ravel(), yy.ravel()]))
        region = (radius <= reach) & (owner.reshape(radius.shape) == i)
        model = coef[0] * gx + coef[1] * gy
        # the fit's σ holds over the star's core; from 1.5 to 2.5 FWHM it blends back into
        # the field's, which also covers what the wings' PSF mismatch leaves out there
        blend = np.clip((radius - 1.5 * fwhm) / fwhm, 0.0, 1.0)
        blend = 0.5 - 0.5 * np.cos(np.pi * blend)
        var_x = star_sigma[0] ** 2 + (sx**2 - star_sigma[0] ** 2) * blend
        var_y = star_sigma[1] ** 2 + (sy**2 - star_sigma[1] ** 2) * blend
        corrected = noise + var_x * gx**2 + var_y * gy**2
        maps["S"][window][region] = (score - model)[region]
        maps["V"][window][region] = corrected[region]
        # S ≈ S_true - δ·∇S_N: the fitted coefficients are -δ
        rows.append((x, y, -coef[0], -coef[1], error[0], error[1]))
    return _table(rows)


def _table(rows: list[tuple[float, ...]]) -> Table:
    values = np.asarray(rows, dtype=float).reshape(len(rows), len(_COLUMNS))
    return Table(list(values.T), names=_COLUMNS)


def _bright(
    maps: dict[str, np.ndarray],
    xy: np.ndarray,
    sx: float,
    sy: float,
    gain: float,
    fwhm: float,
    shape: tuple[int, int],
) -> np.ndarray:
    """Sources bright enough that their own shift could beat the field's σ.

    A star at matched-filter S/N ν, whose score falls off over about FWHM/2.35 pixels,
    fixes its shift to about 0.6·FWHM/ν pixels: only sources with ν above that bound
    for ``gain``·σ are worth a fit (brightest first).
    """
    ix = np.clip(np.rint(xy[:, 0]).astype(int), 0, shape[1] - 1)
    iy = np.clip(np.rint(xy[:, 1]).astype(int), 0, shape[0] - 1)
    snr = maps["S_N"][iy, ix] / np.sqrt(np.maximum(maps["V"][iy, ix], 1e-12))
    needed = 0.6 * fwhm * gain / max(sx, sy, 1e-3)
    keep = np.flatnonzero(snr > 0.5 * needed)
    return keep[np.argsort(-snr[keep])]


def _fit_dipole(
    score: np.ndarray,
    gx: np.ndarray,
    gy: np.ndarray,
    noise: np.ndarray,
    disc: np.ndarray,
    clip: float,
) -> tuple[np.ndarray, np.ndarray] | None:
    """Weighted least squares of score = a·gx + b·gy on ``disc``, refitted after clipping.

    Returns the coefficients (a, b) and their standard errors, or None when the
    gradients cannot separate the two (a singular fit).
    """
    use = disc.copy()
    for _ in range(2):
        w = 1.0 / noise[use]
        a = np.column_stack([gx[use], gy[use]])
        normal = a.T @ (a * w[:, None])
        if np.linalg.cond(normal) > 1e8:
            return None
        cov = np.linalg.inv(normal)
        coef = cov @ (a.T @ (w * score[use]))
        resid = (score - coef[0] * gx - coef[1] * gy) / np.sqrt(noise)
        keep = disc & (np.abs(resid) < clip)
        if keep.sum() < 9 or np.array_equal(keep, use):
            break
        use = keep
    return coef, np.sqrt(np.diag(cov))
