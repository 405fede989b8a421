"""Simulated science/reference image pairs with known truth, and fake-source injection.

The simulator is the ground truth for the pipeline's completeness and false-positive rates, so
every choice below aims to be physically right rather than convenient:

* Pixel convention: 0-based pixel centres as in numpy and astropy's ``*_values`` WCS methods;
  pixel ``(x, y)`` spans ``[x - 0.5, x + 0.5]`` and arrays are indexed ``data[y, x]``.
* Both epochs are rendered from one list of static sources in sky coordinates: the reference
  on its TAN grid, the science image on its own grid (shifted and rotated), each source at its
  position mapped through the two WCSs, each with that epoch's (spatially varying) PSF.
* The data keep the sky (ADU); noise is Poisson in electrons plus Gaussian read noise; charge
  above ``saturation`` bleeds along the column, is clipped and masked.
* The reference behaves as the mean of ``reference_depth`` exposures: its effective gain is
  ``gain * depth`` and its effective read noise ``read_noise * sqrt(depth)`` (electrons), so its
  per-pixel variance in ADU is ``(S * gain + read_noise**2) / (depth * gain**2)``.
* Every random component draws from its own child of ``numpy.random.SeedSequence(seed)``, so a
  run with ``n_transients=0`` has the very same stars, galaxies and artefacts as one without.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.modeling.models import Sersic2D
from astropy.table import Table
from astropy.wcs import WCS
from scipy import ndimage, signal

from pipeline.science.image import Image
from pipeline.science.psfmodel import effective_pixels, moffat_alpha, moffat_psf

__all__ = [
    "PIXEL_SCALE_ARCSEC",
    "SimulatedPair",
    "background_sigma",
    "flux_to_snr",
    "fwhm_at",
    "inject_fakes",
    "psf_at",
    "pure_noise_pair",
    "simulate_pair",
    "snr_to_flux",
]

PIXEL_SCALE_ARCSEC = 0.263
"""Pixel scale of simulated images (arcsec per pixel, DECam-like)."""

_CRVAL = (150.1, 2.2)
_MJD_REFERENCE = 59580.0
_MJD_SCIENCE = 59612.3
_EXPTIME = 90.0
_EDGE = 20
_STREAMS = (
    "psf",
    "stars",
    "galaxies",
    "saturated",
    "transients",
    "cr_science",
    "cr_reference",
    "columns",
    "noise_science",
    "noise_reference",
)
_TRUTH_COLUMNS = (
    ("id", np.int64),
    ("x_sci", float),
    ("y_sci", float),
    ("x_ref", float),
    ("y_ref", float),
    ("ra", float),
    ("dec", float),
    ("flux_sci", float),
    ("flux_ref", float),
    ("flux_diff", float),
    ("snr_injected", float),
    ("sign", np.int64),
    ("on_galaxy", bool),
    ("host_id", np.int64),
    ("fwhm_sci", float),
)


@dataclass
class SimulatedPair:
    """A simulated science/reference pair and everything that was put into it.

    Attributes
    ----------
    science, reference : Image
        The two epochs (float32 ADU, sky included). ``meta`` holds ``sky`` (ADU), ``sigma_bkg``
        (background noise, ADU), ``psf`` (the PSF field, see :func:`fwhm_at`), ``flux_scale``
        (science flux per unit reference flux; 1 for the reference) and ``n_exposures``.
    truth : astropy.table.Table
        One row per injected transient: ``id``, ``x_sci``, ``y_sci``, ``x_ref``, ``y_ref``
        (pixels), ``ra``, ``dec`` (deg), ``flux_sci`` (science ADU; for a fading source the
        flux it had, in science units), ``flux_ref`` (reference ADU present in the reference:
        0 for a new source), ``flux_diff`` (``sign * flux_sci``: what science minus scaled
        reference shows), ``snr_injected``, ``sign`` (+1 new, -1 faded), ``on_galaxy``,
        ``host_id`` (row of ``sources`` or -1) and ``fwhm_sci`` (local science FWHM, pixels).
    psf_science, psf_reference : 2D ndarray, shape (n, n), n odd >= 25
        PSF stamps at the field centre, sum 1, the same size as the stamps that render point
        sources.
    sources : astropy.table.Table
        Static sources: ``id``, ``kind`` (``star``, ``galaxy``, ``saturated_star``), ``x_ref``,
        ``y_ref``, ``x_sci``, ``y_sci``, ``ra``, ``dec``, ``flux_ref``, ``flux_sci`` and, for
        galaxies, ``r_eff`` (disc), ``r_eff_bulge`` (pixels), ``bulge_fraction``, ``axis_ratio``,
        ``theta`` (radians, reference frame); NaN for stars. Centres may lie up to a padding
        margin outside the frames (their light still spills in).
    artefacts : astropy.table.Table
        ``kind`` (``cosmic_ray``, ``bad_column``, ``saturated_star``), ``epoch`` (``science`` or
        ``reference``), ``x_sci``, ``y_sci`` (science pixels) and ``length`` (pixels: track
        length, column stretch or bleed-trail extent).
    params : dict
        The arguments the pair was made with.
    """

    science: Image
    reference: Image
    truth: Table
    psf_science: np.ndarray
    psf_reference: np.ndarray
    sources: Table
    artefacts: Table
    params: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# S/N definition


def background_sigma(sky: float, gain: float, read_noise: float) -> float:
    """Per-pixel background noise in ADU: ``sqrt(sky * gain + read_noise**2) / gain``.

    Parameters
    ----------
    sky : float
        Sky level in ADU.
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise in electrons.

    Returns
    -------
    float
        Standard deviation of an empty-sky pixel, ADU.
    """
    return float(np.sqrt(sky * gain + read_noise**2) / gain)


def snr_to_flux(snr: float | np.ndarray, sigma_bkg: float, psf: np.ndarray) -> float | np.ndarray:
    """Flux with a given background-limited PSF-photometry S/N.

    ``F = S/N * sigma_bkg * sqrt(N_eff)``, with ``N_eff = 1 / sum(P**2)`` (source noise
    neglected, as for faint transients).

    Parameters
    ----------
    snr : float or ndarray
        Signal-to-noise ratio(s).
    sigma_bkg : float
        Per-pixel background noise, ADU.
    psf : 2D ndarray
        PSF stamp (any normalisation).

    Returns
    -------
    float or ndarray
        Flux in ADU, same shape as ``snr``.
    """
    return snr * sigma_bkg * np.sqrt(effective_pixels(psf))


def flux_to_snr(flux: float | np.ndarray, sigma_bkg: float, psf: np.ndarray) -> float | np.ndarray:
    """Background-limited PSF-photometry S/N of a flux; the inverse of :func:`snr_to_flux`.

    Parameters
    ----------
    flux : float or ndarray
        Flux(es) in ADU.
    sigma_bkg : float
        Per-pixel background noise, ADU.
    psf : 2D ndarray
        PSF stamp (any normalisation).

    Returns
    -------
    float or ndarray
        ``F / (sigma_bkg * sqrt(N_eff))``.
    """
    return flux / (sigma_bkg * np.sqrt(effective_pixels(psf)))


# --------------------------------------------------------------------------------------------
# PSF field


def _psf_field(
    shape: tuple[int, int],
    fwhm: float,
    beta: float,
    ellipticity: float,
    angle: float,
    variation: float,
    direction: float,
    size: int,
) -> dict[str, Any]:
    """JSON-friendly description of a linearly varying Moffat PSF over a frame."""
    ny, nx = shape
    ux, uy = float(np.cos(direction)), float(np.sin(direction))
    cx, cy = (nx - 1) / 2.0, (ny - 1) / 2.0
    scale = max(abs(cx * ux) + abs(cy * uy), 1.0)
    return {
        "model": "moffat",
        "fwhm": float(fwhm),
        "beta": float(beta),
        "ellipticity": float(ellipticity),
        "angle": float(angle),
        "variation": float(variation),
        "direction": [ux, uy],
        "center": [cx, cy],
        "scale": float(scale),
        "size": int(size),
    }


def _fwhm_field(psf: dict[str, Any], x: np.ndarray, y: np.ndarray) -> np.ndarray:
    ux, uy = psf["direction"]
    cx, cy = psf["center"]
    g = ((np.asarray(x) - cx) * ux + (np.asarray(y) - cy) * uy) / psf["scale"]
    return psf["fwhm"] * (1.0 + psf["variation"] * g)


def _psf_meta(image: Image) -> dict[str, Any]:
    try:
        return image.meta["psf"]
    except KeyError:
        raise ValueError(
            "image.meta has no 'psf' entry: only images made by pipeline.science.simulate "
            "carry their PSF field"
        ) from None


def fwhm_at(image: Image, x: float | np.ndarray, y: float | np.ndarray) -> np.ndarray:
    """Major-axis FWHM (pixels) of a simulated image's PSF at pixel position(s) ``(x, y)``.

    The FWHM changes linearly across the frame along ``meta["psf"]["direction"]``, from
    ``fwhm * (1 - variation)`` at one extreme corner to ``fwhm * (1 + variation)`` at the
    opposite one, and equals ``fwhm`` at the frame centre.

    Parameters
    ----------
    image : Image
        An image made by :func:`simulate_pair` or :func:`pure_noise_pair`.
    x, y : float or ndarray
        0-based pixel coordinates in that image.

    Returns
    -------
    ndarray
        FWHM in pixels, broadcast shape of ``x`` and ``y``.
    """
    return _fwhm_field(_psf_meta(image), x, y)


def psf_at(
    image: Image,
    x: float,
    y: float,
    size: int | None = None,
    center: tuple[float, float] | None = None,
) -> np.ndarray:
    """The true PSF stamp of a simulated image at pixel ``(x, y)``.

    Parameters
    ----------
    image : Image
        An image made by :func:`simulate_pair` or :func:`pure_noise_pair`.
    x, y : float
        0-based pixel position where the PSF is wanted.
    size : int, optional
        Odd stamp size; default the size the simulator renders point sources with.
    center : tuple of float, optional
        Sub-pixel centre within the stamp, as in :func:`~pipeline.science.psfmodel.moffat_psf`.

    Returns
    -------
    2D ndarray, shape (size, size)
        Pixel-integrated PSF, sum 1.
    """
    psf = _psf_meta(image)
    return moffat_psf(
        int(size or psf["size"]),
        float(_fwhm_field(psf, x, y)),
        psf["beta"],
        psf["ellipticity"],
        psf["angle"],
        center=center,
    )


def _stamp_size(peak: np.ndarray, threshold: float, psf: dict[str, Any], base: int) -> np.ndarray:
    """Odd stamp sizes whose edge lies where each source's profile drops below ``threshold``."""
    alpha = moffat_alpha(psf["fwhm"] * (1.0 + abs(psf["variation"])), psf["beta"])
    ratio = np.maximum(np.asarray(peak, dtype=float) / threshold, 1.0)
    radius = alpha * np.sqrt(np.maximum(ratio ** (1.0 / psf["beta"]) - 1.0, 0.0))
    half = np.clip(np.ceil(radius), base // 2, 150).astype(int)
    return 2 * half + 1


def _peak_fraction(psf: dict[str, Any]) -> float:
    """Fraction of a point source's flux in its brightest pixel (at the nominal FWHM)."""
    stamp = moffat_psf(psf["size"], psf["fwhm"], psf["beta"], psf["ellipticity"], psf["angle"])
    return float(stamp.max())


# --------------------------------------------------------------------------------------------
# Geometry


def _make_wcs(shape: tuple[int, int], shift: tuple[float, float], rotation_deg: float) -> WCS:
    """TAN WCS; a sky point at reference pixel p lands at ``c + R(rotation) (p - c) + shift``."""
    ny, nx = shape
    scale = PIXEL_SCALE_ARCSEC / 3600.0
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.cunit = ["deg", "deg"]
    wcs.wcs.crval = list(_CRVAL)
    wcs.wcs.crpix = [(nx - 1) / 2.0 + 1.0 + shift[0], (ny - 1) / 2.0 + 1.0 + shift[1]]
    wcs.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]]) @ rot.T
    wcs.pixel_shape = (nx, ny)
    wcs.wcs.set()
    return wcs


def _map_pixels(
    wcs_from: WCS, wcs_to: WCS, x: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    world = wcs_from.pixel_to_world_values(np.asarray(x, float), np.asarray(y, float))
    xo, yo = wcs_to.world_to_pixel_values(*world)
    return np.asarray(xo, float), np.asarray(yo, float)


def _jacobian(wcs_from: WCS, wcs_to: WCS, x: float, y: float) -> np.ndarray:
    """2x2 matrix taking small pixel offsets in ``wcs_from`` to offsets in ``wcs_to``."""
    xs = np.array([x, x + 1.0, x])
    ys = np.array([y, y, y + 1.0])
    xo, yo = _map_pixels(wcs_from, wcs_to, xs, ys)
    return np.array([[xo[1] - xo[0], xo[2] - xo[0]], [yo[1] - yo[0], yo[2] - yo[0]]])


def _inside(x: np.ndarray, y: np.ndarray, shape: tuple[int, int], margin: float) -> np.ndarray:
    ny, nx = shape
    return (x >= margin) & (x <= nx - 1 - margin) & (y >= margin) & (y <= ny - 1 - margin)


def _add_stamp(image: np.ndarray, stamp: np.ndarray, x0: int, y0: int) -> None:
    """Add ``stamp`` into ``image`` with its [0, 0] pixel at image pixel (x0, y0), clipped."""
    ny, nx = image.shape
    sy, sx = stamp.shape
    ya, yb = max(y0, 0), min(y0 + sy, ny)
    xa, xb = max(x0, 0), min(x0 + sx, nx)
    if ya < yb and xa < xb:
        image[ya:yb, xa:xb] += stamp[ya - y0 : yb - y0, xa - x0 : xb - x0]


def _round(v: float) -> int:
    return int(np.floor(v + 0.5))


# --------------------------------------------------------------------------------------------
# Rendering


def _render_points(
    model: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    psf: dict[str, Any],
    sizes: np.ndarray,
) -> None:
    """Add point sources as sub-pixel-centred Moffat stamps at the local FWHM."""
    fwhm = _fwhm_field(psf, x, y)
    ny, nx = model.shape
    for xi, yi, fi, wi, si in zip(x, y, flux, fwhm, sizes, strict=True):
        half = int(si) // 2
        ix, iy = _round(xi), _round(yi)
        if ix + half < 0 or iy + half < 0 or ix - half >= nx or iy - half >= ny or fi == 0:
            continue
        stamp = moffat_psf(
            int(si),
            float(wi),
            psf["beta"],
            psf["ellipticity"],
            psf["angle"],
            center=(half + xi - ix, half + yi - iy),
            oversample=5 if si <= 101 else 3,
        )
        _add_stamp(model, fi * stamp, ix - half, iy - half)


def _pixel_integral(
    func: Any, dx: float, dy: float, half: int, levels: tuple[tuple[int, int], ...]
) -> np.ndarray:
    """Integrate ``func(offset_x, offset_y)`` over the pixels of a (2 half + 1)^2 stamp.

    ``(dx, dy)`` is the profile centre relative to the central pixel's centre. Each level
    ``(k, oversample)`` re-integrates the central (2k + 1)^2 pixels with finer sampling: cusped
    Sersic cores need it, and getting them right in both epochs keeps static galaxies from
    leaving residuals in the difference.
    """
    out = np.empty((2 * half + 1, 2 * half + 1))
    for k, os_ in levels:
        k = min(k, half)
        sub = (np.arange((2 * k + 1) * os_) + 0.5) / os_ - 0.5 - k
        vals = func((sub - dx)[np.newaxis, :], (sub - dy)[:, np.newaxis])
        binned = vals.reshape(2 * k + 1, os_, 2 * k + 1, os_).mean(axis=(1, 3))
        out[half - k : half + k + 1, half - k : half + k + 1] = binned
    return out


def _galaxy_stamp(gal: dict[str, float], jac: np.ndarray, dx: float, dy: float) -> np.ndarray:
    """Unconvolved, pixel-integrated bulge+disc galaxy on an epoch's grid, sum 1."""
    r_d, r_b, bt = gal["r_eff"], gal["r_eff_bulge"], gal["bulge_fraction"]
    half = int(np.ceil(max(5.0 * r_d, 8.0 * r_b if bt > 0 else 0.0)))
    total = np.zeros((2 * half + 1, 2 * half + 1))
    # The n=4 cusp needs the central 3x3 pixels sampled much more finely than the disc.
    for n, r_eff, frac, core in ((1.0, r_d, 1.0 - bt, ()), (4.0, r_b, bt, ((1, 25),))):
        if frac <= 0:
            continue

        def profile(ox, oy, n=n, r_eff=r_eff):
            u = jac[0, 0] * ox + jac[0, 1] * oy
            v = jac[1, 0] * ox + jac[1, 1] * oy
            ellip = 1.0 - gal["axis_ratio"]
            return Sersic2D.evaluate(u, v, 1.0, r_eff, n, 0.0, 0.0, ellip, gal["theta"])

        levels = ((half, 1), (int(np.ceil(2 * r_eff)) + 1, 5), *core)
        comp = _pixel_integral(profile, dx, dy, half, levels)
        total += frac * comp / comp.sum()
    return total


def _render_galaxies(
    model: np.ndarray,
    galaxies: list[dict[str, float]],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    psf: dict[str, Any],
    jacobians: list[np.ndarray],
) -> None:
    """Add galaxies convolved with the local PSF (sampled at pixel centres)."""
    ny, nx = model.shape
    for gal, xi, yi, fi, jac in zip(galaxies, x, y, flux, jacobians, strict=True):
        ix, iy = _round(xi), _round(yi)
        intrinsic = _galaxy_stamp(gal, jac, xi - ix, yi - iy)
        kernel = moffat_psf(
            psf["size"],
            float(_fwhm_field(psf, xi, yi)),
            psf["beta"],
            psf["ellipticity"],
            psf["angle"],
            oversample=1,
        )
        stamp = signal.fftconvolve(intrinsic, kernel, mode="full")
        half = stamp.shape[0] // 2
        if ix + half < 0 or iy + half < 0 or ix - half >= nx or iy - half >= ny:
            continue
        _add_stamp(model, fi * stamp, ix - half, iy - half)


# --------------------------------------------------------------------------------------------
# Detector effects


def _photon_noise(model: np.ndarray, gain: float, rng: np.random.Generator) -> np.ndarray:
    """Poisson-sample an expected image (ADU) in electrons; return ADU."""
    return rng.poisson(np.clip(model, 0.0, None) * gain).astype(float) / gain


def _spill(seq: np.ndarray, amount: float, level: float) -> None:
    """Fill ``seq`` (a view, outward from a saturated run) up to ``level`` with ``amount``."""
    if amount <= 0 or seq.size == 0:
        return
    room = np.clip(level - seq, 0.0, None)
    cum = np.cumsum(room)
    k = int(np.searchsorted(cum, amount))
    seq[:k] += room[:k]
    if k < seq.size:
        seq[k] += amount - (cum[k - 1] if k > 0 else 0.0)


def _bleed(data: np.ndarray, level: float) -> None:
    """Move charge above ``level`` up and down its column (half each way), in place."""
    for x in np.flatnonzero((data > level).any(axis=0)):
        col = data[:, x]
        edges = np.diff(np.concatenate(([0], (col > level).astype(np.int8), [0])))
        for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
            excess = float(np.clip(col[a:b] - level, 0.0, None).sum())
            col[a:b] = np.minimum(col[a:b], level)
            _spill(col[b:], excess / 2.0, level)
            _spill(col[:a][::-1], excess / 2.0, level)


def _add_cosmic_rays(
    data: np.ndarray, n: int, sigma: float, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Add sharp hits (1-3 pixels) and short straight tracks; return (x, y, length) each."""
    ny, nx = data.shape
    rows = []
    for _ in range(n):
        x, y = rng.uniform(0, nx - 1), rng.uniform(0, ny - 1)
        amp = np.exp(rng.uniform(np.log(5.0 * sigma), np.log(500.0 * sigma)))
        if rng.random() < 0.6:
            ix, iy = _round(x), _round(y)
            data[iy, ix] += amp
            for dx, dy in rng.permutation([(1, 0), (-1, 0), (0, 1), (0, -1)])[: rng.integers(3)]:
                if 0 <= ix + dx < nx and 0 <= iy + dy < ny:
                    data[iy + dy, ix + dx] += amp * rng.uniform(0.1, 0.6)
            rows.append((float(ix), float(iy), 1.0))
            continue
        length, phi = rng.uniform(3.0, 20.0), rng.uniform(0.0, np.pi)
        t = np.arange(0.0, length, 0.1) - length / 2.0
        px = np.floor(x + t * np.cos(phi) + 0.5).astype(int)
        py = np.floor(y + t * np.sin(phi) + 0.5).astype(int)
        ok = (px >= 0) & (px < nx) & (py >= 0) & (py < ny)
        np.add.at(data, (py[ok], px[ok]), amp * 0.1)
        rows.append((x, y, length))
    return rows


def _add_bad_columns(
    data: np.ndarray, mask: np.ndarray, n: int, high: float, rng: np.random.Generator
) -> list[tuple[float, float, float]]:
    """Set stretches of columns (from a trap to a frame edge) to ``high`` or 0; mask them."""
    ny, nx = data.shape
    rows = []
    for _ in range(n):
        x = int(rng.integers(nx))
        length = int(rng.integers(max(ny // 4, 1), ny + 1))
        y0 = 0 if rng.random() < 0.5 else ny - length
        data[y0 : y0 + length, x] = high if rng.random() < 0.5 else 0.0
        mask[y0 : y0 + length, x] = True
        rows.append((float(x), y0 + (length - 1) / 2.0, float(length)))
    return rows


def _detect(
    model: np.ndarray,
    *,
    gain: float,
    read_noise: float,
    saturation: float,
    noise: bool,
    rng: np.random.Generator,
    cosmic_rays: int,
    cr_rng: np.random.Generator,
    sigma: float,
) -> tuple[np.ndarray, np.ndarray, list[tuple[float, float, float]]]:
    """Expected image -> data: photon noise, cosmic rays, bleeding, read noise, clipping."""
    data = _photon_noise(model, gain, rng) if noise else model.copy()
    crs = _add_cosmic_rays(data, cosmic_rays, sigma, cr_rng)
    _bleed(data, saturation)
    full = data >= saturation
    if noise and read_noise > 0:
        data += rng.normal(0.0, read_noise / gain, data.shape)
    mask = full | (data >= saturation)
    data[mask] = saturation
    return data, mask, crs


# --------------------------------------------------------------------------------------------
# Scene


def _pad(shape: tuple[int, int], shift: tuple[float, float], rotation_deg: float) -> int:
    """Margin (pixels) around the reference frame over which static sources are scattered."""
    ny, nx = shape
    turn = abs(np.deg2rad(rotation_deg)) * np.hypot(nx, ny) / 2.0
    return int(np.ceil(30.0 + np.hypot(*shift) + turn))


def _power_law(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Draw from N(>F) proportional to F**-slope between lo and hi."""
    u = rng.random(n)
    return (lo**-slope - u * (lo**-slope - hi**-slope)) ** (-1.0 / slope)


def _draw_stars(
    rng: np.random.Generator,
    n_stars: int,
    shape: tuple[int, int],
    pad: int,
    f_min: float,
    f_sat: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Star positions (reference pixels) and reference fluxes.

    ``n_stars`` is the expected number on the reference frame (more are scattered over the
    padding so both frames are filled to their edges); counts follow N(>F) ~ F^-0.75 from about
    S/N 2 in the reference, and ``max(1, n_stars // 100)`` of them have a reference peak between
    0.3 and 1.2 times the saturation headroom.
    """
    ny, nx = shape
    if n_stars <= 0:
        return np.empty(0), np.empty(0), np.empty(0)
    n_total = round(n_stars * (nx + 2 * pad) * (ny + 2 * pad) / (nx * ny))
    x = rng.uniform(-pad - 0.5, nx - 0.5 + pad, n_total)
    y = rng.uniform(-pad - 0.5, ny - 0.5 + pad, n_total)
    flux = _power_law(rng, n_total, f_min, 0.3 * f_sat, 0.75)
    n_bright = min(n_total, max(1, n_stars // 100))
    bright_x = rng.uniform(40, nx - 41, n_bright)
    bright_y = rng.uniform(40, ny - 41, n_bright)
    bright_f = f_sat * np.exp(rng.uniform(np.log(0.3), np.log(1.2), n_bright))
    x[:n_bright], y[:n_bright], flux[:n_bright] = bright_x, bright_y, bright_f
    return x, y, flux


def _draw_galaxies(
    rng: np.random.Generator, n_galaxies: int, shape: tuple[int, int], pad: int, sigma_ref: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[dict[str, float]]]:
    """Bulge (n=4) + disc (n=1) galaxies: positions (reference pixels), fluxes, shapes."""
    ny, nx = shape
    if n_galaxies <= 0:
        return np.empty(0), np.empty(0), np.empty(0), []
    n_total = round(n_galaxies * (nx + 2 * pad) * (ny + 2 * pad) / (nx * ny))
    x = rng.uniform(-pad - 0.5, nx - 0.5 + pad, n_total)
    y = rng.uniform(-pad - 0.5, ny - 0.5 + pad, n_total)
    flux = sigma_ref * np.exp(rng.uniform(np.log(200.0), np.log(20000.0), n_total))
    r_eff = rng.uniform(2.0, 8.0, n_total)
    shapes = [
        {
            "r_eff": float(r),
            "r_eff_bulge": float(max(2.0, r * rng.uniform(0.4, 0.8))),
            "bulge_fraction": float(rng.uniform(0.0, 1.0)),
            "axis_ratio": float(rng.uniform(0.3, 1.0)),
            "theta": float(rng.uniform(0.0, np.pi)),
        }
        for r in r_eff
    ]
    return x, y, flux, shapes


def _exclusion_radii(
    kind: np.ndarray, peak_sci: np.ndarray, r_eff: np.ndarray, psf: dict, sigma: float
) -> np.ndarray:
    """How far an empty-sky transient keeps from each static source (science pixels)."""
    fwhm = psf["fwhm"] * (1.0 + abs(psf["variation"]))
    star = np.maximum(_stamp_size(peak_sci, 0.3 * sigma, psf, 1) / 2.0, 3.0 * fwhm)
    galaxy = 5.0 * np.nan_to_num(r_eff) + 2.0 * fwhm
    return np.where(kind == "galaxy", galaxy, star)


def _place_transients(
    rng: np.random.Generator,
    n: int,
    n_on_galaxy: int,
    *,
    shape: tuple[int, int],
    sources: Table,
    galaxies: list[dict[str, float]],
    radii: np.ndarray,
    min_sep: float,
    wcs_sci: WCS,
    wcs_ref: WCS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Science-pixel positions and host rows (-1 for empty sky) of ``n`` transients."""
    xs: list[float] = []
    ys: list[float] = []
    hosts: list[int] = []

    def accept(x: float, y: float) -> bool:
        if not _inside(np.array([x]), np.array([y]), shape, _EDGE)[0]:
            return False
        xr, yr = _map_pixels(wcs_sci, wcs_ref, np.array([x]), np.array([y]))
        if not _inside(xr, yr, shape, _EDGE)[0]:
            return False
        return not xs or np.min(np.hypot(np.array(xs) - x, np.array(ys) - y)) >= min_sep

    gal_rows = np.flatnonzero(np.asarray(sources["kind"]) == "galaxy")
    gal_index = {int(row): i for i, row in enumerate(gal_rows)}
    order = rng.permutation(gal_rows)
    for row in order:
        if len(hosts) >= n_on_galaxy:
            break
        gal = galaxies[gal_index[int(row)]]
        t = rng.uniform(0.5, 1.5) * gal["r_eff"]
        phi = rng.uniform(0.0, 2.0 * np.pi)
        a, b = t * np.cos(phi), t * gal["axis_ratio"] * np.sin(phi)
        ct, st = np.cos(gal["theta"]), np.sin(gal["theta"])
        xr = sources["x_ref"][row] + a * ct - b * st
        yr = sources["y_ref"][row] + a * st + b * ct
        x, y = _map_pixels(wcs_ref, wcs_sci, np.array([xr]), np.array([yr]))
        if accept(float(x[0]), float(y[0])):
            xs.append(float(x[0]))
            ys.append(float(y[0]))
            hosts.append(int(row))

    sx, sy = np.asarray(sources["x_sci"], float), np.asarray(sources["y_sci"], float)
    ny, nx = shape
    for _ in range(200):
        if len(xs) >= n:
            break
        cx = rng.uniform(_EDGE, nx - 1 - _EDGE, 64)
        cy = rng.uniform(_EDGE, ny - 1 - _EDGE, 64)
        if sx.size:
            d = np.hypot(cx[:, None] - sx[None, :], cy[:, None] - sy[None, :]) - radii[None, :]
            free = d.min(axis=1) >= 0
            cx, cy = cx[free], cy[free]
        for x, y in zip(cx, cy, strict=True):
            if len(xs) < n and accept(float(x), float(y)):
                xs.append(float(x))
                ys.append(float(y))
                hosts.append(-1)
    if len(xs) < n:
        raise ValueError(
            f"could place only {len(xs)} of n_transients={n} transients on empty sky at least "
            f"{_EDGE} px from the edges: lower n_transients or n_stars, or enlarge shape"
        )
    return np.array(xs), np.array(ys), np.array(hosts, dtype=np.int64)


def _sources_table(
    kind: list[str],
    x_ref: np.ndarray,
    y_ref: np.ndarray,
    flux_ref: np.ndarray,
    flux_scale: float,
    galaxies: list[dict[str, float]],
    wcs_ref: WCS,
    wcs_sci: WCS,
) -> Table:
    ra, dec = wcs_ref.pixel_to_world_values(x_ref, y_ref)
    x_sci, y_sci = wcs_sci.world_to_pixel_values(ra, dec)
    table = Table(
        {
            "id": np.arange(len(kind), dtype=np.int64),
            "kind": np.array(kind, dtype="U14"),
            "x_ref": x_ref,
            "y_ref": y_ref,
            "x_sci": np.asarray(x_sci, float),
            "y_sci": np.asarray(y_sci, float),
            "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float),
            "flux_ref": flux_ref,
            "flux_sci": flux_scale * flux_ref,
        }
    )
    is_gal = table["kind"] == "galaxy"
    for key in ("r_eff", "r_eff_bulge", "bulge_fraction", "axis_ratio", "theta"):
        col = np.full(len(table), np.nan)
        col[is_gal] = [g[key] for g in galaxies]
        table[key] = col
    return table


def _empty_truth() -> Table:
    return Table({name: np.zeros(0, dtype=dtype) for name, dtype in _TRUTH_COLUMNS})


def _artefact_table(rows: list[tuple[str, str, float, float, float]]) -> Table:
    kind, epoch, x, y, length = zip(*rows, strict=True) if rows else ((),) * 5
    return Table(
        {
            "kind": np.array(kind, dtype="U14"),
            "epoch": np.array(epoch, dtype="U9"),
            "x_sci": np.array(x, dtype=float),
            "y_sci": np.array(y, dtype=float),
            "length": np.array(length, dtype=float),
        }
    )


def _run_length(mask: np.ndarray, x: float, y: float) -> float:
    """Length of the masked run in column round(x) that contains row round(y)."""
    ix, iy = _round(x), _round(y)
    ny, nx = mask.shape
    if not (0 <= ix < nx and 0 <= iy < ny and mask[iy, ix]):
        return 0.0
    col = mask[:, ix]
    lo = iy - np.argmin(col[iy::-1]) if not col[: iy + 1].all() else -1
    hi = iy + np.argmin(col[iy:]) if not col[iy:].all() else ny
    return float(hi - lo - 1)


def _make_image(
    data: np.ndarray, mask: np.ndarray, epoch: _Epoch, *, saturation: float, seed: int
) -> Image:
    exptime = _EXPTIME * epoch.n_exposures
    header = epoch.wcs.to_header()
    header["GAIN"] = (epoch.gain, "[e-/ADU] effective gain")
    header["RDNOISE"] = (epoch.read_noise, "[e-] effective read noise")
    header["SATURATE"] = (saturation, "[ADU] saturation level")
    header["EXPTIME"] = (exptime, "[s] exposure time")
    header["FILTER"] = "r"
    header["MJD-OBS"] = epoch.mjd
    header["SKYLEVEL"] = (epoch.sky, "[ADU] simulated sky level (not subtracted)")
    header["NCOMBINE"] = (epoch.n_exposures, "exposures averaged")
    meta = {
        "simulated": True,
        "seed": seed,
        "epoch": epoch.name,
        "sky": epoch.sky,
        "sigma_bkg": epoch.sigma,
        "psf": epoch.psf,
        "flux_scale": epoch.flux_scale,
        "n_exposures": epoch.n_exposures,
    }
    return Image(
        data=data.astype(np.float32),
        wcs=epoch.wcs,
        gain=epoch.gain,
        read_noise=epoch.read_noise,
        saturation=saturation,
        exptime=exptime,
        band="r",
        mjd=epoch.mjd,
        header=fits.Header(header),
        mask=mask,
        meta=meta,
    )


def _check_args(shape: tuple[int, int], transient_snr: tuple[float, float], **fracs: float):
    if len(shape) != 2 or min(shape) < 2 * _EDGE + 8:
        raise ValueError(f"shape={shape!r}: need (ny, nx), each at least {2 * _EDGE + 8} pixels")
    lo, hi = transient_snr
    if not 0 < lo <= hi:
        raise ValueError(f"transient_snr={transient_snr!r}: need 0 < low <= high")
    for name, value in fracs.items():
        if not 0 <= value <= 1:
            raise ValueError(f"{name}={value!r}: a fraction must lie in [0, 1]")


@dataclass(frozen=True)
class _Epoch:
    """What differs between the two epochs: grid, PSF, sky, detector and photometric scale."""

    name: str
    suffix: str
    wcs: WCS
    psf: dict[str, Any]
    sky: float
    gain: float
    read_noise: float
    flux_scale: float
    n_exposures: float
    mjd: float

    @property
    def sigma(self) -> float:
        return background_sigma(self.sky, self.gain, self.read_noise)


def _central_psf(psf: dict[str, Any]) -> np.ndarray:
    return moffat_psf(psf["size"], psf["fwhm"], psf["beta"], psf["ellipticity"], psf["angle"])


def _static_sources(
    rngs: dict[str, np.random.Generator],
    shape: tuple[int, int],
    ref: _Epoch,
    sci: _Epoch,
    *,
    n_stars: int,
    n_galaxies: int,
    saturated_stars: int,
    saturation: float,
    pad: int,
) -> tuple[Table, list[dict[str, float]]]:
    """Stars, very bright (bleeding) stars and galaxies, drawn in reference pixels."""
    f_min = 2.0 * ref.sigma * np.sqrt(effective_pixels(_central_psf(ref.psf)))
    f_sat = (saturation - ref.sky) / _peak_fraction(ref.psf)
    sx, sy, sf = _draw_stars(rngs["stars"], n_stars, shape, pad, f_min, f_sat)
    gx, gy, gf, galaxies = _draw_galaxies(rngs["galaxies"], n_galaxies, shape, pad, ref.sigma)
    r_sat = rngs["saturated"]
    bx, by = _map_pixels(
        sci.wcs,
        ref.wcs,
        r_sat.uniform(40, shape[1] - 41, saturated_stars),
        r_sat.uniform(40, shape[0] - 41, saturated_stars),
    )
    peak = saturation * np.exp(r_sat.uniform(np.log(5.0), np.log(30.0), saturated_stars))
    bf = peak / (sci.flux_scale * _peak_fraction(sci.psf))
    kinds = ["star"] * sx.size + ["saturated_star"] * saturated_stars + ["galaxy"] * gx.size
    table = _sources_table(
        kinds,
        np.concatenate([sx, bx, gx]),
        np.concatenate([sy, by, gy]),
        np.concatenate([sf, bf, gf]),
        sci.flux_scale,
        galaxies,
        ref.wcs,
        sci.wcs,
    )
    return table, galaxies


def _transients(
    rng: np.random.Generator,
    n: int,
    shape: tuple[int, int],
    ref: _Epoch,
    sci: _Epoch,
    *,
    sources: Table,
    galaxies: list[dict[str, float]],
    snr_range: tuple[float, float],
    n_fading: int,
    n_on_galaxy: int,
    min_sep: float,
) -> Table:
    """Place transients, draw their S/N and turn it into fluxes with the local science PSF."""
    if n == 0:
        return _empty_truth()
    is_point = sources["kind"] != "galaxy"
    peak = np.where(is_point, sources["flux_sci"] * _peak_fraction(sci.psf), 0.0)
    radii = _exclusion_radii(
        np.asarray(sources["kind"]), peak, np.asarray(sources["r_eff"]), sci.psf, sci.sigma
    )
    x, y, hosts = _place_transients(
        rng,
        n,
        n_on_galaxy,
        shape=shape,
        sources=sources,
        galaxies=galaxies,
        radii=radii,
        min_sep=min_sep,
        wcs_sci=sci.wcs,
        wcs_ref=ref.wcs,
    )
    perm = rng.permutation(n)
    x, y, hosts = x[perm], y[perm], hosts[perm]
    snr = np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]), n))
    sign = np.ones(n, dtype=np.int64)
    sign[rng.permutation(n)[:n_fading]] = -1
    fwhm = _fwhm_field(sci.psf, x, y)
    psf = sci.psf
    n_eff = np.array(
        [
            effective_pixels(
                moffat_psf(psf["size"], w, psf["beta"], psf["ellipticity"], psf["angle"])
            )
            for w in fwhm
        ]
    )
    flux = snr * sci.sigma * np.sqrt(n_eff)
    x_ref, y_ref = _map_pixels(sci.wcs, ref.wcs, x, y)
    ra, dec = sci.wcs.pixel_to_world_values(x, y)
    return Table(
        {
            "id": np.arange(n, dtype=np.int64),
            "x_sci": x,
            "y_sci": y,
            "x_ref": x_ref,
            "y_ref": y_ref,
            "ra": np.asarray(ra, float),
            "dec": np.asarray(dec, float),
            "flux_sci": flux,
            "flux_ref": np.where(sign < 0, flux / sci.flux_scale, 0.0),
            "flux_diff": sign * flux,
            "snr_injected": snr,
            "sign": sign,
            "on_galaxy": hosts >= 0,
            "host_id": hosts,
            "fwhm_sci": fwhm,
        }
    )


def _expected_image(
    shape: tuple[int, int],
    epoch: _Epoch,
    ref: _Epoch,
    sources: Table,
    galaxies: list[dict[str, float]],
    truth: Table,
) -> np.ndarray:
    """Noise-free image of one epoch (ADU, sky included): stars, galaxies, its transients."""
    s, psf = epoch.suffix, epoch.psf
    model = np.full(shape, epoch.sky)
    pts = sources[sources["kind"] != "galaxy"]
    flux = epoch.flux_scale * np.asarray(pts["flux_ref"])
    sizes = _stamp_size(flux * _peak_fraction(psf), 0.1 * epoch.sigma, psf, psf["size"])
    _render_points(model, np.asarray(pts[f"x_{s}"]), np.asarray(pts[f"y_{s}"]), flux, psf, sizes)
    gal = sources[sources["kind"] == "galaxy"]
    gx, gy = np.asarray(gal[f"x_{s}"]), np.asarray(gal[f"y_{s}"])
    jacobians = [_jacobian(epoch.wcs, ref.wcs, x, y) for x, y in zip(gx, gy, strict=True)]
    flux = epoch.flux_scale * np.asarray(gal["flux_ref"])
    _render_galaxies(model, galaxies, gx, gy, flux, psf, jacobians)
    here = truth[truth["sign"] == (1 if epoch.name == "science" else -1)]
    _render_points(
        model,
        np.asarray(here[f"x_{s}"]),
        np.asarray(here[f"y_{s}"]),
        np.asarray(here[f"flux_{s}"]),
        psf,
        np.full(len(here), psf["size"]),
    )
    return model


def _cosmic_ray_rows(
    crs: list[tuple[float, float, float]], epoch: _Epoch, sci: _Epoch
) -> list[tuple[str, str, float, float, float]]:
    """Artefact rows of one epoch's cosmic rays, positions in science pixels."""
    if not crs:
        return []
    x, y, length = (np.array(v) for v in zip(*crs, strict=True))
    if epoch is not sci:
        x, y = _map_pixels(epoch.wcs, sci.wcs, x, y)
    return [("cosmic_ray", epoch.name, *r) for r in zip(x, y, length, strict=True)]


# --------------------------------------------------------------------------------------------
# Public API


def simulate_pair(
    shape: tuple[int, int] = (1024, 1024),
    *,
    seed: int = 0,
    n_stars: int = 600,
    n_galaxies: int = 150,
    n_transients: int = 60,
    fwhm_reference: float = 3.0,
    fwhm_science: float = 4.2,
    beta_reference: float = 4.0,
    beta_science: float = 2.8,
    ellipticity_science: float = 0.08,
    sky_reference: float = 300.0,
    sky_science: float = 600.0,
    gain: float = 4.0,
    read_noise: float = 6.0,
    saturation: float = 60000.0,
    flux_scale: float = 0.8,
    reference_depth: float = 4.0,
    shift: tuple[float, float] = (3.3, -2.7),
    rotation_deg: float = 0.3,
    psf_variation: float = 0.1,
    cosmic_rays: int = 40,
    bad_columns: int = 2,
    saturated_stars: int = 3,
    transient_snr: tuple[float, float] = (3.0, 30.0),
    fading_fraction: float = 0.1,
    on_galaxy_fraction: float = 0.4,
    same_grid: bool = False,
    noise: bool = True,
) -> SimulatedPair:
    """Simulate a reference/science pair of one field with known transients and artefacts.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)`` of both images.
    seed : int
        Seed of every random draw; the same seed gives the same pair.
    n_stars, n_galaxies : int
        Expected numbers of stars and galaxies centred on the reference frame (a few more are
        scattered just outside so edges are filled). Star counts follow N(>F) ~ F^-0.75 from
        S/N ~ 2 in the reference, plus ``max(1, n_stars // 100)`` stars near saturation.
        Galaxies are bulge (Sersic n=4) + disc (n=1) mixtures, disc r_eff 2-8 px.
    n_transients : int
        Point sources that differ between the epochs.
    fwhm_reference, fwhm_science : float
        Moffat FWHM (pixels, major axis) at the frame centre.
    beta_reference, beta_science : float
        Moffat beta of each epoch.
    ellipticity_science : float
        PSF ellipticity ``1 - b/a`` of the science epoch (its angle is random); the reference
        PSF is round.
    sky_reference, sky_science : float
        Sky levels (ADU), left in the data and recorded in ``meta["sky"]``.
    gain : float
        Electrons per ADU of one exposure.
    read_noise : float
        Read noise of one exposure, electrons.
    saturation : float
        ADU level where pixels saturate: the excess bleeds along the column, pixels are clipped
        to this value and masked.
    flux_scale : float
        Science flux per unit reference flux (transparency, exposure, zero point).
    reference_depth : float
        The reference is the mean of this many exposures: effective gain ``gain * depth``,
        effective read noise ``read_noise * sqrt(depth)``, so all its noise variance is
        ``depth`` times lower. ``exptime`` is scaled likewise.
    shift : tuple of float
        ``(dx, dy)`` pixels: a sky point at reference pixel ``p`` lies at science pixel
        ``c + R(rotation_deg) (p - c) + shift`` (``c`` the frame centre, R counter-clockwise).
    rotation_deg : float
        Rotation of the science grid, degrees.
    psf_variation : float
        Fractional FWHM change across the frame: linear along a random direction per epoch,
        ``fwhm * (1 +/- psf_variation)`` at opposite extreme corners (see :func:`fwhm_at`).
    cosmic_rays : int
        Cosmic-ray hits (1-3 pixel hits and tracks of 3-20 px) in the science image; the
        reference gets ``cosmic_rays // 4`` (a clipped stack keeps few). Not masked.
    bad_columns : int
        Science columns stuck at ``saturation`` or 0 from a random row to a frame edge; masked.
    saturated_stars : int
        Extra very bright static stars (science peak 5-30 x saturation) that bleed.
    transient_snr : tuple of float
        Range of injected S/N, ``F / (sigma_bkg sqrt(N_eff))`` with the science background
        noise and the local science PSF; drawn log-uniformly.
    fading_fraction : float
        Fraction of transients present in the reference only (``sign = -1``).
    on_galaxy_fraction : float
        Fraction placed on galaxies, at 0.5-1.5 effective radii along the galaxy's elliptical
        isophote; the rest (and any that find no host) go on empty sky away from stars and
        galaxies. All transients keep 20 px from the edges of both frames.
    same_grid : bool
        Give the science image the reference WCS (no shift or rotation).
    noise : bool
        False gives the expected images (no photon or read noise): for exact truth checks.

    Returns
    -------
    SimulatedPair
        The images, the truth, the central PSFs, the static sources and the artefacts.
    """
    params = {k: v for k, v in locals().items() if k != "params"}
    shape = (int(shape[0]), int(shape[1]))
    _check_args(
        shape,
        transient_snr,
        fading_fraction=fading_fraction,
        on_galaxy_fraction=on_galaxy_fraction,
        psf_variation=psf_variation,
    )
    if reference_depth <= 0 or gain <= 0 or flux_scale <= 0:
        raise ValueError("gain, flux_scale and reference_depth must be positive")
    seeds = np.random.SeedSequence(seed).spawn(len(_STREAMS))
    rngs = {name: np.random.default_rng(s) for name, s in zip(_STREAMS, seeds, strict=True)}
    if same_grid:
        shift, rotation_deg = (0.0, 0.0), 0.0
    fwhm_max = max(fwhm_science, fwhm_reference) * (1.0 + psf_variation)
    size = max(25, int(np.ceil(10.0 * fwhm_max)) // 2 * 2 + 1)
    dir_ref, dir_sci, angle_sci = rngs["psf"].uniform(0.0, [2.0 * np.pi, 2.0 * np.pi, np.pi])
    # The reference is the mean of reference_depth exposures: effective gain and read noise.
    ref = _Epoch(
        name="reference",
        suffix="ref",
        wcs=_make_wcs(shape, (0.0, 0.0), 0.0),
        psf=_psf_field(
            shape, fwhm_reference, beta_reference, 0.0, 0.0, psf_variation, dir_ref, size
        ),
        sky=float(sky_reference),
        gain=gain * reference_depth,
        read_noise=read_noise * float(np.sqrt(reference_depth)),
        flux_scale=1.0,
        n_exposures=float(reference_depth),
        mjd=_MJD_REFERENCE,
    )
    sci = _Epoch(
        name="science",
        suffix="sci",
        wcs=_make_wcs(shape, shift, rotation_deg),
        psf=_psf_field(
            shape,
            fwhm_science,
            beta_science,
            ellipticity_science,
            angle_sci,
            psf_variation,
            dir_sci,
            size,
        ),
        sky=float(sky_science),
        gain=float(gain),
        read_noise=float(read_noise),
        flux_scale=float(flux_scale),
        n_exposures=1.0,
        mjd=_MJD_SCIENCE,
    )
    sources, galaxies = _static_sources(
        rngs,
        shape,
        ref,
        sci,
        n_stars=n_stars,
        n_galaxies=n_galaxies,
        saturated_stars=saturated_stars,
        saturation=saturation,
        pad=_pad(shape, shift, rotation_deg),
    )
    truth = _transients(
        rngs["transients"],
        n_transients,
        shape,
        ref,
        sci,
        sources=sources,
        galaxies=galaxies,
        snr_range=transient_snr,
        n_fading=round(fading_fraction * n_transients),
        n_on_galaxy=round(on_galaxy_fraction * n_transients),
        min_sep=3.0 * fwhm_max,
    )
    images, rows = {}, []
    for epoch, n_cr in ((sci, cosmic_rays), (ref, cosmic_rays // 4)):
        model = _expected_image(shape, epoch, ref, sources, galaxies, truth)
        data, mask, crs = _detect(
            model,
            gain=epoch.gain,
            read_noise=epoch.read_noise,
            saturation=saturation,
            noise=noise,
            rng=rngs[f"noise_{epoch.name}"],
            cosmic_rays=n_cr,
            cr_rng=rngs[f"cr_{epoch.name}"],
            sigma=epoch.sigma,
        )
        rows += _cosmic_ray_rows(crs, epoch, sci)
        if epoch is sci:
            cols = _add_bad_columns(data, mask, bad_columns, saturation, rngs["columns"])
            rows += [("bad_column", "science", x, y, n) for x, y, n in cols]
            rows += [
                ("saturated_star", "science", r["x_sci"], r["y_sci"],
                 _run_length(mask, r["x_sci"], r["y_sci"]))
                for r in sources[sources["kind"] == "saturated_star"]
            ]  # fmt: skip
        images[epoch.name] = _make_image(data, mask, epoch, saturation=saturation, seed=seed)
    return SimulatedPair(
        science=images["science"],
        reference=images["reference"],
        truth=truth,
        psf_science=_central_psf(sci.psf),
        psf_reference=_central_psf(ref.psf),
        sources=sources,
        artefacts=_artefact_table(rows),
        params=params,
    )


def pure_noise_pair(
    shape: tuple[int, int] = (512, 512),
    *,
    seed: int = 0,
    sky: float = 500.0,
    gain: float = 4.0,
    read_noise: float = 5.0,
    fwhm_science: float = 4.0,
    fwhm_reference: float = 3.0,
) -> SimulatedPair:
    """Two single exposures of empty sky on the same grid: no sources, no artefacts.

    Both epochs have sky ``sky`` (ADU, kept in the data), the same gain and read noise, and
    round, spatially constant Moffat PSFs (reported in ``psf_science``/``psf_reference`` for
    the differencing); for checking that a score image has zero mean and unit variance.

    Parameters
    ----------
    shape : tuple of int
        ``(ny, nx)``.
    seed : int
        Seed of the noise.
    sky : float
        Sky level of both epochs, ADU.
    gain : float
        Electrons per ADU.
    read_noise : float
        Read noise, electrons.
    fwhm_science, fwhm_reference : float
        PSF FWHM of each epoch, pixels.

    Returns
    -------
    SimulatedPair
        With empty ``truth``, ``sources`` and ``artefacts`` tables.
    """
    return simulate_pair(
        shape,
        seed=seed,
        n_stars=0,
        n_galaxies=0,
        n_transients=0,
        fwhm_reference=fwhm_reference,
        fwhm_science=fwhm_science,
        ellipticity_science=0.0,
        sky_reference=sky,
        sky_science=sky,
        gain=gain,
        read_noise=read_noise,
        flux_scale=1.0,
        reference_depth=1.0,
        psf_variation=0.0,
        cosmic_rays=0,
        bad_columns=0,
        saturated_stars=0,
        same_grid=True,
    )


def _shifted_stamp(psf: np.ndarray, fx: float, fy: float) -> np.ndarray:
    """``psf`` moved by a sub-pixel (fx, fy) with a cubic spline, renormalised to sum 1."""
    stamp = ndimage.shift(psf, (fy, fx), order=3, mode="constant", prefilter=True)
    return stamp / stamp.sum()


def inject_fakes(
    image: Image,
    psf: np.ndarray,
    positions: np.ndarray,
    fluxes: np.ndarray,
    *,
    seed: int = 0,
    poisson: bool = True,
) -> Image:
    """Add fake point sources to a copy of an image (for completeness measurements).

    Each fake is the PSF stamp moved to its sub-pixel position (cubic-spline shift,
    renormalised to sum 1) times its flux. With ``poisson`` the fake's own photon noise is
    added: its expected electrons (flux x gain) are Poisson-sampled and converted back with the
    image's gain; the image's existing noise is left as it is. Pixels pushed above the
    saturation level are clipped to it and masked. Parts of a stamp beyond the frame are lost.

    Parameters
    ----------
    image : Image
        The image to copy; it is not modified.
    psf : 2D ndarray, shape (m, n), m and n odd
        PSF stamp centred on its central pixel (any normalisation).
    positions : ndarray, shape (N, 2)
        0-based pixel ``(x, y)`` of each fake.
    fluxes : ndarray, shape (N,)
        Total flux of each fake, ADU (must be >= 0 when ``poisson``).
    seed : int
        Seed of the photon noise.
    poisson : bool
        Add the fakes' photon noise.

    Returns
    -------
    Image
        A copy with the fakes added (``data`` float32, ``mask`` copied and updated).
    """
    psf = np.asarray(psf, dtype=float)
    positions = np.atleast_2d(np.asarray(positions, dtype=float))
    fluxes = np.atleast_1d(np.asarray(fluxes, dtype=float))
    if psf.ndim != 2 or psf.shape[0] % 2 == 0 or psf.shape[1] % 2 == 0:
        raise ValueError(f"psf has shape {psf.shape}: need a 2-D stamp with odd sides")
    if positions.shape != (fluxes.size, 2):
        raise ValueError(
            f"positions has shape {positions.shape} but fluxes has {fluxes.size} values: "
            "need positions of shape (N, 2) as (x, y) and N fluxes"
        )
    if poisson and np.any(fluxes < 0):
        raise ValueError("negative fluxes cannot carry Poisson noise: pass poisson=False")
    rng = np.random.default_rng(seed)
    added = np.zeros(image.shape)
    hy, hx = psf.shape[0] // 2, psf.shape[1] // 2
    for (x, y), flux in zip(positions, fluxes, strict=True):
        ix, iy = _round(x), _round(y)
        stamp = flux * _shifted_stamp(psf, x - ix, y - iy)
        if poisson:
            stamp = rng.poisson(np.clip(stamp, 0.0, None) * image.gain) / image.gain
        _add_stamp(added, stamp, ix - hx, iy - hy)
    data = image.data.astype(float) + added
    mask = np.zeros(image.shape, bool) if image.mask is None else image.mask.copy()
    if np.isfinite(image.saturation):
        over = (data >= image.saturation) & (added != 0)
        data[over] = image.saturation
        mask |= over
    return image.with_data(
        data.astype(np.float32),
        mask=mask if (image.mask is not None or mask.any()) else None,
        header=image.header.copy(),
        meta=dict(image.meta),
    )
