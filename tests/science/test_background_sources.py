"""Background level and noise, source extraction, star selection and source footprints."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial import cKDTree

from pipeline.errors import ScienceError
from pipeline.science.background import estimate_background
from pipeline.science.sources import find_sources, select_stars, source_footprints


def test_flat_sky_level_and_noise_are_recovered() -> None:
    sky, sigma = 250.0, 10.0
    data = np.random.default_rng(0).normal(sky, sigma, (512, 512)).astype(np.float32)
    bkg = estimate_background(data)
    assert bkg.level.shape == bkg.rms.shape == data.shape
    assert abs(bkg.global_level - sky) < 0.01 * sigma
    # flat: the 64-px meshes scatter by ~2% of σ, nothing bigger is invented
    assert float(np.std(bkg.level)) < 0.03 * sigma
    assert np.abs(bkg.level - sky).max() < 0.15 * sigma
    # SExtractor's clipped rms reads ~1.5% low on pure Gaussian noise
    assert bkg.global_rms == pytest.approx(sigma, rel=0.02)
    assert float(np.median(bkg.rms)) == pytest.approx(sigma, rel=0.02)


def test_masked_and_nan_pixels_do_not_bias_the_background() -> None:
    rng = np.random.default_rng(1)
    data = rng.normal(250.0, 10.0, (256, 256)).astype(np.float32)
    mask = np.zeros(data.shape, dtype=bool)
    mask[:, :128] = True
    data[:, :128] = 1e4  # a masked bright region
    data[:20] = np.nan
    bkg = estimate_background(data, mask)
    assert abs(bkg.global_level - 250.0) < 0.5
    assert abs(float(np.median(bkg.level[:, :128])) - 250.0) < 0.5  # interpolated under it
    assert bkg.global_rms == pytest.approx(10.0, rel=0.03)


def test_all_masked_image_is_refused() -> None:
    with pytest.raises(ScienceError, match="every pixel is masked or NaN"):
        estimate_background(np.full((64, 64), np.nan, dtype=np.float32))


@pytest.fixture(scope="module")
def star_field(grid_positions, render_stars):
    """256² field, σ = 5 ADU, 36 isolated stars of 1e3 to 1e6 ADU (Moffat FWHM 3, β 3)."""
    rng = np.random.default_rng(5)
    x, y = grid_positions((256, 256), 40.0, margin=20.0, jitter=4.0, seed=5)
    flux = np.exp(rng.uniform(np.log(1e3), np.log(1e6), x.size))
    model = render_stars((256, 256), x, y, flux, 3.0, beta=3.0, half=30)
    data = (model + rng.normal(0.0, 5.0, model.shape)).astype(np.float32)
    return data, model, x, y, flux


def test_find_sources_recovers_bright_star_positions(star_field) -> None:
    data, _, x, y, flux = star_field
    sources = find_sources(data, 5.0)
    assert np.all(np.diff(np.asarray(sources["flux"])) <= 0)  # brightest first
    distance, index = cKDTree(np.column_stack([x, y])).query(
        np.column_stack([sources["x"], sources["y"]])
    )
    bright = np.asarray(sources["snr"]) > 50
    assert bright.sum() >= 25
    assert distance[bright].max() < 0.1
    # every star is found, each once, and nothing else
    assert np.array_equal(np.sort(index[distance < 1.0]), np.arange(x.size))
    assert len(sources) == x.size
    # aperture fluxes of the bright ones: the aperture holds > 97% of a β=3 Moffat
    ratio = np.asarray(sources["flux"])[bright] / flux[index[bright]]
    assert np.median(ratio) == pytest.approx(0.99, abs=0.02)


def test_find_sources_in_threads_matches_one_at_a_time(star_field) -> None:
    """Extraction's pixel stack is sized per image under a lock: images of different
    sizes extracted side by side give what they give alone."""
    from concurrent.futures import ThreadPoolExecutor

    data = star_field[0]
    images = [data, np.ascontiguousarray(data[:128, :200]), np.tile(data, (2, 2))] * 2
    alone = [find_sources(image, 5.0) for image in images]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda image: find_sources(image, 5.0), images))
    for a, b in zip(alone, together, strict=True):
        assert len(a) == len(b) > 0
        np.testing.assert_array_equal(np.asarray(a["x"]), np.asarray(b["x"]))
        np.testing.assert_array_equal(np.asarray(a["flux"]), np.asarray(b["flux"]))


def test_find_sources_on_empty_sky_returns_an_empty_table_with_columns() -> None:
    data = np.random.default_rng(2).normal(0.0, 1.0, (128, 128)).astype(np.float32)
    sources = find_sources(data, 1.0, threshold=8.0)
    assert len(sources) == 0
    assert {"x", "y", "flux", "flux_err", "snr", "r50", "flag", "npix"} <= set(sources.colnames)


def test_select_stars_keeps_stars_and_drops_galaxies(pipeline_run) -> None:
    sim, pair = pipeline_run.sim, pipeline_run.pair
    sources = pair.reference_sources
    truth = sim.sources
    tree = cKDTree(np.column_stack([truth["x_ref"], truth["y_ref"]]))
    level = sim.reference.saturation - float(np.median(sim.reference.data))

    def kinds(table):
        _, index = tree.query(np.column_stack([table["x"], table["y"]]))
        return np.asarray(truth["kind"])[index]

    stars = select_stars(sources, pair.science.shape, saturation_level=level)
    assert len(stars) >= 8
    assert set(kinds(stars)) == {"star"}
    # the cuts without the stellar locus let galaxies in: the locus does that work
    loose = select_stars(sources, pair.science.shape, saturation_level=level, locus=False)
    assert (kinds(loose) == "galaxy").sum() >= 5
    assert np.all(np.asarray(stars["snr"]) >= 30)
    assert np.all(np.asarray(stars["peak"]) < 0.8 * level)


def test_select_stars_needs_three_sources(star_field) -> None:
    data = star_field[0]
    sources = find_sources(data, 5.0)
    assert len(select_stars(sources[:2], data.shape)) == 0


def test_source_footprints_cover_bright_star_wings(star_field) -> None:
    data, model, *_ = star_field
    footprint = source_footprints(data, 5.0)
    assert footprint[model > 5.0].mean() > 0.995  # everything above 1σ of star light
    assert footprint[model < 0.1].mean() < 0.05  # little empty sky


def test_noise_correlation_of_resampled_noise() -> None:
    from scipy.signal import fftconvolve

    from pipeline.science.background import noise_correlation

    rng = np.random.default_rng(11)
    sigma = 4.0
    h = np.array([[0.0, 0.15, 0.0], [0.15, 0.4, 0.15], [0.0, 0.15, 0.0]])
    noise = fftconvolve(rng.normal(0.0, sigma, (600, 600)), h, mode="same")
    acf = noise_correlation(noise, sigma, lags=2)
    expected = fftconvolve(h, h[::-1, ::-1])
    np.testing.assert_allclose(acf, expected, atol=0.01)
    np.testing.assert_array_equal(acf, acf[::-1, ::-1])
    # white noise: 1 at the centre and nothing else; a source and masked pixels do not count
    white = rng.normal(0.0, sigma, (400, 400))
    white[100:110, 100:110] += 500.0
    mask = np.zeros(white.shape, bool)
    mask[300:, :] = True
    white[300:, :] = 1e6
    acf = noise_correlation(white, np.full(white.shape, sigma), mask, lags=1)
    assert np.abs(acf - np.pad([[1.0]], 1)).max() < 0.03
    with pytest.raises(ScienceError, match="background pixels"):
        noise_correlation(white, sigma, np.ones(white.shape, bool))
