"""A bright star's own shift between the epochs: fitted from its dipole in S and removed."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from pipeline.science.differencing import difference_pair
from pipeline.science.preprocessing import preprocess_pair
from pipeline.science.simulate import inject_fakes, simulate_pair
from pipeline.science.starshift import correct_star_shifts

SHAPE = (96, 96)
FWHM = 4.0
SIGMA_FIELD = (0.4, 0.3)


def _star_maps(
    shift: tuple[float, float], *, amplitude: float = 2000.0, transient: float = 0.0, seed: int = 0
) -> tuple[dict[str, np.ndarray], tuple[float, float]]:
    """S_N of a star at the centre, S = its dipole for ``shift`` + a transient on it + noise.

    S's noise has unit variance; V holds it plus the field's astrometric term.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.indices(SHAPE, dtype=float)
    centre = (47.3, 48.6)
    width = 1.4 * FWHM / 2.355  # S_N is the image filtered by its PSF: √2 wider
    profile = np.exp(-((xx - centre[0]) ** 2 + (yy - centre[1]) ** 2) / (2 * width**2))
    s_n = amplitude * profile
    gy, gx = np.gradient(s_n)
    score = -(shift[0] * gx + shift[1] * gy) + transient * profile + rng.normal(size=SHAPE)
    variance = 1.0 + SIGMA_FIELD[0] ** 2 * gx**2 + SIGMA_FIELD[1] ** 2 * gy**2
    maps = {k: v.astype(np.float32) for k, v in (("S", score), ("V", variance), ("S_N", s_n))}
    return maps, centre


def _one_source(centre: tuple[float, float]) -> Table:
    return Table({"x": [centre[0]], "y": [centre[1]]})


def test_a_stars_own_shift_is_fitted_and_its_dipole_removed() -> None:
    maps, centre = _star_maps((0.23, -0.11))
    before = maps["V"].copy()
    shifts = correct_star_shifts(
        maps, _one_source(centre), SIGMA_FIELD, FWHM, np.zeros(SHAPE, bool)
    )
    assert len(shifts) == 1
    row = shifts[0]
    assert row["dx"] == pytest.approx(0.23, abs=4 * row["dx_err"] + 1e-3)
    assert row["dy"] == pytest.approx(-0.11, abs=4 * row["dy_err"] + 1e-3)
    assert row["dx_err"] < 0.01 and row["dy_err"] < 0.01
    # what is left around the star is the noise, and its variance says so
    yy, xx = np.indices(SHAPE)
    near = np.hypot(xx - centre[0], yy - centre[1]) <= 2 * FWHM
    assert np.std(maps["S"][near]) == pytest.approx(1.0, abs=0.2)
    assert np.all(maps["V"] <= before + 1e-3)
    assert maps["V"][near].max() < 0.2 * before[near].max()
    far = np.hypot(xx - centre[0], yy - centre[1]) > 3 * FWHM + 1
    np.testing.assert_array_equal(maps["V"][far], before[far])


def test_a_transient_on_the_shifted_star_stays_in_the_score() -> None:
    maps, centre = _star_maps((0.3, 0.2), transient=40.0)
    shifts = correct_star_shifts(
        maps, _one_source(centre), SIGMA_FIELD, FWHM, np.zeros(SHAPE, bool)
    )
    assert shifts[0]["dx"] == pytest.approx(0.3, abs=0.02)
    ix, iy = round(centre[0]), round(centre[1])
    assert maps["S"][iy - 1 : iy + 2, ix - 1 : ix + 2].max() == pytest.approx(40.0, abs=5.0)


@pytest.mark.parametrize(
    ("case", "shift", "amplitude", "masked"),
    [
        ("a shift beyond max_shift is something else", (1.6, 0.0), 2000.0, False),
        ("a masked pixel in the fitting disc", (0.2, 0.0), 2000.0, True),
        ("too faint to beat the field's sigma", (0.2, 0.0), 3.0, False),
    ],
)
def test_sources_the_fit_cannot_serve_are_left_alone(case, shift, amplitude, masked) -> None:
    maps, centre = _star_maps(shift, amplitude=amplitude)
    before = {k: v.copy() for k, v in maps.items()}
    invalid = np.zeros(SHAPE, bool)
    if masked:
        invalid[round(centre[1]) + 1, round(centre[0])] = True
    shifts = correct_star_shifts(maps, _one_source(centre), SIGMA_FIELD, FWHM, invalid)
    assert len(shifts) == 0, case
    for key in maps:
        np.testing.assert_array_equal(maps[key], before[key])


def test_no_astrometric_sigma_means_nothing_to_correct() -> None:
    maps, centre = _star_maps((0.2, 0.0))
    shifts = correct_star_shifts(maps, _one_source(centre), (0.0, 0.0), FWHM, np.zeros(SHAPE, bool))
    assert len(shifts) == 0 and shifts.colnames == ["x", "y", "dx", "dy", "dx_err", "dy_err"]


def test_a_star_that_moved_between_the_epochs_leaves_no_candidate() -> None:
    """A static star 0.35 px off in the science alone (colour refraction, proper motion)."""
    sim = simulate_pair((384, 384), seed=7, n_stars=150, n_galaxies=40, n_transients=10)
    pair = preprocess_pair(sim.science, sim.reference)
    # the point of the field's inner part farthest from every source and transient
    grid = np.stack(np.meshgrid(np.arange(60.0, 325.0, 3.0), np.arange(60.0, 325.0, 3.0)), -1)
    grid = grid.reshape(-1, 2) + 0.37
    taken = np.vstack(
        [
            np.column_stack([pair.reference_sources["x"], pair.reference_sources["y"]]),
            np.column_stack([sim.truth["x_ref"], sim.truth["y_ref"]]),
        ]
    )
    clear = np.hypot(*(grid[:, None, :] - taken[None, :, :]).transpose(2, 0, 1)).min(axis=1)
    place = grid[[int(np.argmax(clear))]]  # reference pixels
    world = sim.reference.wcs.pixel_to_world(place[:, 0], place[:, 1])
    in_science = np.column_stack(sim.science.wcs.world_to_pixel(world))
    moved = (0.35, 0.0)
    flux = 0.25 * sim.reference.saturation / pair.psf_reference.global_stamp.max()
    science = inject_fakes(
        sim.science,
        pair.psf_science.global_stamp,
        in_science + np.array(moved),
        np.array([flux * pair.flux.ratio]),
        poisson=False,
    )
    reference = inject_fakes(
        sim.reference, pair.psf_reference.global_stamp, place, np.array([flux]), poisson=False
    )
    moved_pair = preprocess_pair(science, reference)
    fixed = difference_pair(moved_pair)
    plain = difference_pair(moved_pair, star_shifts=False)
    x, y = place[0]
    near = np.hypot(*(np.indices(fixed.S_corr.shape)[::-1] - place[0][:, None, None]))
    disc = near <= 3 * moved_pair.psf_science.fwhm
    # uncorrected, the star's dipole is the worst residual of the field and sets the flux
    # floor that hides every transient near a star; corrected, it is quiet and the floor
    # is the other stars'
    assert plain.flux_floor > 2.5 * fixed.flux_floor
    assert np.abs(fixed.S_corr[disc]).max() < 4.0
    rows = fixed.star_shifts[np.hypot(fixed.star_shifts["x"] - x, fixed.star_shifts["y"] - y) < 1]
    assert len(rows) == 1
    # relative to the registration, which this bright star pulls a little its way
    assert rows[0]["dx"] == pytest.approx(moved[0], abs=0.1)
    assert rows[0]["dy"] == pytest.approx(moved[1], abs=0.03)
