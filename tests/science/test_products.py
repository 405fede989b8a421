"""Files handed between steps: preprocessed pair, difference and candidates round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from pipeline.errors import ScienceError
from pipeline.science.products import (
    CATALOG_COLUMNS,
    load_difference,
    load_preprocessed,
    read_candidates,
    save_cutouts,
    save_difference,
    save_preprocessed,
    write_candidates,
)


@pytest.fixture(scope="module")
def saved(pipeline_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("products")
    save_preprocessed(pipeline_run.pair, folder / "pair.fits")
    save_difference(pipeline_run.diff, pipeline_run.pair.wcs, folder / "diff.fits")
    return folder


def test_preprocessed_pair_round_trips(pipeline_run, saved: Path) -> None:
    pair = pipeline_run.pair
    loaded = load_preprocessed(saved / "pair.fits")
    for name in ("science", "reference", "science_rms", "reference_rms"):
        assert np.array_equal(getattr(loaded, name), getattr(pair, name)), name
    assert (loaded.science_gain, loaded.reference_gain) == (pair.science_gain, pair.reference_gain)
    assert np.array_equal(loaded.mask, pair.mask) and loaded.mask.dtype == np.uint8
    for role in ("psf_science", "psf_reference"):
        a, b = getattr(loaded, role), getattr(pair, role)
        assert np.array_equal(a.basis, b.basis)
        assert (a.fwhm, a.n_stars, a.degree, a.shape) == (b.fwhm, b.n_stars, b.degree, b.shape)
        assert np.array_equal(a.at(100.0, 400.0), b.at(100.0, 400.0))
    assert loaded.flux == pair.flux
    reg, original = loaded.registration, pair.registration
    assert (reg.n_matched, reg.offset, reg.rms, reg.refined) == (
        original.n_matched,
        original.offset,
        original.rms,
        original.refined,
    )
    assert loaded.timings == pair.timings
    # the output grid: same sky at a corner pixel
    assert loaded.wcs.pixel_to_world(0, 0).separation(pair.wcs.pixel_to_world(0, 0)).arcsec < 1e-6
    for name in ("reference_sources", "science_sources"):
        a, b = getattr(loaded, name), getattr(pair, name)
        assert a.colnames == b.colnames and len(a) == len(b)
        assert np.array_equal(np.asarray(a["x"]), np.asarray(b["x"]))


def test_preprocessed_round_trip_keeps_the_refined_science_wcs(pipeline_run, saved) -> None:
    loaded = load_preprocessed(saved / "pair.fits").registration.wcs
    refined = pipeline_run.pair.registration.wcs
    x, y = np.array([0.0, 511.0]), np.array([0.0, 511.0])
    assert loaded.pixel_to_world(x, y).separation(refined.pixel_to_world(x, y)).arcsec.max() < 1e-3


def test_preprocessed_round_trip_keeps_the_summary(pipeline_run, saved) -> None:
    loaded = load_preprocessed(saved / "pair.fits")
    assert loaded.summary() == pipeline_run.pair.summary()
    assert loaded.psf_science.model_error == pipeline_run.pair.psf_science.model_error


def test_difference_round_trips(pipeline_run, saved: Path) -> None:
    diff = pipeline_run.diff
    loaded, wcs = load_difference(saved / "diff.fits")
    for name in ("D", "S", "S_corr", "alpha", "alpha_err", "P_D"):
        assert np.array_equal(getattr(loaded, name), getattr(diff, name)), name
    assert np.array_equal(loaded.invalid, diff.invalid) and loaded.invalid.dtype == bool
    assert loaded.F_D == diff.F_D and loaded.scorr_scale == diff.scorr_scale
    assert loaded.backend == diff.backend
    assert loaded.seconds == pytest.approx(diff.seconds, abs=1e-4)
    here = pipeline_run.pair.wcs.pixel_to_world(10, 20)
    assert wcs.pixel_to_world(10, 20).separation(here).arcsec < 1e-6


def test_difference_round_trip_keeps_the_flux_floor(pipeline_run, saved) -> None:
    assert pipeline_run.diff.flux_floor > 0
    loaded, _ = load_difference(saved / "diff.fits")
    assert loaded.flux_floor == pipeline_run.diff.flux_floor


def test_difference_round_trip_keeps_the_star_shifts(pipeline_run, saved) -> None:
    shifts = pipeline_run.diff.star_shifts
    assert len(shifts) > 0  # the simulated pair is registered: its bright stars are fitted
    loaded, _ = load_difference(saved / "diff.fits")
    assert loaded.star_shifts.colnames == shifts.colnames
    for name in shifts.colnames:
        np.testing.assert_array_equal(loaded.star_shifts[name], shifts[name])


def test_missing_products_name_the_step_to_run(tmp_path: Path) -> None:
    with pytest.raises(ScienceError, match="run the step that makes the preprocessed pair"):
        load_preprocessed(tmp_path / "nope.fits")
    with pytest.raises(ScienceError, match="run the step that makes the difference image"):
        load_difference(tmp_path / "nope.fits")
    with pytest.raises(ScienceError, match="run detection first"):
        read_candidates(tmp_path / "nope.ecsv")


def test_writes_leave_no_temporary_files(pipeline_run, saved: Path) -> None:
    assert sorted(p.name for p in saved.iterdir()) == ["diff.fits", "pair.fits"]


def test_candidate_catalogue_round_trips_with_its_observation(pipeline_run, tmp_path) -> None:
    validated = pipeline_run.validated
    path = tmp_path / "out" / "candidates.ecsv"
    write_candidates(validated, path, observation_id="obs-42")
    assert [p.name for p in path.parent.iterdir()] == ["candidates.ecsv"]
    table = read_candidates(path)
    assert table.meta["observation_id"] == "obs-42"
    assert set(CATALOG_COLUMNS) <= set(table.colnames)
    assert len(table) == len(validated)
    for name in ("candidate_id", "x", "y", "ra", "dec", "snr", "flux", "flux_err", "flags"):
        np.testing.assert_allclose(np.asarray(table[name]), np.asarray(validated[name]), rtol=1e-12)
    # ECSV reads the empty reason of a passed candidate back as masked
    assert list(table["reject_reason"].filled("")) == list(validated["reject_reason"])
    assert list(table["passed"]) == list(validated["passed"])
    assert np.isnan(table["rb_score"]).all()
    assert validated.meta.get("observation_id") is None  # the input is not modified


def test_a_table_missing_a_column_is_refused_and_nothing_written(tmp_path: Path) -> None:
    table = Table({name: np.zeros(2) for name in CATALOG_COLUMNS if name != "flux_err"})
    path = tmp_path / "candidates.ecsv"
    with pytest.raises(ScienceError, match=r"lacks column.*flux_err"):
        write_candidates(table, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_catalogue(tmp_path: Path) -> None:
    path = tmp_path / "candidates.ecsv"
    good = Table({name: np.arange(3.0) for name in CATALOG_COLUMNS})
    write_candidates(good, path, observation_id="first")
    bad = good.copy()
    bad["blob"] = np.array([object()] * 3, dtype=object)  # ECSV cannot serialise it
    with pytest.raises(TypeError):
        write_candidates(bad, path, observation_id="second")
    assert read_candidates(path).meta["observation_id"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["candidates.ecsv"]


def test_cutouts_are_saved_as_a_cube_with_ids(tmp_path: Path) -> None:
    from astropy.io import fits

    stamps = np.random.default_rng(0).normal(size=(4, 3, 63, 63)).astype(np.float32)
    save_cutouts(stamps, np.array([3, 5, 8, 13]), tmp_path / "cutouts.fits")
    with fits.open(tmp_path / "cutouts.fits") as hdul:
        assert np.array_equal(hdul[0].data, stamps)
        assert hdul[0].header["CHANNELS"] == "science,reference,difference"
        assert list(hdul["IDS"].data["candidate_id"]) == [3, 5, 8, 13]
    assert [p.name for p in tmp_path.iterdir()] == ["cutouts.fits"]
    with_mask = np.concatenate([stamps, np.zeros_like(stamps[:, :1])], axis=1)
    save_cutouts(with_mask, np.array([3, 5, 8, 13]), tmp_path / "cutouts.fits")
    with fits.open(tmp_path / "cutouts.fits") as hdul:
        assert hdul[0].data.shape == (4, 4, 63, 63)
        assert hdul[0].header["CHANNELS"] == "science,reference,difference,mask"
    with pytest.raises(ValueError, match=r"shape \(n, 3 or 4"):
        save_cutouts(stamps[:, :2], np.array([3, 5, 8, 13]), tmp_path / "cutouts.fits")
