"""preprocess → difference → detect → validate on simulated pairs, checked against the truth."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.spatial import cKDTree

from pipeline.errors import ScienceError
from pipeline.science.background import estimate_background
from pipeline.science.detection import NoDetectionsWarning, detect_candidates
from pipeline.science.differencing import difference_pair
from pipeline.science.preprocessing import preprocess_pair
from pipeline.science.psf import measure_fwhm
from pipeline.science.simulate import pure_noise_pair, simulate_pair


def robust_std(values: np.ndarray) -> float:
    q25, q75 = np.percentile(values, [25, 75])
    return float((q75 - q25) / 1.349)


def matched(run, selection: np.ndarray, radius: float = 1.5):
    """Truth rows picked by ``selection``, their nearest candidates, and which are recovered."""
    truth = run.sim.truth[selection]
    cands = run.candidates
    distance, index = cKDTree(np.column_stack([cands["x"], cands["y"]])).query(
        np.column_stack([truth["x_ref"], truth["y_ref"]])
    )
    nearest = cands[index]
    found = (distance < radius) & (np.asarray(nearest["sign"]) == np.asarray(truth["sign"]))
    return truth, nearest, found


def bright_on_empty_sky(run) -> np.ndarray:
    truth = run.sim.truth
    return (np.asarray(truth["snr_injected"]) >= 15) & ~np.asarray(truth["on_galaxy"])


def test_pair_is_registered_and_characterised(pipeline_run) -> None:
    sim, pair = pipeline_run.sim, pipeline_run.pair
    reg = pair.registration
    assert reg is not None and reg.refined and reg.n_matched >= 50
    # the refined WCS puts each transient's science position on its reference position
    truth = sim.truth
    world = reg.wcs.pixel_to_world(truth["x_sci"], truth["y_sci"])
    x, y = sim.reference.wcs.world_to_pixel(world)
    error = np.hypot(x - truth["x_ref"], y - truth["y_ref"])
    # sep's isophotal centroids scatter by ~0.07 px in this crowded field; the astrometric
    # noise handed to ZOGY must cover what is left
    assert np.sqrt(np.mean(error**2)) < min(0.15, float(np.hypot(*reg.rms)))
    assert max(reg.rms) < 0.2
    # PSF widths at the centre (pixel-integrated Moffats of 4.2 px, e = 0.08, and 3.0 px)
    assert pair.psf_science.fwhm == pytest.approx(4.1, rel=0.06)
    assert pair.psf_reference.fwhm == pytest.approx(3.1, rel=0.06)
    assert pair.flux.ratio == pytest.approx(sim.science.meta["flux_scale"], rel=0.02)
    summary = pair.summary()
    assert summary["shape"] == [512, 512]
    assert 0 < summary["masked_fraction"] < 0.2


def test_scorr_is_unit_normal_on_valid_pixels(pipeline_run) -> None:
    diff = pipeline_run.diff
    valid = diff.S_corr[~diff.invalid]
    assert 0.9 < robust_std(valid) < 1.1
    # renormalising is a correction of correlated resampling noise, not a rescue
    assert 0.8 < diff.scorr_scale < 1.3
    assert diff.invalid.mean() < 0.3
    assert np.all(diff.S_corr[diff.invalid] == 0)


def test_scorr_has_zero_median_on_the_sky(pipeline_run) -> None:
    diff = pipeline_run.diff
    assert abs(float(np.median(diff.S_corr[~diff.invalid]))) < 0.25


def test_bright_transients_on_empty_sky_are_found(pipeline_run) -> None:
    truth, _, found = matched(pipeline_run, bright_on_empty_sky(pipeline_run))
    assert len(truth) >= 10
    assert found.mean() >= 0.8
    # the ones missed lie on invalid pixels (a cosmic ray or a saturated star next to them)
    ix = np.rint(truth["x_ref"]).astype(int)
    iy = np.rint(truth["y_ref"]).astype(int)
    assert found[~pipeline_run.diff.invalid[iy, ix]].all()


def test_transient_fluxes_match_the_truth_within_their_errors(pipeline_run) -> None:
    truth, nearest, found = matched(pipeline_run, ~np.asarray(pipeline_run.sim.truth["on_galaxy"]))
    assert found.sum() >= 15
    measured = np.asarray(nearest["sign"] * nearest["flux"])[found]
    expected = np.asarray(truth["flux_sci"])[found]
    assert np.median(measured / expected) == pytest.approx(1.0, abs=0.05)
    pull = (measured - expected) / np.asarray(nearest["flux_err"])[found]
    assert 0.7 < np.std(pull) < 1.4
    assert abs(np.mean(pull)) < 0.6


def test_fading_transients_come_out_negative(pipeline_run) -> None:
    truth = pipeline_run.sim.truth
    fading = (np.asarray(truth["sign"]) < 0) & (np.asarray(truth["snr_injected"]) >= 15)
    _, nearest, found = matched(pipeline_run, fading)
    assert fading.sum() >= 2 and found.all()
    assert np.all(nearest["snr"][found] < -5) and np.all(nearest["flux"][found] < 0)


def test_validation_passes_most_recovered_transients(pipeline_run) -> None:
    _, nearest, found = matched(pipeline_run, bright_on_empty_sky(pipeline_run))
    validated = pipeline_run.validated
    by_id = dict(zip(validated["candidate_id"], validated["passed"], strict=True))
    passed = [by_id[c] for c in nearest["candidate_id"][found]]
    assert np.mean(passed) >= 0.8
    assert np.isnan(validated["rb_score"]).all()


def test_bright_static_stars_leave_no_passed_candidates_in_their_wings(pipeline_run) -> None:
    sim, validated = pipeline_run.sim, pipeline_run.validated
    sources = sim.sources
    bright = sources[(sources["kind"] == "star") & (sources["flux_ref"] > 3e5)]
    assert len(bright) >= 3
    passed = validated[validated["passed"]]
    xy = np.column_stack([passed["x"], passed["y"]])
    near_transient = cKDTree(np.column_stack([sim.truth["x_ref"], sim.truth["y_ref"]])).query(xy)[0]
    wing = cKDTree(np.column_stack([bright["x_ref"], bright["y_ref"]])).query(xy)[0]
    bogus = (wing > 10) & (wing < 40) & (near_transient > 3)
    assert bogus.sum() == 0, passed[bogus]["x", "y", "snr", "flags"]


@pytest.fixture(scope="module")
def noise_pair(make_pair):
    """pure_noise_pair, background-subtracted, with its true PSFs (it has no stars to fit)."""
    sim = pure_noise_pair((512, 512), seed=0)
    images = []
    for image in (sim.science, sim.reference):
        bkg = estimate_background(image.data)
        images.append((image.data - bkg.level).astype(np.float32))
    sigma = sim.science.meta["sigma_bkg"]
    return make_pair(
        images[0],
        images[1],
        psf_science=sim.psf_science,
        psf_reference=sim.psf_reference,
        sigma_science=sigma,
        sigma_reference=sim.reference.meta["sigma_bkg"],
        gain=sim.science.gain,
        wcs=sim.reference.wcs,
    )


def test_preprocessing_gives_the_same_pair_on_one_core_as_on_several(monkeypatch) -> None:
    """The two images are cleaned side by side in threads: the products must not care."""
    from pipeline.science import parallel

    sim = simulate_pair((512, 512), seed=7)
    pairs = []
    for cores in (1, 4):
        monkeypatch.setattr(parallel.os, "cpu_count", lambda cores=cores: cores)
        pairs.append(preprocess_pair(sim.science, sim.reference))
    one, many = pairs
    for name in ("science", "reference", "science_rms", "reference_rms", "mask"):
        np.testing.assert_array_equal(getattr(one, name), getattr(many, name), err_msg=name)
    assert (one.science_gain, one.reference_gain) == (many.science_gain, many.reference_gain)
    np.testing.assert_array_equal(one.psf_science.basis, many.psf_science.basis)
    np.testing.assert_array_equal(one.psf_reference.basis, many.psf_reference.basis)
    assert one.flux.ratio == many.flux.ratio
    assert one.registration.rms == many.registration.rms
    assert len(one.reference_sources) == len(many.reference_sources) > 20


def test_scorr_has_unit_variance_on_pure_noise(noise_pair) -> None:
    raw = difference_pair(noise_pair, backend="numpy", renormalise=False)
    valid = raw.S_corr[~raw.invalid]
    assert 0.9 < float(np.std(valid)) < 1.1
    assert abs(float(np.mean(valid))) < 0.05
    assert np.abs(valid).max() < 5.0  # 1 in 3.5 million per pixel: none expected here
    # no stars to calibrate a floor on: the floor is the stated minimum
    assert raw.flux_floor == pytest.approx(0.01)
    assert difference_pair(noise_pair, backend="numpy", min_flux_floor=0.0).flux_floor == 0.0
    assert difference_pair(noise_pair, backend="numpy").scorr_scale == pytest.approx(1, abs=0.05)


def test_pure_noise_gives_no_candidates_and_a_warning(noise_pair) -> None:
    diff = difference_pair(noise_pair, backend="numpy")
    with pytest.warns(NoDetectionsWarning, match="no S_corr peak reached 5"):
        table = detect_candidates(diff, noise_pair)
    assert len(table) == 0
    assert {"candidate_id", "x", "y", "snr", "flux", "flux_err", "flags"} <= set(table.colnames)


def test_preprocessing_a_starless_pair_says_why_it_cannot() -> None:
    sim = pure_noise_pair((256, 256), seed=1)
    with pytest.raises(ScienceError, match="stars matched"):
        preprocess_pair(sim.science, sim.reference)
    with pytest.raises(ScienceError, match="usable PSF stars"):
        preprocess_pair(sim.science, sim.reference, refine=False)


def test_identical_images_give_no_candidates(pipeline_run) -> None:
    reference = pipeline_run.sim.reference
    pair = preprocess_pair(reference, reference, refine=False)
    diff = difference_pair(pair, backend="numpy")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        table = detect_candidates(diff, pair)
    assert len(table) == 0
    assert any(issubclass(w.category, NoDetectionsWarning) for w in caught)


def test_a_shallow_science_image_takes_its_psf_stars_from_the_reference() -> None:
    # In this pair (seed 3) only a handful of stars reach S/N 30 in the shallower science
    # image, and the brightest compact objects there are galaxies, so the science image's
    # own stellar locus is one of galaxies: its PSF came out 5.6 px wide instead of 4.1
    # and the flux ratio 0.19 instead of 0.8, which hid every transient.
    sim = simulate_pair((1024, 1024), seed=3)
    pair = preprocess_pair(sim.science, sim.reference)
    assert pair.psf_science.fwhm == pytest.approx(measure_fwhm(sim.psf_science), rel=0.05)
    assert pair.flux.ratio == pytest.approx(sim.science.meta["flux_scale"], rel=0.02)
    assert pair.psf_science.n_stars >= 5


def test_a_sparse_field_still_gets_a_flux_scale() -> None:
    # 150 stars on 512²: only two PSF stars are bright enough in both images for the
    # flux scale, which then falls back to every source bright enough in both
    sim = simulate_pair((512, 512), seed=12, n_stars=150, n_galaxies=40, n_transients=30)
    pair = preprocess_pair(sim.science, sim.reference)
    assert pair.flux.n_stars >= 3
    assert pair.flux.ratio == pytest.approx(sim.science.meta["flux_scale"], rel=0.03)


def test_transients_on_galaxies_do_not_set_the_galaxies_flux_floor() -> None:
    # In this pair (seed 5) a quarter of the bright galaxies hold a transient near the
    # centre; read as residuals of the subtraction they had doubled the galaxies' floor
    # (upper quartile 1.4 % against 0.7 % without them), which hid the transients on them
    floors = []
    for n_transients in (60, 0):
        sim = simulate_pair((1024, 1024), seed=5, n_transients=n_transients)
        pair = preprocess_pair(sim.science, sim.reference)
        diff = difference_pair(pair, backend="numpy", min_flux_floor_extended=0.0)
        floors.append(diff.flux_floor_extended)
    with_transients, without = floors
    assert with_transients <= without + 0.002
    assert without < 0.005  # galaxies smooth PSF errors out: far below the stars' 1 %


def test_calibrated_floor_takes_the_asked_quantile_of_the_sources() -> None:
    from astropy.table import Table

    from pipeline.science.differencing import calibrate_flux_floor

    # 9 sources on a line, each window holding residual S² = V + r_i (S_N² + S_R²)
    rng = np.random.default_rng(0)
    ratios = np.sort(rng.uniform(1e-5, 4e-5, 9))
    shape = (21, 9 * 21)
    maps = {k: np.zeros(shape, np.float32) for k in ("S", "V", "S_N", "S_R")}
    maps["V"][:] = 1.0
    maps["S_N"][:] = 100.0
    xs = 10 + 21 * np.arange(9)
    for x, r in zip(xs, ratios, strict=True):
        maps["S"][:, x - 10 : x + 11] = np.sqrt(1.0 + r * 100.0**2)
    sources = Table({"x": xs.astype(float), "y": np.full(9, 10.0)})
    invalid = np.zeros(shape, bool)
    for q in (0.5, 0.75):
        got = calibrate_flux_floor(maps, sources, invalid, 3.0, quantile=q)
        assert got == pytest.approx(np.sqrt(np.quantile(ratios, q)), rel=1e-3)


def test_the_noise_spread_leaves_out_transients_and_residuals() -> None:
    """S_corr's renormalisation measures noise: bright peaks must not read as noise."""
    from pipeline.science.differencing import _noise_spread, _robust_std

    rng = np.random.default_rng(3)
    shape, sigma, fwhm = (512, 512), 1.2, 4.0
    s_corr = rng.normal(0.0, sigma, shape).astype(np.float32)
    invalid = np.zeros(shape, bool)
    assert _noise_spread(s_corr, invalid, fwhm) == pytest.approx(_robust_std(s_corr.ravel()))
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    width = 2 * fwhm / 2.355  # a matched filter's footprint: √2 the PSF's
    for y, x in rng.uniform(20, 492, (60, 2)):
        s_corr += 20.0 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / (2 * width**2))
    plain = _robust_std(s_corr.ravel())
    assert plain > 1.04 * sigma  # the peaks widen the quartiles of the whole image
    assert _noise_spread(s_corr, invalid, fwhm) == pytest.approx(sigma, rel=0.02)
    # masked pixels never count, whatever they hold
    invalid[:, :256] = True
    s_corr[:, :256] = 100.0
    assert _noise_spread(s_corr, invalid, fwhm) == pytest.approx(sigma, rel=0.02)
