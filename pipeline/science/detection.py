"""Candidates: significant peaks of S_corr, both signs, measured and flagged."""

from __future__ import annotations

import warnings
from enum import IntFlag

import numpy as np
from astropy.table import Table
from scipy import ndimage
from scipy.spatial import cKDTree

from pipeline.science.differencing import Difference
from pipeline.science.masks import principal_axes
from pipeline.science.preprocessing import FATAL, REPAIRED, MaskBit, PreprocessedPair
from pipeline.science.psf import measure_fwhm

__all__ = ["CandidateFlag", "NoDetectionsWarning", "detect_candidates", "find_peaks"]

# FWHM of a Gaussian over its σ: 2 sqrt(2 ln 2)
_FWHM_PER_SIGMA = 2.3548
# the widest a peak is measured, in PSF widths (a larger second moment is noise or extended)
_WIDEST = 5.0
# the smallest second moment (pixels²) a peak is measured with
_NARROWEST = 1e-6


#: Largest factor by which a matched-filter summit between pixels exceeds the
#: nearest pixel for the PSFs met in practice (8 % at half a pixel in both axes for a
#: 3-pixel FWHM): peaks are sought down to threshold / SUMMIT_GAIN.
SUMMIT_GAIN = 1.1


class NoDetectionsWarning(UserWarning):
    """Nothing in the difference image passed the threshold."""


class CandidateFlag(IntFlag):
    """Why a candidate deserves caution (bits of the ``flags`` column)."""

    EDGE = 1
    MASKED = 2
    NEAR_SATURATED = 4
    NEAR_REFERENCE_SOURCE = 8
    DIPOLE = 16
    REPAIRED = 32


def find_peaks(
    score: np.ndarray, threshold: float, *, box: int = 5, invalid: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Local extrema of ``|score|`` at or above ``threshold`` in a ``box``×``box`` window.

    Returns
    -------
    tuple of ndarray
        Row and column indices of the peaks, strongest first.
    """
    magnitude = np.abs(score)
    peaks = (magnitude >= threshold) & (magnitude == ndimage.maximum_filter(magnitude, size=box))
    if invalid is not None:
        peaks &= ~invalid
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-magnitude[ys, xs])
    return ys[order], xs[order]


def _subpixel(score: np.ndarray, y: int, x: int) -> tuple[float, float]:
    """Parabolic interpolation of the peak position along each axis."""
    ny, nx = score.shape

    def s(j: int, i: int) -> float:  # |score| of one pixel (not of the whole map per peak)
        return abs(score[j, i])

    def offset(a: float, b: float, c: float) -> float:
        den = a - 2 * b + c
        return 0.0 if den >= 0 else float(np.clip(0.5 * (a - c) / den, -0.5, 0.5))

    dx = offset(s(y, x - 1), s(y, x), s(y, x + 1)) if 0 < x < nx - 1 else 0.0
    dy = offset(s(y - 1, x), s(y, x), s(y + 1, x)) if 0 < y < ny - 1 else 0.0
    return y + dy, x + dx


def _peak_value(image: np.ndarray, y: int, x: int) -> float:
    """Value at the summit between the pixels, from the peak and its four neighbours.

    A matched-filter map sampled at the pixel nearest a source reads low by the
    filter's response to the sub-pixel offset (up to 4 % at half a pixel in both
    axes for a 4-pixel PSF, 8 % for a 3-pixel one). Near its summit the map is the
    autocorrelation of the PSF, close to a Gaussian: a parabola through the
    logarithms of the three values along each axis finds the summit's height.
    Where a neighbour has the other sign (noise, or a dipole's other half) the
    pixel's own value is kept.
    """
    ny, nx = image.shape
    centre = float(image[y, x])
    if not (0 < x < nx - 1 and 0 < y < ny - 1) or centre == 0:
        return centre
    sign = 1.0 if centre > 0 else -1.0
    values = sign * np.array(
        [image[y, x - 1], image[y, x + 1], image[y - 1, x], image[y + 1, x]], dtype=float
    )
    if np.any(values <= 0) or np.any(values > abs(centre)):
        return centre
    logs = np.log(values / abs(centre))  # <= 0: the centre is the highest
    gain = 0.0
    for a, c in ((logs[0], logs[1]), (logs[2], logs[3])):
        curvature = -(a + c)
        if curvature > 0:
            gain += (a - c) ** 2 / (8.0 * curvature)
    return centre * float(np.exp(min(gain, 0.5)))


def _shape(image: np.ndarray, y: int, x: int, fwhm: float, sign: int) -> tuple[float, float]:
    """FWHM (pixels) and elongation of a peak from Gaussian-weighted second moments.

    ``sign`` is the candidate's (+1 brightening, -1 fading: S_corr's at the peak), not
    that of ``image``'s one pixel there, which noise flips for a few per cent of faint
    sources (at S/N 7 under a 5 px PSF it holds about 1.8σ of the signal).

    Unweighted moments of the positive part of a box are biased by the noise: its
    positive half spreads light over the whole box, so a faint point source measures
    too wide (S/N 8 sources under a 2.8 px PSF: 2.1 times its FWHM, the median).
    Here the signed stamp (noise averages out) is weighted by a circular Gaussian of
    the PSF's width ``fwhm``, and the weight is divided out of the measured axes: a
    Gaussian source of variance s² weighted by w² measures v = s²w²/(s² + w²), so
    s² = v w²/(w² − v). Axes at or beyond the weight's own variance mean a source much
    wider than the PSF and are capped at ``_WIDEST`` times it.
    """
    ny, nx = image.shape
    w2 = (fwhm / _FWHM_PER_SIGMA) ** 2
    half = int(np.ceil(3.0 * np.sqrt(w2)))
    y0, y1 = max(0, y - half), min(ny, y + half + 1)
    x0, x1 = max(0, x - half), min(nx, x + half + 1)
    yy, xx = (a.ravel().astype(np.float64) for a in np.mgrid[y0 - y : y1 - y, x0 - x : x1 - x])
    light = image[y0:y1, x0:x1].ravel().astype(np.float64) * sign
    light *= np.exp(-(yy * yy + xx * xx) / (2.0 * w2))
    if light.sum() <= 0:
        return float("nan"), float("nan")
    (v_major,), (v_minor,) = principal_axes(light.reshape(1, -1), yy, xx)
    # the signed noise can leave a variance at or below zero: narrower than measurable
    v_major = max(float(v_major), _NARROWEST)
    v_minor = min(max(float(v_minor), _NARROWEST), v_major)
    widest = _WIDEST**2 * w2
    major, minor = (
        widest if v >= w2 * widest / (w2 + widest) else v * w2 / (w2 - v)
        for v in (v_major, v_minor)
    )
    width = _FWHM_PER_SIGMA * np.sqrt(np.sqrt(major * minor))
    return float(width), float(np.sqrt(v_major / v_minor))


def detect_candidates(
    diff: Difference,
    pair: PreprocessedPair,
    *,
    threshold: float = 5.0,
    edge: int = 10,
    repaired_weight: float = 0.1,
    summit: bool = True,
) -> Table:
    """Measure every |S_corr| peak above ``threshold`` on the reference grid.

    Parameters
    ----------
    diff : Difference
    pair : PreprocessedPair
    threshold : float
        Detection threshold on |S_corr| (σ).
    edge : int
        Candidates closer than this to the image border get the EDGE flag.
    repaired_weight : float
        Candidates get the REPAIRED flag when repaired pixels (cosmic rays, bad columns
        and pixels, filled from their neighbours) carry more than this share of the
        matched filter's weight (the squared PSF of D) at their position: their score
        may then come from an imperfect repair. A transient a few pixels from a bad
        column keeps nearly all its weight and is not flagged. The share itself is the
        ``repaired_share`` column, for the rule cuts.
    summit : bool
        Read S_corr at the summit between the pixels (:func:`_peak_value`), both for the
        threshold and the ``snr`` column. S_corr is the matched filter's significance for
        a point source centred at each pixel; a transient between pixels is best measured
        at its own position, where the pixel grid reads up to 4 % low for a 4-pixel PSF
        (8 % for a 3-pixel one). Without it, the pixel's own value.

    Returns
    -------
    astropy.table.Table
        One row per candidate: candidate_id, x, y (0-based reference pixels), ra, dec (deg),
        snr (signed S_corr at the summit), flux, flux_err (PSF flux in science ADU), sign
        (+1 brighter, -1 fading), fwhm, elongation (of the peak in D), repaired_share (of
        the matched filter's weight on repaired pixels), flags (:class:`CandidateFlag`).
        Issues a NoDetectionsWarning when there is none.
    """
    fwhm = max(pair.psf_science.fwhm, pair.psf_reference.fwhm)
    box = max(5, int(np.ceil(fwhm)) | 1)
    # a summit is at most e^0.5 above its pixel (_peak_value's cap); in practice under
    # 10 %, so pixels down to threshold / 1.1 may hold a summit above the threshold
    floor = threshold / SUMMIT_GAIN if summit else threshold
    ys, xs = find_peaks(diff.S_corr, floor, box=box, invalid=diff.invalid)
    if summit:
        peak = np.array([_peak_value(diff.S_corr, y, x) for y, x in zip(ys, xs, strict=True)])
        keep = np.abs(peak) >= threshold
        ys, xs, peak = ys[keep], xs[keep], peak[keep]
        order = np.argsort(-np.abs(peak), kind="stable")
        ys, xs, peak = ys[order], xs[order], peak[order]
    table = _empty_table()
    if len(ys) == 0:
        warnings.warn(f"no S_corr peak reached {threshold}σ", NoDetectionsWarning, stacklevel=2)
        return table
    fine = np.array([_subpixel(diff.S_corr, y, x) for y, x in zip(ys, xs, strict=True)])
    snr = peak if summit else diff.S_corr[ys, xs].astype(float)
    sign = np.where(snr < 0, -1, 1)
    fwhm_d = measure_fwhm(diff.P_D)
    shapes = np.array(
        [_shape(diff.D, y, x, fwhm_d, s) for y, x, s in zip(ys, xs, sign, strict=True)]
    )
    world = pair.wcs.pixel_to_world(fine[:, 1], fine[:, 0])
    share = _repaired_share_at(pair.mask, diff.P_D, fine)
    table = Table(
        {
            "candidate_id": np.arange(1, len(ys) + 1),
            "x": fine[:, 1],
            "y": fine[:, 0],
            "ra": world.ra.deg,
            "dec": world.dec.deg,
            "snr": snr,
            "flux": [_peak_value(diff.alpha, y, x) for y, x in zip(ys, xs, strict=True)],
            "flux_err": diff.alpha_err[ys, xs].astype(float),
            "sign": sign,
            "fwhm": shapes[:, 0],
            "elongation": shapes[:, 1],
            "repaired_share": share,
            "flags": _flags(pair, fine, snr, fwhm, edge, share > repaired_weight),
        }
    )
    table["ra"].unit = table["dec"].unit = "deg"
    table["x"].unit = table["y"].unit = table["fwhm"].unit = "pix"
    return table


def repaired_share(
    repaired: np.ndarray, psf: np.ndarray, iy: np.ndarray, ix: np.ndarray
) -> np.ndarray:
    """Share of the matched filter's weight (ΣP²) on repaired pixels at each position.

    Parameters
    ----------
    repaired : 2D ndarray of bool
        Repaired pixels.
    psf : 2D ndarray
        PSF stamp (odd size), centred.
    iy, ix : ndarray of int
        Positions (pixels).

    Returns
    -------
    ndarray of float
        Values in [0, 1]; pixels beyond the image count as not repaired.
    """
    weight = np.asarray(psf, dtype=np.float64) ** 2
    weight /= weight.sum()
    half = weight.shape[0] // 2
    padded = np.pad(repaired, half, constant_values=False)
    out = np.zeros(len(iy))
    for k, (y, x) in enumerate(zip(iy, ix, strict=True)):
        window = padded[y : y + 2 * half + 1, x : x + 2 * half + 1]
        out[k] = float(weight[window].sum())
    return out


def _pixel_index(shape: tuple[int, ...], yx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    iy = np.clip(np.rint(yx[:, 0]).astype(int), 0, shape[0] - 1)
    ix = np.clip(np.rint(yx[:, 1]).astype(int), 0, shape[1] - 1)
    return iy, ix


def _repaired_share_at(mask: np.ndarray, psf: np.ndarray, yx: np.ndarray) -> np.ndarray:
    repaired = (mask & np.uint8(REPAIRED)) > 0
    if not repaired.any():
        return np.zeros(len(yx))
    return repaired_share(repaired, psf, *_pixel_index(mask.shape, yx))


def _flags(
    pair: PreprocessedPair,
    yx: np.ndarray,
    snr: np.ndarray,
    fwhm: float,
    edge: int,
    on_repaired: np.ndarray,
) -> np.ndarray:
    ny, nx = pair.mask.shape
    y, x = yx[:, 0], yx[:, 1]
    flags = np.zeros(len(y), dtype=int)
    flags[(x < edge) | (y < edge) | (x > nx - 1 - edge) | (y > ny - 1 - edge)] |= CandidateFlag.EDGE
    iy, ix = _pixel_index(pair.mask.shape, yx)
    flags[on_repaired] |= CandidateFlag.REPAIRED
    for bits, radius, flag in (
        (int(FATAL), 2.0 * fwhm, CandidateFlag.MASKED),
        (int(MaskBit.SATURATED), 4.0 * fwhm, CandidateFlag.NEAR_SATURATED),
    ):
        hits = np.nonzero(pair.mask & bits)
        if len(hits[0]):
            tree = cKDTree(np.column_stack(hits))
            near = tree.query(np.column_stack([iy, ix]), distance_upper_bound=radius)[0]
            flags[np.isfinite(near)] |= flag
    sources = pair.reference_sources
    if len(sources):
        tree = cKDTree(np.column_stack([sources["y"], sources["x"]]))
        near = tree.query(yx, distance_upper_bound=1.5 * fwhm)[0]
        flags[np.isfinite(near)] |= CandidateFlag.NEAR_REFERENCE_SOURCE
    if len(y) > 1:
        tree = cKDTree(yx)
        for i, js in enumerate(tree.query_ball_point(yx, r=2.0 * fwhm)):
            if any(np.sign(snr[j]) != np.sign(snr[i]) for j in js):
                flags[i] |= CandidateFlag.DIPOLE
    return flags


def _empty_table() -> Table:
    names = (
        "candidate_id",
        "x",
        "y",
        "ra",
        "dec",
        "snr",
        "flux",
        "flux_err",
        "sign",
        "fwhm",
        "elongation",
        "repaired_share",
        "flags",
    )
    ints = {"candidate_id", "sign", "flags"}
    return Table({n: np.zeros(0, dtype=int if n in ints else float) for n in names})
