"""WCS refinement from matched stars, fast resampling against reproject, pixel maps."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from pipeline.errors import ScienceError
from pipeline.science.registration import (
    match_points,
    pixel_map,
    refine_wcs,
    reproject_to,
    resample,
)

SHAPE = (512, 512)


def star_lists(reference_wcs, science_wcs, n: int, noise: float, seed: int):
    """The same sky stars measured on both grids (centroid noise ``noise`` px), brightest first."""
    rng = np.random.default_rng(seed)
    xr, yr = rng.uniform(5, SHAPE[1] - 6, n), rng.uniform(5, SHAPE[0] - 6, n)
    xs, ys = science_wcs.world_to_pixel(reference_wcs.pixel_to_world(xr, yr))
    snr = np.sort(rng.uniform(20, 500, n))[::-1]
    ref = Table({"x": xr + rng.normal(0, noise, n), "y": yr + rng.normal(0, noise, n), "snr": snr})
    sci = Table({"x": xs + rng.normal(0, noise, n), "y": ys + rng.normal(0, noise, n), "snr": snr})
    inside = (sci["x"] > 0) & (sci["x"] < SHAPE[1] - 1) & (sci["y"] > 0) & (sci["y"] < SHAPE[0] - 1)
    return sci[inside], ref


def mapping_error(wcs, true_wcs, reference_wcs) -> np.ndarray:
    """Distance (reference px) between where two science WCSs put a grid of science pixels."""
    gy, gx = np.mgrid[0 : SHAPE[0] : 16, 0 : SHAPE[1] : 16]
    a = np.column_stack(reference_wcs.world_to_pixel(wcs.pixel_to_world(gx.ravel(), gy.ravel())))
    b = np.column_stack(
        reference_wcs.world_to_pixel(true_wcs.pixel_to_world(gx.ravel(), gy.ravel()))
    )
    return np.hypot(*(a - b).T)


@pytest.mark.parametrize(("shift", "rotation"), [((3.3, -2.7), 0.3), ((25.0, -18.0), 0.1)])
def test_refine_wcs_recovers_shift_and_rotation(tan_wcs, shift, rotation) -> None:
    reference = tan_wcs(SHAPE)
    truth = tan_wcs(SHAPE, shift=shift, rotation_deg=rotation)
    noise = 0.03
    sci, ref = star_lists(reference, truth, 150, noise, seed=0)
    # the science header claims the reference grid: off by the whole shift and rotation
    assert mapping_error(reference, truth, reference).max() > 3.0
    reg = refine_wcs(reference, sci, reference, ref)
    error = mapping_error(reg.wcs, truth, reference)
    assert np.sqrt(np.mean(error**2)) < 0.05
    assert reg.refined and reg.n_matched == len(sci)
    # the residual rms is the centroid noise of both lists: sqrt(2)·0.03 px per axis
    assert reg.rms == pytest.approx((np.sqrt(2) * noise,) * 2, rel=0.3)


def test_refine_wcs_weighs_matches_by_centroid_precision_and_drops_outliers(tan_wcs) -> None:
    # faint matches have noisy centroids (1/S/N), and a few bright sources (galaxies,
    # blends) have centroids that moved 0.3 px between the epochs on one side of the field
    reference = tan_wcs(SHAPE)
    truth = tan_wcs(SHAPE, shift=(4.2, -1.7), rotation_deg=0.2)
    rng = np.random.default_rng(5)
    n = 120
    xr, yr = rng.uniform(5, SHAPE[1] - 6, n), rng.uniform(5, SHAPE[0] - 6, n)
    xs, ys = truth.world_to_pixel(reference.pixel_to_world(xr, yr))
    snr = np.sort(np.exp(rng.uniform(np.log(8), np.log(2000), n)))[::-1]
    sigma = 1.0 / snr  # centroid error of a 2.4-px FWHM PSF, about FWHM / (2.4 S/N)
    moved = np.zeros(n, dtype=bool)
    moved[(xr > SHAPE[1] / 2) & (snr > 100)] = True
    moved &= np.cumsum(moved) <= 8
    sci = Table(
        {
            "x": xs + rng.normal(0, 1, n) * sigma + 0.3 * moved,
            "y": ys + rng.normal(0, 1, n) * sigma,
            "snr": snr,
        }
    )
    ref = Table(
        {"x": xr + rng.normal(0, 1, n) * sigma, "y": yr + rng.normal(0, 1, n) * sigma, "snr": snr}
    )
    reg = refine_wcs(reference, sci, reference, ref)
    error = mapping_error(reg.wcs, truth, reference)
    # an equal-weight fit of these lists is off by 0.04 px (rms) and 0.08 px at worst;
    # weighted and clipped, by 0.001 and 0.002
    assert np.sqrt(np.mean(error**2)) < 0.005
    assert error.max() < 0.01


def test_refine_wcs_astrometric_sigma_is_not_pinned_by_few_bright_stars(tan_wcs) -> None:
    # a sparse field (a 256² DECam cut-out has 14 matches): three bright stars carry
    # nearly all the weight of the affine correction, which then passes through them;
    # every centroid has a 0.3-px error its S/N does not tell (a galaxy, a blend)
    reference = tan_wcs(SHAPE)
    truth = tan_wcs(SHAPE, shift=(0.5, -0.2))
    snr = np.array([800, 400, 400, 120, 110, 100, 40, 30, 25, 20, 15, 12, 10, 9.0])
    rms = []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        n = len(snr)
        xr, yr = rng.uniform(5, SHAPE[1] - 6, n), rng.uniform(5, SHAPE[0] - 6, n)
        xs, ys = truth.world_to_pixel(reference.pixel_to_world(xr, yr))
        sci = Table({"x": xs + rng.normal(0, 0.3, n), "y": ys + rng.normal(0, 0.3, n), "snr": snr})
        ref = Table({"x": xr, "y": yr, "snr": snr})
        rms.append(refine_wcs(reference, sci, reference, ref).rms)
    # the bright stars' own residuals are ~0 there (median σ 0.12 px from them); their
    # leave-one-out residuals tell the 0.3 px (median 0.22 px: a MAD of 6 points)
    assert 0.18 < np.median(rms) < 0.45


def test_refine_wcs_refuses_too_few_matches(tan_wcs) -> None:
    reference = tan_wcs(SHAPE)
    sci, ref = star_lists(reference, tan_wcs(SHAPE, shift=(2.0, 1.0)), 5, 0.03, seed=1)
    with pytest.raises(ScienceError, match=r"only \d stars matched .*need 8"):
        refine_wcs(reference, sci, reference, ref)


def test_match_points_pairs_mutual_nearest_neighbours_within_radius() -> None:
    a = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0], [50.0, 50.0]])
    b = np.array([[0.5, 0.0], [10.4, 0.3], [10.6, 0.0], [53.0, 50.0]])
    ia, ib = match_points(a, b, radius=1.0)
    # (20, 0) has no partner within 1 px, (50, 50) is 3 px from its only neighbour,
    # and (10.6, 0) loses to (10.4, 0.3) because (10, 0) is nearer to the latter
    assert list(zip(ia, ib, strict=True)) == [(0, 0), (1, 1)]
    assert [len(v) for v in match_points(a, np.zeros((0, 2)), 1.0)] == [0, 0]


@pytest.fixture(scope="module")
def star_image(render_stars, grid_positions):
    """256² image of 36 stars (FWHM 4) on a sky of 100 ADU, and the grids it moves between."""
    rng = np.random.default_rng(1)
    x, y = grid_positions((256, 256), 40.0, margin=25.0, jitter=5.0, seed=1)
    flux = rng.uniform(1e3, 1e5, x.size)
    return 100.0 + render_stars((256, 256), x, y, flux, 4.0, half=12)


def test_resample_agrees_with_reproject(tan_wcs, star_image) -> None:
    shape = star_image.shape
    target = tan_wcs(shape)
    source = tan_wcs(shape, shift=(3.3, -2.7), rotation_deg=0.3)
    fast, fast_valid = resample(star_image, source, target, shape)
    slow, slow_valid = reproject_to(star_image, source, target, shape)
    assert fast.dtype == slow.dtype == np.float32
    interior = np.zeros(shape, dtype=bool)
    interior[10:-10, 10:-10] = True
    assert fast_valid[interior].all() and slow_valid[interior].all()
    peak = float(star_image.max())
    assert np.abs(fast - slow)[interior].max() < 1e-4 * peak
    # outside the source image both report no data
    assert not fast_valid[0, -1] and not slow_valid[0, -1]
    assert np.isnan(fast[~fast_valid]).all()


@pytest.mark.parametrize("scale_arcsec", [0.263, 20.0])
def test_pixel_map_matches_per_pixel_wcs_evaluation(tan_wcs, scale_arcsec: float) -> None:
    # 20"/px makes the 512 px frame 2.8° wide: the sky projection is far from affine
    target = tan_wcs(SHAPE, scale_arcsec=scale_arcsec)
    offset = 100 * scale_arcsec / 3600
    source = tan_wcs(
        SHAPE,
        scale_arcsec=scale_arcsec,
        shift=(3.3, -2.7),
        rotation_deg=0.3,
        crval=(150.1 + offset, 2.2 + offset / 2),
    )
    sy, sx = pixel_map(source, target, SHAPE)
    yy, xx = np.mgrid[0 : SHAPE[0], 0 : SHAPE[1]]
    ex, ey = source.world_to_pixel(target.pixel_to_world(xx, yy))
    assert np.abs(sx - ex).max() < 1e-3
    assert np.abs(sy - ey).max() < 1e-3
