"""Tests of the PSF model and the image-pair simulator (the ground truth of the pipeline)."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.convolution import discretize_model
from astropy.modeling.models import Moffat2D
from astropy.stats import sigma_clipped_stats

from pipeline.science.image import Image
from pipeline.science.psfmodel import effective_pixels, moffat_alpha, moffat_psf
from pipeline.science.simulate import (
    background_sigma,
    flux_to_snr,
    fwhm_at,
    inject_fakes,
    psf_at,
    pure_noise_pair,
    simulate_pair,
    snr_to_flux,
)

QUIET = {"cosmic_rays": 0, "bad_columns": 0, "saturated_stars": 0}


def _moments(img: np.ndarray) -> tuple[float, float, float, float, float]:
    yy, xx = np.indices(img.shape, dtype=float)
    w = img.sum()
    mx, my = (img * xx).sum() / w, (img * yy).sum() / w
    ixx = (img * (xx - mx) ** 2).sum() / w
    iyy = (img * (yy - my) ** 2).sum() / w
    ixy = (img * (xx - mx) * (yy - my)).sum() / w
    return mx, my, ixx, iyy, ixy


def _adaptive_centroid(img: np.ndarray, x: float, y: float, s: float = 2.0) -> tuple[float, float]:
    """Gaussian-weighted centroid, iterated: unbiased for a symmetric profile."""
    yy, xx = np.indices(img.shape, dtype=float)
    for _ in range(30):
        w = img * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
        x, y = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
    return x, y


def _cut(img: np.ndarray, x: float, y: float, half: int) -> tuple[np.ndarray, int, int]:
    ix, iy = int(np.floor(x + 0.5)), int(np.floor(y + 0.5))
    return img[iy - half : iy + half + 1, ix - half : ix + half + 1], ix - half, iy - half


def _isolated(x: np.ndarray, y: np.ndarray, others_x, others_y, radius: float) -> np.ndarray:
    d = np.hypot(x[:, None] - np.asarray(others_x)[None], y[:, None] - np.asarray(others_y)[None])
    d[d == 0] = np.inf
    return d.min(axis=1) > radius


# ---------------------------------------------------------------------------- PSF model


@pytest.mark.parametrize(
    ("fwhm", "beta", "e", "angle"), [(3.0, 4.0, 0.0, 0.0), (4.2, 2.8, 0.2, 0.7), (2.0, 2.0, 0.5, 2)]
)
def test_moffat_sums_to_one_and_is_positive(fwhm, beta, e, angle):
    psf = moffat_psf(31, fwhm, beta, e, angle)
    assert psf.shape == (31, 31)
    assert psf.sum() == pytest.approx(1.0, abs=1e-12)
    assert psf.min() > 0
    assert np.unravel_index(psf.argmax(), psf.shape) == (15, 15)


def test_moffat_fwhm_from_profile_matches_request():
    fwhm = 8.0
    psf = moffat_psf(101, fwhm, beta=3.5)
    row = psf[50]
    half = row.max() / 2
    x = np.arange(row.size, dtype=float)
    right = np.interp(half, row[50:][::-1], x[50:][::-1])
    left = np.interp(half, row[:51], x[:51])
    assert right - left == pytest.approx(fwhm, rel=0.05)
    assert moffat_alpha(fwhm, 3.5) * 2 * np.sqrt(2 ** (1 / 3.5) - 1) == pytest.approx(fwhm)


def test_moffat_matches_astropy_convention():
    alpha = moffat_alpha(3.0, 2.5)
    model = Moffat2D(amplitude=1.0, x_0=10.3, y_0=9.8, gamma=alpha, alpha=2.5)
    ref = discretize_model(model, (0, 21), (0, 21), mode="oversample", factor=5)
    psf = moffat_psf(21, 3.0, beta=2.5, center=(10.3, 9.8))
    np.testing.assert_allclose(psf, ref / ref.sum(), rtol=1e-6)
    assert model.fwhm == pytest.approx(3.0)


def test_moffat_ellipticity_and_angle_show_in_moments():
    e, angle = 0.3, np.pi / 6
    psf = moffat_psf(121, 6.0, beta=3.5, ellipticity=e, angle=angle)
    _, _, ixx, iyy, ixy = _moments(psf)
    lam = np.linalg.eigvalsh([[ixx, ixy], [ixy, iyy]])
    assert np.sqrt(lam[0] / lam[1]) == pytest.approx(1 - e, abs=0.02)
    assert 0.5 * np.arctan2(2 * ixy, ixx - iyy) == pytest.approx(angle, abs=np.deg2rad(1))
    round_ = _moments(moffat_psf(121, 6.0, beta=3.5))
    assert round_[2] == pytest.approx(round_[3], rel=1e-9)


@pytest.mark.parametrize("center", [(15.3, 14.83), (14.5, 15.5), (15.0, 15.0), (15.49, 14.6)])
def test_moffat_subpixel_centre_is_the_centroid(center):
    psf = moffat_psf(31, 3.0, beta=3.5, center=center)
    mx, my, *_ = _moments(psf)
    assert mx == pytest.approx(center[0], abs=0.02)
    assert my == pytest.approx(center[1], abs=0.02)


def test_moffat_rejects_bad_arguments():
    with pytest.raises(ValueError, match="odd"):
        moffat_psf(24, 3.0)
    with pytest.raises(ValueError, match="beta"):
        moffat_psf(25, 3.0, beta=1.0)
    with pytest.raises(ValueError, match="ellipticity"):
        moffat_psf(25, 3.0, ellipticity=1.0)


@pytest.mark.parametrize("s", [1.5, 2.0, 3.5])
def test_effective_pixels_of_gaussian(s):
    yy, xx = np.mgrid[-30:31, -30:31]
    gauss = np.exp(-(xx**2 + yy**2) / (2 * s * s))
    assert effective_pixels(gauss) == pytest.approx(4 * np.pi * s * s, rel=0.02)
    assert effective_pixels(7 * gauss) == pytest.approx(effective_pixels(gauss))


# ---------------------------------------------------------------------------- S/N definition


def test_snr_flux_round_trip_and_definition():
    psf = moffat_psf(41, 3.5, beta=3.0)
    snr = np.array([3.0, 5.0, 30.0])
    flux = snr_to_flux(snr, 12.0, psf)
    np.testing.assert_allclose(flux_to_snr(flux, 12.0, psf), snr, rtol=1e-12)
    np.testing.assert_allclose(flux, snr * 12.0 / np.sqrt((psf**2).sum()), rtol=1e-12)
    assert background_sigma(600.0, 4.0, 6.0) == pytest.approx(np.sqrt(2436.0) / 4.0)


def test_snr_is_the_psf_fit_flux_signal_to_noise_on_real_noise():
    """A PSF-weighted flux on empty simulated sky scatters by sigma_bkg * sqrt(N_eff)."""
    pair = pure_noise_pair((512, 512), seed=5)
    img, psf = pair.science, pair.psf_science
    data = img.data - img.meta["sky"]
    h = psf.shape[0] // 2
    weights = psf / (psf**2).sum()
    fluxes = [
        (weights * data[y - h : y + h + 1, x - h : x + h + 1]).sum()
        for y in range(h, 512 - h, psf.shape[0])
        for x in range(h, 512 - h, psf.shape[0])
    ]
    expected = snr_to_flux(1.0, img.meta["sigma_bkg"], psf)
    assert np.std(fluxes) == pytest.approx(expected, rel=0.12)


# ---------------------------------------------------------------------------- simulate_pair


@pytest.fixture(scope="module")
def pair():
    return simulate_pair((512, 512), seed=11, n_stars=150, n_galaxies=40, n_transients=20)


def test_simulate_is_deterministic_and_typed(pair):
    again = simulate_pair((512, 512), seed=11, n_stars=150, n_galaxies=40, n_transients=20)
    other = simulate_pair((512, 512), seed=12, n_stars=150, n_galaxies=40, n_transients=20)
    for a, b in ((pair.science, again.science), (pair.reference, again.reference)):
        assert a.data.dtype == np.float32 and a.data.shape == (512, 512)
        assert a.mask.dtype == bool and a.mask.shape == (512, 512)
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.mask, b.mask)
    for table in ("truth", "sources", "artefacts"):
        a, b = getattr(pair, table), getattr(again, table)
        assert a.colnames == b.colnames and len(a) == len(b)
        for name in a.colnames:
            np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(pair.science.data, other.science.data)
    assert pair.science.band == pair.reference.band == "r"
    assert pair.science.mjd > pair.reference.mjd
    assert pair.science.gain == 4.0 and pair.reference.gain == 16.0
    assert pair.reference.read_noise == pytest.approx(12.0)
    assert pair.science.saturation == pair.reference.saturation == 60000.0
    for psf in (pair.psf_science, pair.psf_reference):
        assert psf.shape[0] >= 25 and psf.shape[0] % 2 == 1
        assert psf.sum() == pytest.approx(1.0)


def test_truth_table_is_consistent(pair):
    t = pair.truth
    sci = pair.science
    assert len(t) == 20
    assert set(t.colnames) >= {
        "id", "x_sci", "y_sci", "x_ref", "y_ref", "ra", "dec", "flux_sci", "flux_ref",
        "snr_injected", "sign", "on_galaxy",
    }  # fmt: skip
    assert (t["sign"] == -1).sum() == 2 and t["on_galaxy"].sum() == 8
    assert np.all((t["snr_injected"] >= 3.0) & (t["snr_injected"] <= 30.0))
    for coord in ("x_sci", "y_sci", "x_ref", "y_ref"):
        assert np.all((t[coord] >= 20) & (t[coord] <= 511 - 20))
    for row in t:
        local = psf_at(sci, row["x_sci"], row["y_sci"])
        snr = flux_to_snr(row["flux_sci"], sci.meta["sigma_bkg"], local)
        assert snr == pytest.approx(row["snr_injected"], rel=1e-9)
    fading = t["sign"] == -1
    np.testing.assert_allclose(t["flux_ref"][fading], t["flux_sci"][fading] / 0.8)
    assert np.all(t["flux_ref"][~fading] == 0)
    ra, dec = pair.reference.wcs.pixel_to_world_values(t["x_ref"], t["y_ref"])
    np.testing.assert_allclose(ra, t["ra"], atol=1e-9)
    np.testing.assert_allclose(dec, t["dec"], atol=1e-9)


def test_transients_on_galaxies_lie_within_half_to_one_and_a_half_radii(pair):
    t, src = pair.truth, pair.sources
    for row in t[t["on_galaxy"]]:
        host = src[row["host_id"]]
        assert host["kind"] == "galaxy"
        dx, dy = row["x_ref"] - host["x_ref"], row["y_ref"] - host["y_ref"]
        c, s = np.cos(host["theta"]), np.sin(host["theta"])
        a, b = dx * c + dy * s, (-dx * s + dy * c) / host["axis_ratio"]
        assert 0.5 - 1e-6 <= np.hypot(a, b) / host["r_eff"] <= 1.5 + 1e-6


def test_background_noise_matches_gain_and_read_noise():
    kw = {"seed": 2, "n_stars": 80, "n_galaxies": 15, "n_transients": 5, **QUIET}
    noisy = simulate_pair((512, 512), **kw)
    clean = simulate_pair((512, 512), noise=False, **kw)
    for img, model, gain, rn in (
        (noisy.science, clean.science, 4.0, 6.0),
        (noisy.reference, clean.reference, 16.0, 12.0),
    ):
        sky = img.meta["sky"]
        expected = np.sqrt(sky * gain + rn**2) / gain
        assert img.meta["sigma_bkg"] == pytest.approx(expected)
        empty = (model.data - sky) < 0.05 * expected
        mean, _, std = sigma_clipped_stats(img.data[empty] - sky, sigma=3.0)
        assert std == pytest.approx(expected, rel=0.05)
        assert abs(mean) < 0.02 * expected
    # the reference is reference_depth=4 times deeper: half the noise at half the sky
    assert noisy.reference.meta["sigma_bkg"] < 0.4 * noisy.science.meta["sigma_bkg"]


@pytest.fixture(scope="module")
def noiseless_transients():
    kw = {"seed": 4, "n_stars": 150, "n_galaxies": 60, "noise": False, **QUIET}
    with_t = simulate_pair((512, 512), n_transients=24, fading_fraction=0.5, **kw)
    without = simulate_pair((512, 512), n_transients=0, fading_fraction=0.5, **kw)
    return with_t, without


def test_noiseless_transient_flux_and_position(noiseless_transients):
    with_t, without = noiseless_transients
    t = with_t.truth
    np.testing.assert_array_equal(with_t.sources["x_ref"], without.sources["x_ref"])
    d_sci = with_t.science.data.astype(float) - without.science.data
    d_ref = with_t.reference.data.astype(float) - without.reference.data
    half = with_t.psf_science.shape[0] // 2
    ok = _isolated(np.asarray(t["x_sci"]), np.asarray(t["y_sci"]), t["x_sci"], t["y_sci"], 47)
    ok &= (t["x_sci"] > half) & (t["x_sci"] < 511 - half)
    ok &= (t["y_sci"] > half) & (t["y_sci"] < 511 - half)
    ok &= (t["x_ref"] > half) & (t["x_ref"] < 511 - half)
    ok &= (t["y_ref"] > half) & (t["y_ref"] < 511 - half)
    assert ok.sum() >= 8
    n_faded = 0
    for row in t[ok]:
        if row["sign"] > 0:
            box, x0, y0 = _cut(d_sci, row["x_sci"], row["y_sci"], half)
            flux, x, y = row["flux_sci"], row["x_sci"], row["y_sci"]
            assert np.abs(_cut(d_ref, row["x_ref"], row["y_ref"], half)[0]).max() < 1e-2
        else:
            n_faded += 1
            box, x0, y0 = _cut(d_ref, row["x_ref"], row["y_ref"], half)
            flux, x, y = row["flux_ref"], row["x_ref"], row["y_ref"]
            assert np.abs(_cut(d_sci, row["x_sci"], row["y_sci"], half)[0]).max() < 1e-2
        assert box.sum() == pytest.approx(flux, rel=0.02)
        cx, cy = _adaptive_centroid(box, x - x0, y - y0)
        assert cx + x0 == pytest.approx(x, abs=0.05)
        assert cy + y0 == pytest.approx(y, abs=0.05)
        if row["sign"] > 0:
            local = psf_at(with_t.science, x, y, center=(x - x0, y - y0))
            fit = (local * box).sum() / (local**2).sum()
            assert fit == pytest.approx(flux, rel=0.02)
    assert n_faded >= 2


def test_star_positions_map_through_both_wcs():
    p = simulate_pair(
        (384, 384), seed=8, n_stars=40, n_galaxies=0, n_transients=0, noise=False, **QUIET
    )
    src = p.sources
    world = p.reference.wcs.pixel_to_world_values(src["x_ref"], src["y_ref"])
    x_sci, y_sci = p.science.wcs.world_to_pixel_values(*world)
    np.testing.assert_allclose(x_sci, src["x_sci"], atol=1e-6)
    np.testing.assert_allclose(y_sci, src["y_sci"], atol=1e-6)
    # the science grid is shifted by (3.3, -2.7) and rotated 0.3 deg about the centre
    c = 383 / 2
    th = np.deg2rad(0.3)
    xr, yr = np.asarray(src["x_ref"]) - c, np.asarray(src["y_ref"]) - c
    np.testing.assert_allclose(x_sci, c + np.cos(th) * xr - np.sin(th) * yr + 3.3, atol=1e-6)
    np.testing.assert_allclose(y_sci, c + np.sin(th) * xr + np.cos(th) * yr - 2.7, atol=1e-6)

    sci = p.science.data - p.science.meta["sky"]
    ref = p.reference.data - p.reference.meta["sky"]
    x, y = np.asarray(src["x_sci"]), np.asarray(src["y_sci"])
    peak = np.asarray(src["flux_sci"]) * p.psf_science.max()
    ok = _isolated(x, y, x, y, 30) & (peak < 30000)
    ok &= (x > 30) & (x < 353) & (y > 30) & (y < 353)
    assert ok.sum() >= 5
    for row in src[ok]:
        box, x0, y0 = _cut(sci, row["x_sci"], row["y_sci"], 12)
        cx, cy = _adaptive_centroid(box, row["x_sci"] - x0, row["y_sci"] - y0)
        assert (cx + x0, cy + y0) == pytest.approx((row["x_sci"], row["y_sci"]), abs=0.05)
        box, x0, y0 = _cut(ref, row["x_ref"], row["y_ref"], 12)
        cx, cy = _adaptive_centroid(box, row["x_ref"] - x0, row["y_ref"] - y0)
        assert (cx + x0, cy + y0) == pytest.approx((row["x_ref"], row["y_ref"]), abs=0.05)


def test_both_epochs_render_the_same_sky():
    """With equal PSFs and an integer shift, science = flux_scale x shifted reference."""
    p = simulate_pair(
        (256, 256),
        seed=9,
        n_stars=60,
        n_galaxies=40,
        n_transients=0,
        fwhm_science=3.0,
        beta_science=4.0,
        ellipticity_science=0.0,
        psf_variation=0.0,
        shift=(3.0, -2.0),
        rotation_deg=0.0,
        noise=False,
        **QUIET,
    )
    sci = p.science.data.astype(float) - p.science.meta["sky"]
    ref = p.reference.data.astype(float) - p.reference.meta["sky"]
    resid = sci[38:218, 43:223] - 0.8 * ref[40:220, 40:220]
    assert np.abs(resid).max() < 2e-4 * sci.max()
    assert (p.sources["kind"] == "galaxy").sum() >= 30


def test_psf_varies_across_the_field(pair):
    sci = pair.science
    corners = fwhm_at(sci, np.array([0, 511, 0, 511]), np.array([0, 0, 511, 511]))
    assert corners.min() == pytest.approx(4.2 * 0.9, rel=0.01)
    assert corners.max() == pytest.approx(4.2 * 1.1, rel=0.01)
    assert fwhm_at(sci, 255.5, 255.5) == pytest.approx(4.2)
    np.testing.assert_allclose(psf_at(sci, 255.5, 255.5), pair.psf_science, atol=1e-12)


def test_saturation_is_clipped_masked_and_bleeds():
    p = simulate_pair((512, 512), seed=6, n_stars=100, n_galaxies=10, n_transients=5)
    for img in (p.science, p.reference):
        assert img.data.max() <= 60000.0
        assert np.all(img.mask[img.data >= 60000.0])
    sat = p.artefacts[p.artefacts["kind"] == "saturated_star"]
    assert len(sat) == 3
    for row in sat:
        ix, iy = round(row["x_sci"]), round(row["y_sci"])
        assert p.science.mask[iy, ix] and p.science.data[iy, ix] == 60000.0
        # charge runs along the column: the masked run is far taller than it is wide
        width = p.science.mask[iy, ix - 30 : ix + 31].sum()
        assert row["length"] > 1.5 * width
    cols = p.artefacts[p.artefacts["kind"] == "bad_column"]
    assert len(cols) == 2
    for row in cols:
        ix, iy = round(row["x_sci"]), round(row["y_sci"])
        assert p.science.mask[iy, ix] and p.science.data[iy, ix] in (0.0, 60000.0)
    crs = p.artefacts[(p.artefacts["kind"] == "cosmic_ray") & (p.artefacts["epoch"] == "science")]
    assert len(crs) == 40
    assert (p.artefacts["epoch"] == "reference").sum() == 10
    unmasked = [not p.science.mask[round(r["y_sci"]), round(r["x_sci"])] for r in crs]
    assert np.mean(unmasked) > 0.8


def test_bleeding_conserves_charge():
    p = simulate_pair(
        (512, 512), seed=7, n_stars=0, n_galaxies=0, n_transients=0, noise=False,
        saturated_stars=1, cosmic_rays=0, bad_columns=0,
    )  # fmt: skip
    star = p.sources[p.sources["kind"] == "saturated_star"][0]
    assert p.science.mask.sum() > 20
    total = (p.science.data.astype(float) - p.science.meta["sky"]).sum()
    assert total == pytest.approx(star["flux_sci"], rel=0.01)


# ---------------------------------------------------------------------------- inject_fakes


def test_inject_fakes_adds_flux_at_position_and_copies():
    pair = pure_noise_pair((256, 256), seed=3)
    img = pair.science
    before = img.data.copy()
    pos = np.array([[60.3, 70.8], [180.5, 150.25], [128.0, 40.0]])
    flux = np.array([5000.0, 12000.0, 800.0])
    out = inject_fakes(img, pair.psf_science, pos, flux, poisson=False)
    assert isinstance(out, Image) and out is not img
    np.testing.assert_array_equal(img.data, before)
    assert out.data.dtype == np.float32
    added = out.data.astype(float) - img.data
    half = pair.psf_science.shape[0] // 2
    for (x, y), f in zip(pos, flux, strict=True):
        box, x0, y0 = _cut(added, x, y, half)
        assert box.sum() == pytest.approx(f, rel=0.01)
        cx, cy = _adaptive_centroid(box, x - x0, y - y0)
        assert (cx + x0, cy + y0) == pytest.approx((x, y), abs=0.05)
    assert added.sum() == pytest.approx(flux.sum(), rel=0.01)


def test_inject_fakes_poisson_noise_scales_with_gain():
    img = pure_noise_pair((256, 256), seed=3).science
    psf = moffat_psf(25, 3.0, beta=3.0)
    grid = np.array([[x, y] for x in range(20, 240, 25) for y in range(20, 240, 25)], float)
    flux = np.full(len(grid), 40000.0)
    a = inject_fakes(img, psf, grid, flux, seed=1)
    b = inject_fakes(img, psf, grid, flux, seed=2)
    exact = inject_fakes(img, psf, grid, flux, poisson=False)
    np.testing.assert_array_equal(a.data, inject_fakes(img, psf, grid, flux, seed=1).data)
    diff = a.data.astype(float) - b.data
    model = exact.data.astype(float) - img.data
    core = model > 200
    # var(a - b) = 2 * model / gain for the fakes' own photon noise
    ratio = np.mean(diff[core] ** 2 / (2 * model[core] / img.gain))
    assert ratio == pytest.approx(1.0, rel=0.1)
    assert (a.data.astype(float) - img.data).sum() == pytest.approx(flux.sum(), rel=0.01)


def test_inject_fakes_clips_and_flags_saturation():
    img = pure_noise_pair((128, 128), seed=3).science
    out = inject_fakes(img, moffat_psf(25, 3.0), np.array([[64.0, 64.0]]), np.array([1e7]))
    assert out.data.max() == img.saturation
    assert out.mask[64, 64] and img.mask is not None and not img.mask.any()


# ---------------------------------------------------------------------------- pure noise


def test_pure_noise_pair_is_zero_mean_sky_noise():
    p = pure_noise_pair((512, 512), seed=1)
    assert len(p.truth) == len(p.sources) == len(p.artefacts) == 0
    assert p.science.wcs.wcs.compare(p.reference.wcs.wcs)
    expected = np.sqrt(500 * 4 + 25) / 4
    for img in (p.science, p.reference):
        resid = img.data.astype(float) - 500.0
        assert img.meta["sky"] == 500.0
        assert abs(resid.mean()) < 4 * expected / 512
        assert resid.std() == pytest.approx(expected, rel=0.01)
        assert not img.mask.any()
    assert not np.allclose(p.science.data, p.reference.data)
    assert effective_pixels(p.psf_science) > effective_pixels(p.psf_reference)


def test_galaxies_turn_with_the_science_grid():
    """Galaxy shapes are drawn on the sky: rotating the grid rotates their moments."""
    p = simulate_pair(
        (384, 384), seed=21, n_stars=0, n_galaxies=8, n_transients=0, fwhm_science=3.0,
        beta_science=4.0, ellipticity_science=0.0, psf_variation=0.0, rotation_deg=20.0,
        noise=False, **QUIET,
    )  # fmt: skip
    sci = p.science.data.astype(float) - p.science.meta["sky"]
    ref = p.reference.data.astype(float) - p.reference.meta["sky"]
    gal = p.sources
    x, y = np.asarray(gal["x_sci"]), np.asarray(gal["y_sci"])
    ok = _isolated(x, y, x, y, 70) & (gal["axis_ratio"] < 0.7)
    for v in (x, y, gal["x_ref"], gal["y_ref"]):
        ok &= (np.asarray(v) > 25) & (np.asarray(v) < 358)
    assert ok.sum() >= 2
    for row in gal[ok]:
        angles = []
        for img, xc, yc in ((ref, row["x_ref"], row["y_ref"]), (sci, row["x_sci"], row["y_sci"])):
            box, x0, y0 = _cut(img, xc, yc, 20)
            yy, xx = np.indices(box.shape)
            box = np.where(np.hypot(xx + x0 - xc, yy + y0 - yc) < 20, box, 0.0)
            mx, my, ixx, iyy, ixy = _moments(box)
            assert (mx + x0, my + y0) == pytest.approx((xc, yc), abs=0.05)
            angles.append(0.5 * np.arctan2(2 * ixy, ixx - iyy))
        turn = (np.rad2deg(angles[1] - angles[0]) + 90) % 180 - 90
        assert turn == pytest.approx(20.0, abs=1.0)
        flux_ref = _cut(ref, row["x_ref"], row["y_ref"], 20)[0].sum()
        assert _cut(sci, row["x_sci"], row["y_sci"], 20)[0].sum() == pytest.approx(
            0.8 * flux_ref, rel=0.01
        )
