"""Difference a preprocessed pair with ZOGY, tile by tile to follow the spatially varying PSF."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.fft
from astropy.table import Table

from pipeline.science.background import estimate_background
from pipeline.science.masks import grow
from pipeline.science.parallel import thread_map
from pipeline.science.preprocessing import FATAL, PreprocessedPair
from pipeline.science.starshift import correct_star_shifts
from pipeline.science.zogy import torch_available, zogy

__all__ = ["Difference", "difference_pair", "tile_slices"]


@dataclass
class Difference:
    """ZOGY products of a pair on the reference grid (float32 maps).

    Attributes
    ----------
    D, S, S_corr, alpha, alpha_err : 2D ndarray
        Proper difference, score, corrected score, PSF flux of a point transient (science
        ADU) and its error; see :mod:`pipeline.science.zogy`.
    P_D : 2D ndarray
        PSF of D at the image centre.
    F_D : float
        Flux zero point of D at the image centre.
    invalid : 2D ndarray of bool
        Pixels whose scores are not trustworthy (masked pixels grown by the kernel).
    scorr_scale : float
        Robust standard deviation of S_corr's noise: valid pixels more than two FWHM
        from any peak above 5 (1 for white noise, never less); S_corr has been divided
        by it when ``renormalise`` was asked.
    backend : str
        Where the transforms ran.
    flux_floor : float
        Fractional flux error of static sources measured at the reference stars and
        added to the variance of S (PSF and flux-scale systematics).
    flux_floor_extended : float
        The same measured at resolved sources (galaxies), applied over them.
    seconds : float
        Wall time of the differencing.
    star_shifts : Table
        Bright stars whose own shift between the epochs was fitted and removed from S
        (x, y, dx, dy, dx_err, dy_err; see :mod:`pipeline.science.starshift`). D keeps
        their dipoles.
    """

    D: np.ndarray
    S: np.ndarray
    S_corr: np.ndarray
    alpha: np.ndarray
    alpha_err: np.ndarray
    P_D: np.ndarray
    F_D: float
    invalid: np.ndarray
    scorr_scale: float
    backend: str
    flux_floor: float = 0.0
    flux_floor_extended: float = 0.0
    seconds: float = 0.0
    tiles: list[tuple[int, int]] = field(default_factory=list)
    star_shifts: Table = field(default_factory=Table)


def tile_slices(
    shape: tuple[int, int], grid: tuple[int, int], margin: int
) -> list[tuple[tuple[slice, slice], tuple[slice, slice], tuple[slice, slice]]]:
    """Split an image into a grid of tiles with overlapping margins.

    Returns
    -------
    list of tuple
        For each tile: the padded region in the image, the tile's own region in the
        image, and that own region within the padded one.
    """
    ny, nx = shape
    ty, tx = grid
    ys = np.linspace(0, ny, ty + 1).astype(int)
    xs = np.linspace(0, nx, tx + 1).astype(int)
    out = []
    for i in range(ty):
        for j in range(tx):
            y0, y1, x0, x1 = ys[i], ys[i + 1], xs[j], xs[j + 1]
            py0, py1 = max(0, y0 - margin), min(ny, y1 + margin)
            px0, px1 = max(0, x0 - margin), min(nx, x1 + margin)
            padded = (slice(py0, py1), slice(px0, px1))
            own = (slice(y0, y1), slice(x0, x1))
            inner = (slice(y0 - py0, y1 - py0), slice(x0 - px0, x1 - px0))
            out.append((padded, own, inner))
    return out


def difference_pair(
    pair: PreprocessedPair,
    *,
    backend: str = "auto",
    source_noise: bool = True,
    astrometric_noise: bool = True,
    flux_floor: bool = True,
    star_shifts: bool = True,
    renormalise: bool = True,
    mask_growth: float = 1.5,
    tile_size: int = 256,
    min_flux_floor: float = 0.01,
    min_flux_floor_extended: float = 0.003,
) -> Difference:
    """Run ZOGY on each PSF tile of a preprocessed pair and stitch the products.

    Parameters
    ----------
    pair : PreprocessedPair
    backend : {"auto", "numpy", "torch"}
        Transform backend (``auto``: torch when a GPU is present).
    source_noise : bool
        Include the source Poisson noise of both images in V_S, taken from the images
        themselves and their gains (see :func:`~pipeline.science.zogy.zogy`).
    astrometric_noise : bool
        Include the registration error (from the matched stars) in V_S.
    flux_floor : bool
        Measure the residuals that PSF and flux-scale errors leave at bright stars and
        add the matching fractional flux error to V_S, so static sources are not
        significant; transients on bright hosts lose some significance in exchange.
    star_shifts : bool
        Fit each bright star's own shift between the epochs (colour refraction, proper
        motion) from its dipole in S, remove it, and give the astrometric variance around
        it the fit's error instead of the field's scatter
        (:func:`~pipeline.science.starshift.correct_star_shifts`). Needs
        ``astrometric_noise``.
    renormalise : bool
        Divide S_corr by the robust standard deviation of its noise (valid pixels away
        from significant peaks, which are transients and residuals, not noise). Resampling
        correlates the images' noise (a stack's warping, the science put on the
        reference grid), which the white-noise model of ZOGY does not know; the measured
        scale restores unit variance.
    mask_growth : float
        Masked pixels invalidate scores within this many FWHM.
    tile_size : int
        Approximate tile side (pixels); each tile gets the PSFs at its centre. Tiles
        are used only where the PSF model varies across the field.
    min_flux_floor : float
        Smallest fractional flux-error floor, whatever the calibration measures: the
        calibration rests on a handful of bright stars, and no PSF model of real
        stars is better than about 1 % at their cores.
    min_flux_floor_extended : float
        The same for resolved galaxies. A galaxy spreads its light over many PSF
        widths, so PSF errors leave a smaller fraction of it: in simulated pairs
        the PSF-fit residual of bright galaxies scatters by about ±0.3 % of their
        flux, against ±1-2 % for stars.

    Returns
    -------
    Difference
    """
    start = time.perf_counter()
    shape = pair.science.shape
    varies = pair.psf_science.degree > 0 or pair.psf_reference.degree > 0
    grid = (
        (max(1, round(shape[0] / tile_size)), max(1, round(shape[1] / tile_size)))
        if varies
        else (1, 1)
    )
    margin = pair.psf_science.size
    reg = pair.registration
    sigma_ast = reg.rms if (astrometric_noise and reg is not None and reg.refined) else (0.0, 0.0)
    ratio = pair.flux.ratio
    keys = ("D", "S", "V", "S_N", "S_R")
    outputs = {k: np.zeros(shape, dtype=np.float32) for k in keys}
    centre_tile = (grid[0] // 2, grid[1] // 2)
    p_d, f_d = None, 1.0
    if backend == "auto":
        backend = "torch" if torch_available() else "numpy"
    slices = tile_slices(shape, grid, margin)
    per_score = [1.0] * len(slices)  # α (science ADU) per unit of S, tile by tile
    # tiles are independent and write disjoint regions; small transforms gain little
    # from threads of their own, so on the CPU the tiles themselves run side by side
    # (the transforms release the GIL)
    parallel = backend == "numpy" and len(slices) > 1 and (os.cpu_count() or 1) > 1

    def run_tile(index: int) -> None:
        nonlocal p_d, f_d
        padded, own, inner = slices[index]
        cy = (own[0].start + own[0].stop - 1) / 2
        cx = (own[1].start + own[1].stop - 1) / 2
        result = zogy(
            _fast_size(pair.science[padded]),
            _fast_size(pair.reference[padded]),
            pair.psf_science.at(cx, cy),
            pair.psf_reference.at(cx, cy),
            sigma_new=float(np.median(pair.science_rms[padded])),
            sigma_ref=float(np.median(pair.reference_rms[padded])),
            flux_new=ratio,
            flux_ref=1.0,
            **(_source_noise(pair, padded) if source_noise else {}),
            astrometric_sigma=sigma_ast,
            backend=backend,
            fft_workers=1 if parallel else -1,
        )
        outputs["D"][own] = result.D[inner]
        outputs["S"][own] = result.S[inner]
        outputs["V"][own] = result.V_S[inner]
        outputs["S_N"][own] = result.S_N[inner]
        outputs["S_R"][own] = result.S_R[inner]
        # α = S / F_S is in reference units; report science ADU, as fakes are injected there
        per_score[index] = ratio / result.F_S
        if divmod(index, grid[1]) == centre_tile:
            p_d, f_d = result.P_D, result.F_D

    thread_map(run_tile, range(len(slices)), threads=None if parallel else 1)
    fwhm = max(pair.psf_science.fwhm, pair.psf_reference.fwhm)
    invalid = grow((pair.mask & np.uint8(FATAL)) > 0, int(np.ceil(mask_growth * fwhm)))
    invalid |= _edge(shape, int(np.ceil(fwhm)))
    sources = pair.reference_sources
    point = _point_like(sources, pair.psf_reference.global_stamp)
    excluded = invalid | grow(pair.mask > 0, int(fwhm))
    shifts = Table()
    if star_shifts:
        shifts = correct_star_shifts(outputs, sources[point], sigma_ast, fwhm, excluded)
    # α and its error follow from S and V, tile by tile (each tile has its own F_S), once
    # the star shifts have corrected both
    outputs["alpha"], outputs["err"] = _psf_flux(outputs, slices, per_score)
    floor = extended = 0.0
    if flux_floor:
        floor = calibrate_flux_floor(outputs, sources[point], excluded, fwhm)
        # resolved galaxies smooth PSF errors out, or show their own: they get their
        # own, measured, floor. Transients favour galaxies, and one near a galaxy's
        # centre reads as a residual of the subtraction: the median, not the upper
        # quartile, keeps a minority of hosts from setting the floor that hides them
        extended = calibrate_flux_floor(
            outputs, sources[~point], excluded, fwhm, default=floor, quantile=0.5
        )
        floor, extended = max(floor, min_flux_floor), max(extended, min_flux_floor_extended)
    floors = _floor_map(sources, point, floor, extended, shape, fwhm)
    systematic = floors**2 * (outputs["S_N"] ** 2 + outputs["S_R"] ** 2)
    inflation = np.sqrt(1.0 + systematic / outputs["V"])
    outputs["S_corr"] = outputs["S"] / np.sqrt(outputs["V"] + systematic)
    outputs["err"] *= inflation
    # a measured spread below 1 means the variance was overestimated: keep it (never
    # sharpen significances), only ever widen
    scale = max(_noise_spread(outputs["S_corr"], invalid, fwhm), 1.0) if renormalise else 1.0
    if renormalise and scale > 0:
        outputs["S_corr"] /= scale
        outputs["err"] *= scale
    # both backgrounds absorb some undetected faint-source light, unequally: remove the
    # smooth offset this leaves, so the ±threshold cuts mean what they say
    offset = estimate_background(outputs["S_corr"], invalid, box=64).level
    outputs["S_corr"] -= offset
    outputs["alpha"] -= offset * outputs["err"]
    for key in ("S_corr", "S", "alpha", "D"):
        outputs[key][invalid] = 0.0
    return Difference(
        D=outputs["D"],
        S=outputs["S"],
        S_corr=outputs["S_corr"],
        alpha=outputs["alpha"],
        alpha_err=outputs["err"],
        P_D=p_d,
        F_D=float(f_d),
        invalid=invalid,
        scorr_scale=float(scale),
        flux_floor=float(floor),
        flux_floor_extended=float(extended),
        backend=backend,
        seconds=time.perf_counter() - start,
        tiles=[(int(s[1][0].start), int(s[1][1].start)) for s in slices],
        star_shifts=shifts,
    )


def _psf_flux(
    outputs: dict[str, np.ndarray], slices: list, per_score: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """α = k·S and its error k·√V, with k each tile's α per unit of S."""
    alpha = np.empty_like(outputs["S"])
    err = np.empty_like(outputs["V"])
    for (_, own, _), k in zip(slices, per_score, strict=True):
        np.multiply(outputs["S"][own], np.float32(k), out=alpha[own])
        np.sqrt(outputs["V"][own], out=err[own])
        err[own] *= np.float32(k)
    return alpha, err


def _source_noise(pair: PreprocessedPair, tile: tuple[slice, slice]) -> dict[str, Any]:
    """ZOGY's source-noise inputs for one tile: the gains and the background variances."""
    return {
        "gain_new": pair.science_gain,
        "gain_ref": pair.reference_gain,
        "background_var_new": _fast_size(pair.science_rms[tile] ** 2, "edge"),
        "background_var_ref": _fast_size(pair.reference_rms[tile] ** 2, "edge"),
    }


def calibrate_flux_floor(
    maps: dict[str, np.ndarray],
    sources: Table,
    invalid: np.ndarray,
    fwhm: float,
    *,
    default: float = 0.0,
    quantile: float = 0.75,
) -> float:
    """Fractional flux error f that makes S_corr unit-variance at bright static sources.

    For each bright, unmasked reference source, the excess of S² over its variance V
    in a window of one FWHM is compared with S_N² + S_R²; f² is a quantile of that
    ratio (the upper quartile by default: robust to the odd real variable among them).

    Parameters
    ----------
    maps : dict
        ``S``, ``V``, ``S_N`` and ``S_R`` maps.
    sources : Table
        Reference sources with x, y.
    invalid : 2D ndarray of bool
        Pixels to ignore.
    fwhm : float
        Window radius in pixels.
    default : float
        Returned when fewer than three sources are bright enough to tell.
    quantile : float
        Which quantile of the per-source ratios sets f: higher covers more of the
        source-to-source spread of the residuals, lower tolerates more sources that
        hold a real change.

    Returns
    -------
    float
        f.
    """
    half = max(1, int(np.ceil(fwhm)))
    ny, nx = invalid.shape
    ratios = []
    for x, y in zip(np.asarray(sources["x"]), np.asarray(sources["y"]), strict=True):
        ix, iy = int(np.rint(x)), int(np.rint(y))
        if not (half <= ix < nx - half and half <= iy < ny - half):
            continue
        window = (slice(iy - half, iy + half + 1), slice(ix - half, ix + half + 1))
        if invalid[window].any():
            continue
        signal = maps["S_N"][window] ** 2 + maps["S_R"][window] ** 2
        variance = maps["V"][window]
        # below S/N ~50 the estimate is dominated by noise in S² - V, not by systematics
        if signal.sum() < 2500.0 * variance.sum():
            continue
        excess = (maps["S"][window] ** 2).sum() - variance.sum()
        ratios.append(excess / signal.sum())
    if len(ratios) < 3:
        return default
    ratios = np.asarray(ratios)
    # a transient or a variable on a star is not a systematic of the subtraction: with a
    # handful of stars one of them would set the floor for the whole image, so stars far
    # above the others are left out first (the floor of the others covers them anyway)
    centre = np.median(ratios)
    spread = 1.4826 * np.median(np.abs(ratios - centre))
    ratios = ratios[ratios <= centre + 5.0 * max(spread, 0.25 * abs(centre), 1e-6)]
    # by default the upper quartile, not the median: residuals vary from star to star
    # (PSF changes across the field, sub-pixel phase) and the floor must cover most of them
    return float(np.sqrt(max(np.quantile(ratios, quantile), 0.0)))


def _point_like(sources: Table, psf: np.ndarray) -> np.ndarray:
    """Sources whose half-light radius is that of the PSF (within 25 % and 0.3 px)."""
    if len(sources) == 0 or "r50" not in sources.colnames:
        return np.ones(len(sources), dtype=bool)
    centre = (np.asarray(psf.shape) - 1) / 2
    yy, xx = np.indices(psf.shape)
    order = np.argsort(np.hypot(yy - centre[0], xx - centre[1]).ravel())
    radii = np.hypot(yy - centre[0], xx - centre[1]).ravel()[order]
    cumulative = np.cumsum(psf.ravel()[order]) / psf.sum()
    r50 = float(radii[np.searchsorted(cumulative, 0.5)])
    return np.asarray(sources["r50"]) < 1.25 * r50 + 0.3


def _floor_map(
    sources: Table,
    point: np.ndarray,
    floor: float,
    extended: float,
    shape: tuple[int, int],
    fwhm: float,
) -> np.ndarray:
    """Fractional flux-error floor per pixel: ``extended`` over galaxies, ``floor`` elsewhere."""
    out = np.full(shape, floor, dtype=np.float32)
    if extended == floor or len(sources) == 0:
        return out
    ny, nx = shape
    for row in sources[~point]:
        radius = max(2.0 * fwhm, 3.0 * float(row["r50"]))
        r = int(np.ceil(radius))
        ix, iy = int(np.rint(row["x"])), int(np.rint(row["y"]))
        y0, y1, x0, x1 = max(0, iy - r), min(ny, iy + r + 1), max(0, ix - r), min(nx, ix + r + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1]
        disc = (yy - iy) ** 2 + (xx - ix) ** 2 <= radius * radius
        out[y0:y1, x0:x1][disc] = extended
    # point sources keep the stellar floor even where they overlap a galaxy
    for row in sources[point]:
        r = int(np.ceil(3.0 * fwhm))
        ix, iy = int(np.rint(row["x"])), int(np.rint(row["y"]))
        out[max(0, iy - r) : iy + r + 1, max(0, ix - r) : ix + r + 1] = floor
    return out


def _fast_size(tile: np.ndarray, mode: str = "constant") -> np.ndarray:
    """Pad a tile at its far sides to sizes the FFT handles fast (products of 2, 3, 5).

    A tile of 256 px plus PSF margins is 354 px, whose factor 59 makes every transform
    several times slower than at 360. The padding lies beyond the tile's margin, so the
    tile's own region is computed exactly as without it; its results are cut away.
    """
    ny, nx = tile.shape
    fy, fx = scipy.fft.next_fast_len(ny, real=True), scipy.fft.next_fast_len(nx, real=True)
    if (fy, fx) == (ny, nx):
        return tile
    return np.pad(tile, ((0, fy - ny), (0, fx - nx)), mode=mode)


def _edge(shape: tuple[int, int], width: int) -> np.ndarray:
    edge = np.zeros(shape, dtype=bool)
    edge[:width] = edge[-width:] = True
    edge[:, :width] = edge[:, -width:] = True
    return edge


def _noise_spread(s_corr: np.ndarray, invalid: np.ndarray, fwhm: float, peak: float = 5.0) -> float:
    """The spread of S_corr's noise: the robust spread away from significant peaks.

    Transients and the residuals of static sources are not noise; each spreads over a
    matched filter's footprint, and a crowded or transient-rich field would read as a
    noisier one if they stayed in. Pixels within two FWHM of ``|S_corr| > peak``
    (after a first robust estimate) are left out, unless that leaves too few.
    """
    first = _robust_std(s_corr[~invalid])
    strong = (np.abs(s_corr) > peak * max(first, 1e-6)) & ~invalid
    if not strong.any():
        return first
    quiet = ~invalid & ~grow(strong, int(np.ceil(2 * fwhm)))
    if quiet.sum() < max(1000, 0.25 * (~invalid).sum()):
        return first
    return _robust_std(s_corr[quiet])


def _robust_std(values: np.ndarray) -> float:
    """Standard deviation from the interquartile range (robust to real sources)."""
    if values.size < 100:
        return 1.0
    sample = values if values.size < 2_000_000 else values[:: values.size // 1_000_000]
    q25, q75 = np.percentile(sample, [25, 75])
    return float((q75 - q25) / 1.349)
