"""Flux scale between two epochs from aperture photometry of the same stars."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ScienceError
from pipeline.science.photometry import aperture_fraction, flux_scale

SHAPE = (256, 256)
SIGMA_SCI, SIGMA_REF = 10.0, 4.0
RATIO = 0.7


@pytest.fixture(scope="module")
def stars(grid_positions, render_stars):
    """49 stars of 5e3 to 1e5 ADU, rendered noise-free with a FWHM of 3 and of 4.5 px."""
    rng = np.random.default_rng(0)
    x, y = grid_positions(SHAPE, 32.0, margin=32.0, jitter=2.0, seed=0)
    flux = np.exp(rng.uniform(np.log(5e3), np.log(1e5), x.size))
    narrow = render_stars(SHAPE, x, y, flux, 3.0, half=15)
    wide = render_stars(SHAPE, x, y, flux, 4.5, half=15)
    return x, y, flux, narrow, wide


def measure(science, reference, x, y, seed, **kwargs):
    rng = np.random.default_rng(seed)
    return flux_scale(
        science + rng.normal(0, SIGMA_SCI, SHAPE),
        reference + rng.normal(0, SIGMA_REF, SHAPE),
        x,
        y,
        radius=12.0,
        rms_science=SIGMA_SCI,
        rms_reference=SIGMA_REF,
        **kwargs,
    )


def test_flux_scale_is_unbiased_and_its_error_is_honest(stars) -> None:
    x, y, _, narrow, _ = stars
    results = [measure(RATIO * narrow, narrow, x, y, seed) for seed in range(30)]
    ratios = np.array([r.ratio for r in results])
    errors = np.array([r.error for r in results])
    pulls = (ratios - RATIO) / errors
    assert abs(np.mean(ratios) / RATIO - 1) < 0.001
    assert abs(np.mean(pulls)) < 0.5
    assert 0.7 < np.std(pulls) < 1.3
    assert all(r.n_stars >= 40 for r in results)
    scatter = np.array([r.scatter for r in results])
    assert np.median(scatter) < 0.002 and scatter.max() < 0.01  # no excess scatter to find


def test_flux_scale_between_different_psfs_is_within_one_percent(stars) -> None:
    x, y, _, narrow, wide = stars
    result = measure(RATIO * wide, narrow, x, y, seed=1)
    assert result.ratio == pytest.approx(RATIO, rel=0.01)


def test_aperture_correction_removes_the_psf_bias(stars, render_stars) -> None:
    x, y, _, narrow, wide = stars
    # the same stars as a PSF: one unit-flux star rendered alone with each width
    one_narrow = render_stars(
        (31, 31), np.array([15.0]), np.array([15.0]), np.array([1.0]), 3.0, half=15
    )
    one_wide = render_stars(
        (31, 31), np.array([15.0]), np.array([15.0]), np.array([1.0]), 4.5, half=15
    )
    correction = aperture_fraction(one_narrow, 12.0) / aperture_fraction(one_wide, 12.0)
    assert correction > 1.005  # the wide PSF loses more light outside 12 px
    result = measure(RATIO * wide, narrow, x, y, seed=1, aperture_correction=correction)
    assert abs(result.ratio - RATIO) < 3 * result.error


def test_scatter_measures_star_to_star_flux_errors(stars, render_stars) -> None:
    x, y, flux, narrow, _ = stars
    jitter = 1 + 0.03 * np.random.default_rng(7).standard_normal(x.size)
    science = render_stars(SHAPE, x, y, RATIO * flux * jitter, 3.0, half=15)
    result = measure(science, narrow, x, y, seed=2)
    assert result.scatter == pytest.approx(0.03, abs=0.015)
    assert result.ratio == pytest.approx(RATIO, rel=0.03)


def test_stars_touching_masked_pixels_are_skipped(stars) -> None:
    x, y, _, narrow, _ = stars
    mask = np.zeros(SHAPE, dtype=bool)
    mask[:, : SHAPE[1] // 2] = True  # half the stars lose pixels in their aperture
    full = measure(RATIO * narrow, narrow, x, y, seed=3)
    half = measure(RATIO * narrow, narrow, x, y, seed=3, mask=mask)
    assert half.n_stars < 0.6 * full.n_stars
    assert half.ratio == pytest.approx(RATIO, rel=0.005)


def test_too_few_bright_stars_are_refused(stars) -> None:
    x, y, _, narrow, _ = stars
    with pytest.raises(ScienceError, match="only 2 stars are bright enough"):
        measure(RATIO * narrow, narrow, x[:2], y[:2], seed=4)
