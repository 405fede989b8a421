"""Empirical PSF models: shape recovered from stars, spatial variation, normalisation, errors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ScienceError
from pipeline.science.psf import build_psf, choose_degree, measure_fwhm, psf_stamp_size
from pipeline.science.psfmodel import moffat_psf
from pipeline.science.sources import find_sources, select_stars

SIGMA = 5.0
SHAPE = (384, 384)


@pytest.fixture(scope="module")
def field(grid_positions, render_stars):
    """Render a jittered grid of 49 isolated stars (2e4 to 2e5 ADU) plus Gaussian noise."""

    def make(fwhm, seed: int, beta: float = 3.0):
        rng = np.random.default_rng(seed)
        x, y = grid_positions(SHAPE, 48.0, margin=48.0, jitter=3.0, seed=seed)
        flux = np.exp(rng.uniform(np.log(2e4), np.log(2e5), x.size))
        image = render_stars(SHAPE, x, y, flux, fwhm, beta=beta)
        image += rng.normal(0.0, SIGMA, SHAPE)
        data = image.astype(np.float32)
        return data, select_stars(find_sources(data, SIGMA), SHAPE)

    return make


def l1(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).sum())


def test_psf_of_constant_moffat_is_recovered(field) -> None:
    data, stars = field(3.5, seed=0)
    assert len(stars) == 49
    model = build_psf(data, stars)
    truth = moffat_psf(model.size, 3.5, 3.0)
    assert model.n_stars == 49
    assert model.size % 2 == 1 and model.size >= 25  # ~10 FWHM
    assert l1(model.global_stamp, truth) < 0.02
    assert model.fwhm == pytest.approx(measure_fwhm(truth), rel=0.03)
    assert model.model_error < 0.03
    # the constant model fits as well
    flat = build_psf(data, stars, degree=0)
    assert flat.degree == 0
    assert l1(flat.global_stamp, truth) < 0.02


def test_psf_model_follows_a_linear_fwhm_gradient(field) -> None:
    # FWHM 3 px at the left edge to 4 px at the right, constant along y
    data, stars = field(lambda x, y: 3.0 + x / (SHAPE[1] - 1), seed=1)
    model = build_psf(data, stars, degree=1)
    assert model.degree == 1
    cy = (SHAPE[0] - 1) / 2
    left, right = measure_fwhm(model.at(0, cy)), measure_fwhm(model.at(SHAPE[1] - 1, cy))
    true_left = measure_fwhm(moffat_psf(model.size, 3.0, 3.0))
    true_right = measure_fwhm(moffat_psf(model.size, 4.0, 3.0))
    # a model linear in the pixel values is not linear in FWHM, so the ends are a little
    # broad; the direction and size of the change must be right
    assert 0.6 * (true_right - true_left) < right - left < 1.6 * (true_right - true_left)
    cx = (SHAPE[1] - 1) / 2
    bottom, top = measure_fwhm(model.at(cx, 0)), measure_fwhm(model.at(cx, SHAPE[0] - 1))
    assert abs(top - bottom) < 0.05 * (true_right - true_left) + 0.05


def test_model_stamps_sum_to_one_everywhere(field) -> None:
    data, stars = field(3.5, seed=0)
    model = build_psf(data, stars, degree=2)
    for x, y in [(0, 0), (383, 0), (0, 383), (383, 383), (100.5, 250.25)]:
        stamp = model.at(x, y)
        assert stamp.dtype == np.float32
        assert stamp.shape == (model.size, model.size)
        assert float(stamp.sum()) == pytest.approx(1.0, abs=1e-5)
        assert np.unravel_index(np.argmax(stamp), stamp.shape) == (model.size // 2,) * 2


def test_too_few_stars_are_refused_with_a_reason(field) -> None:
    data, stars = field(3.5, seed=0)
    with pytest.raises(ScienceError, match=r"only 1 usable PSF stars.*at least 2 bright"):
        build_psf(data, stars[:1])
    edge = stars[:3].copy()
    edge["x"] = [2.0, 3.0, 380.0]  # stamps would run off the image
    with pytest.raises(ScienceError, match="PSF stars have clean"):
        build_psf(data, edge)


def test_stamp_size_is_about_ten_fwhm_and_odd() -> None:
    assert psf_stamp_size(3.0) == 31
    assert psf_stamp_size(1.0) == 15  # the minimum
    assert psf_stamp_size(20.0) == 81  # the maximum
    assert all(psf_stamp_size(f) % 2 == 1 for f in np.linspace(1, 10, 37))


def _gaussian(size: int, fwhm: float) -> np.ndarray:
    sigma = fwhm / 2.3548
    centre = (size - 1) / 2
    yy, xx = np.indices((size, size))
    return np.exp(-((xx - centre) ** 2 + (yy - centre) ** 2) / (2 * sigma**2))


@pytest.mark.parametrize("fwhm", [2.5, 3.5, 5.0])
def test_measure_fwhm_is_unbiased_on_small_stamps(fwhm: float) -> None:
    assert measure_fwhm(_gaussian(15, fwhm)) == pytest.approx(fwhm, rel=0.02)


@pytest.mark.parametrize("neighbour_flux", [0.0, 5e4])
def test_a_bright_neighbour_in_the_stamp_does_not_spoil_the_psf(
    grid_positions, render_stars, neighbour_flux: float
) -> None:
    rng = np.random.default_rng(0)
    shape = (320, 320)
    x, y = grid_positions(shape, 64.0, margin=32.0, jitter=2.0, seed=0)
    flux = np.full(x.size, 2e4)
    flux[[0, 5]] = 4e3
    # two of the 25 stars get a brighter neighbour 20 px away
    nx, ny = x[[0, 5]] + 16.0, y[[0, 5]] + 12.0
    both = np.r_[flux, [neighbour_flux] * 2]
    image = render_stars(shape, np.r_[x, nx], np.r_[y, ny], both, 3.0, beta=4.0)
    data = (image + rng.normal(0.0, SIGMA, shape)).astype(np.float32)
    stars = select_stars(find_sources(data, SIGMA), shape)
    assert len(stars) == 25 + (2 if neighbour_flux else 0)  # the faint two always in
    model = build_psf(data, stars, size=49, degree=0)  # 49: the size preprocess_pair used
    assert l1(model.global_stamp, moffat_psf(49, 3.0, 4.0)) < 0.1


def test_wings_of_faint_stars_follow_the_profile_not_the_noise(
    grid_positions, render_stars
) -> None:
    # only faint stars (S/N ~ 20-60): their outer rings are noise, which a bright star
    # convolved with the model would print as a ring in the difference
    rng = np.random.default_rng(7)
    fwhm, beta = 4.0, 2.8
    x, y = grid_positions(SHAPE, 64.0, margin=48.0, jitter=3.0, seed=7)
    flux = np.exp(rng.uniform(np.log(2e3), np.log(6e3), x.size))
    data = render_stars(SHAPE, x, y, flux, fwhm, beta=beta) + rng.normal(0.0, SIGMA, SHAPE)
    data = data.astype(np.float32)
    stars = select_stars(find_sources(data, SIGMA), SHAPE, min_snr=15.0)
    model = build_psf(data, stars, degree=0)
    truth = moffat_psf(model.size, fwhm, beta)
    centre = model.size // 2
    yy, xx = np.indices(truth.shape)
    radius = np.hypot(yy - centre, xx - centre)
    for r in (2.5 * fwhm, 3.0 * fwhm, 3.5 * fwhm, 4.5 * fwhm):
        ring = np.abs(radius - r) < 0.5
        ratio = model.global_stamp[ring].mean() / truth[ring].mean()
        assert 0.6 < ratio < 1.6, (r, ratio)
    rings = np.rint(radius).astype(int)
    means = np.bincount(rings.ravel(), model.global_stamp.ravel()) / np.bincount(rings.ravel())
    assert (means[: int(0.9 * centre)] > 0).all()  # no dark ring anywhere


def test_the_degree_is_the_one_the_stars_support(field) -> None:
    # a FWHM gradient across the field earns the linear terms; a constant PSF does not
    varying, stars = field(lambda x, y: 3.0 + x / (SHAPE[1] - 1), seed=1)
    assert build_psf(varying, stars).degree >= 1
    constant, stars = field(3.5, seed=0)
    assert build_psf(constant, stars).degree == 0
    # too few stars for the terms: the constant model, whatever they show
    assert build_psf(varying, stars[:5]).degree == 0


def test_choose_degree_predicts_each_star_from_the_others() -> None:
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, 300, 12), rng.uniform(0, 300, 12)
    widths = 3.0 + 1.5 * x / 300
    stamps = np.stack([moffat_psf(15, w, 3.0) for w in widths])
    stamps = stamps + rng.normal(0.0, 1e-4, stamps.shape)
    assert choose_degree(stamps, x, y, (300, 300), np.ones(12)) >= 1
    flat = np.stack([moffat_psf(15, 3.5, 3.0) for _ in widths])
    flat = flat + rng.normal(0.0, 1e-4, flat.shape)
    assert choose_degree(flat, x, y, (300, 300), np.ones(12)) == 0


def test_bright_neighbours_do_not_bend_the_spatial_terms() -> None:
    # In this pair (seed 3) six of the reference's 20 PSF stars hold brighter neighbours
    # in their 47-px stamps. The linear fit that started from every pixel bent its
    # spatial terms towards them, past the clipping: a quarter of the PSF's flux went
    # into false wings, and the flux ratio came out 0.58 instead of 0.8.
    from pipeline.science.photometry import aperture_fraction
    from pipeline.science.preprocessing import preprocess_pair
    from pipeline.science.simulate import simulate_pair

    sim = simulate_pair((1024, 1024), seed=3)
    pair = preprocess_pair(sim.science, sim.reference, psf_degree=1)
    psf = pair.psf_reference
    assert aperture_fraction(psf.global_stamp, 3.0 * psf.fwhm) > 0.97
    assert pair.flux.ratio == pytest.approx(0.8, rel=0.02)


def _bump_at(model, truth: np.ndarray, dx: float, dy: float) -> float:
    """The model's excess over the truth within 2 px of offset (dx, dy), over the truth there."""
    centre = model.size // 2
    yy, xx = np.indices(truth.shape)
    near = np.hypot(xx - centre - dx, yy - centre - dy) <= 2.0
    return float((model.global_stamp[near].sum() - truth[near].sum()) / truth[near].sum())


def test_a_faint_neighbour_of_the_brightest_star_stays_out_of_the_psf(
    grid_positions, render_stars, monkeypatch
) -> None:
    """The brightest star weighs most in the fit; a source in its wings that the extraction
    does not split from it (a transient beside it, above all) must not become part of the
    PSF, or the difference subtracts that source from itself."""
    from pipeline.science import psf as psf_module

    rng = np.random.default_rng(3)
    shape, fwhm, beta = (320, 320), 3.5, 3.0
    x, y = grid_positions(shape, 64.0, margin=32.0, jitter=2.0, seed=3)
    flux = np.full(x.size, 2e4)
    flux[12] = 5e5  # ten times the others' weight, a hundred times in the fit
    dx, dy = 9.0, 4.0  # about 2.8 FWHM out, beyond the central box that normalises a stamp
    image = render_stars(
        shape, np.r_[x, x[12] + dx], np.r_[y, y[12] + dy], np.r_[flux, 5e3], fwhm, beta=beta
    )
    data = (image + rng.normal(0.0, SIGMA, shape)).astype(np.float32)
    stars = select_stars(find_sources(data, SIGMA), shape)
    assert np.min(np.hypot(stars["x"] - x[12], stars["y"] - y[12])) < 1.0  # a PSF star
    model = build_psf(data, stars, size=41, degree=0)
    truth = moffat_psf(41, fwhm, beta)
    # 0.05 with no neighbour; what is left is the fainter stars' noise filling in
    assert abs(_bump_at(model, truth, dx, dy)) < 0.3
    # the failure it prevents: without the search, the neighbour is in the PSF
    monkeypatch.setattr(psf_module, "_neighbours", lambda stamp, fwhm: np.zeros(stamp.shape, bool))
    spoilt = build_psf(data, stars, size=41, degree=0)
    assert _bump_at(spoilt, truth, dx, dy) > 1.0  # the neighbour's light: 1.8 times the PSF
