"""Shared fixtures of the science tests: seeded star fields, WCSs, hand-built pairs, one run."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.science.detection import detect_candidates
from pipeline.science.differencing import Difference, difference_pair
from pipeline.science.photometry import FluxScale
from pipeline.science.preprocessing import PreprocessedPair, preprocess_pair
from pipeline.science.psf import PSFModel, measure_fwhm
from pipeline.science.psfmodel import moffat_psf
from pipeline.science.simulate import SimulatedPair, simulate_pair
from pipeline.science.validation import validate_candidates

PIXEL_SCALE = 0.263  # arcsec per pixel, as the simulator


def _tan_wcs(
    shape: tuple[int, int],
    *,
    shift: tuple[float, float] = (0.0, 0.0),
    rotation_deg: float = 0.0,
    scale_arcsec: float = PIXEL_SCALE,
    crval: tuple[float, float] = (150.1, 2.2),
) -> WCS:
    """TAN WCS: a sky point at pixel p of the unshifted grid lands at c + R (p - c) + shift."""
    ny, nx = shape
    theta = np.deg2rad(rotation_deg)
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = [(nx - 1) / 2 + 1 + shift[0], (ny - 1) / 2 + 1 + shift[1]]
    scale = scale_arcsec / 3600.0
    wcs.wcs.cd = np.array([[-scale, 0.0], [0.0, scale]]) @ rot.T
    wcs.pixel_shape = (nx, ny)
    wcs.wcs.set()
    return wcs


def _grid_positions(
    shape: tuple[int, int], step: float, *, margin: float, jitter: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) on a square grid, each moved by up to ``jitter`` pixels: isolated by construction."""
    rng = np.random.default_rng(seed)
    gx = np.arange(margin, shape[1] - margin + 1e-9, step)
    gy = np.arange(margin, shape[0] - margin + 1e-9, step)
    xx, yy = np.meshgrid(gx, gy)
    x = xx.ravel() + rng.uniform(-jitter, jitter, xx.size)
    y = yy.ravel() + rng.uniform(-jitter, jitter, xx.size)
    return x, y


def _render_stars(
    shape: tuple[int, int],
    x: np.ndarray,
    y: np.ndarray,
    flux: np.ndarray,
    fwhm: float | Callable[[float, float], float],
    *,
    beta: float = 3.0,
    half: int = 20,
) -> np.ndarray:
    """Noise-free image of pixel-integrated Moffat stars (sub-pixel centres), float64."""
    image = np.zeros(shape)
    ny, nx = shape
    for xi, yi, fi in zip(np.asarray(x), np.asarray(y), np.asarray(flux), strict=True):
        ix, iy = round(xi), round(yi)
        width = fwhm(xi, yi) if callable(fwhm) else fwhm
        stamp = fi * moffat_psf(2 * half + 1, width, beta, center=(half + xi - ix, half + yi - iy))
        y0, x0, size = iy - half, ix - half, 2 * half + 1
        ya, yb, xa, xb = max(y0, 0), min(y0 + size, ny), max(x0, 0), min(x0 + size, nx)
        image[ya:yb, xa:xb] += stamp[ya - y0 : yb - y0, xa - x0 : xb - x0]
    return image


def _constant_psf(stamp: np.ndarray, shape: tuple[int, int]) -> PSFModel:
    """A degree-0 PSF model holding a known stamp."""
    basis = (stamp / stamp.sum())[None].astype(np.float32)
    return PSFModel(basis, shape, n_stars=0, fwhm=measure_fwhm(stamp))


def _empty_sources() -> Table:
    return Table({name: np.zeros(0) for name in ("x", "y", "flux", "snr")})


def _make_pair(
    science: np.ndarray,
    reference: np.ndarray,
    *,
    psf_science: np.ndarray,
    psf_reference: np.ndarray,
    sigma_science: float,
    sigma_reference: float,
    gain: float = 1.0,
    mask: np.ndarray | None = None,
    wcs: WCS | None = None,
    reference_sources: Table | None = None,
    flux_ratio: float = 1.0,
) -> PreprocessedPair:
    """A PreprocessedPair from background-subtracted arrays and known PSFs (no preprocessing)."""
    shape = science.shape
    sci = np.asarray(science, dtype=np.float32)
    ref = np.asarray(reference, dtype=np.float32)
    sci_rms = np.full(shape, sigma_science, dtype=np.float32)
    ref_rms = np.full(shape, sigma_reference, dtype=np.float32)
    return PreprocessedPair(
        science=sci,
        reference=ref,
        science_rms=sci_rms,
        reference_rms=ref_rms,
        science_gain=float(gain),
        reference_gain=float(gain),
        mask=np.zeros(shape, dtype=np.uint8) if mask is None else mask.astype(np.uint8),
        psf_science=_constant_psf(psf_science, shape),
        psf_reference=_constant_psf(psf_reference, shape),
        flux=FluxScale(ratio=flux_ratio, error=0.0, scatter=0.0, n_stars=0),
        registration=None,
        wcs=_tan_wcs(shape) if wcs is None else wcs,
        reference_sources=_empty_sources() if reference_sources is None else reference_sources,
        science_sources=_empty_sources(),
    )


@dataclass
class PipelineRun:
    """A simulated pair and every product the pipeline made from it."""

    sim: SimulatedPair
    pair: PreprocessedPair
    diff: Difference
    candidates: Table
    validated: Table


@pytest.fixture(scope="session")
def pipeline_run() -> PipelineRun:
    """preprocess → difference → detect → validate on a 512² simulated pair (seed 3)."""
    sim = simulate_pair((512, 512), seed=3)
    pair = preprocess_pair(sim.science, sim.reference)
    diff = difference_pair(pair, backend="numpy")
    candidates = detect_candidates(diff, pair)
    validated = validate_candidates(
        candidates,
        psf_fwhm=measure_fwhm(diff.P_D),
        wcs=pair.wcs,
        reference_sources=pair.reference_sources,
    )
    return PipelineRun(sim, pair, diff, candidates, validated)


@pytest.fixture(scope="session")
def tan_wcs() -> Callable[..., WCS]:
    """Factory of TAN WCSs (see :func:`_tan_wcs`)."""
    return _tan_wcs


@pytest.fixture(scope="session")
def grid_positions() -> Callable[..., tuple[np.ndarray, np.ndarray]]:
    """Factory of jittered grid positions (see :func:`_grid_positions`)."""
    return _grid_positions


@pytest.fixture(scope="session")
def render_stars() -> Callable[..., np.ndarray]:
    """Renderer of noise-free Moffat star fields (see :func:`_render_stars`)."""
    return _render_stars


@pytest.fixture(scope="session")
def make_pair() -> Callable[..., PreprocessedPair]:
    """Builder of hand-made PreprocessedPairs (see :func:`_make_pair`)."""
    return _make_pair
