"""Candidate detection on constructed score maps: peaks, positions, measurements and flags."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.table import Table

from pipeline.science.detection import (
    SUMMIT_GAIN,
    CandidateFlag,
    NoDetectionsWarning,
    detect_candidates,
    find_peaks,
    repaired_share,
)
from pipeline.science.differencing import Difference
from pipeline.science.preprocessing import MaskBit
from pipeline.science.psf import measure_fwhm
from pipeline.science.psfmodel import moffat_psf

SHAPE = (128, 128)
FWHM = 3.0
PSF = moffat_psf(25, FWHM, 3.0)
FWHM_SHARP = 2.8  # a sharp-seeing difference
PSF_SHARP = moffat_psf(25, FWHM_SHARP, 3.0)


def test_find_peaks_returns_both_signs_above_threshold_strongest_first() -> None:
    score = np.zeros((64, 64))
    score[10, 20] = 8.0
    score[40, 30] = -6.0
    score[50, 50] = 4.0  # below threshold
    score[20, 50] = 7.0
    score[20, 52] = 6.5  # inside the 5×5 box of the stronger one
    ys, xs = find_peaks(score, 5.0, box=5)
    assert list(zip(ys, xs, strict=True)) == [(10, 20), (20, 50), (40, 30)]
    ys, xs = find_peaks(score, 5.0, box=3)
    assert (20, 52) in set(zip(ys, xs, strict=True))
    invalid = np.zeros(score.shape, dtype=bool)
    invalid[10, 20] = True
    ys, xs = find_peaks(score, 5.0, box=5, invalid=invalid)
    assert (10, 20) not in set(zip(ys, xs, strict=True)) and len(ys) == 2


def gaussian_bump(x0: float, y0: float, amplitude: float) -> np.ndarray:
    sigma = FWHM / 2.3548
    yy, xx = np.indices(SHAPE)
    return amplitude * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * sigma**2))


def _blank_pair(make_pair, psf: np.ndarray = PSF, sigma: float = 1.0, **kwargs):
    """A pair of empty images with ``psf`` in both and noise ``sigma`` (``sigma_reference``
    may differ), for score maps made by hand."""
    kwargs.setdefault("sigma_reference", sigma)
    return make_pair(
        np.zeros(SHAPE), np.zeros(SHAPE), psf_science=psf, psf_reference=psf,
        sigma_science=sigma, **kwargs,
    )  # fmt: skip


def _difference(
    d: np.ndarray, score: np.ndarray, alpha: np.ndarray, err: float, psf: np.ndarray = PSF
) -> Difference:
    """A Difference with ``score`` as S and S_corr, a constant α error and D's PSF ``psf``."""
    return Difference(
        D=d.astype(np.float32),
        S=score.astype(np.float32),
        S_corr=score.astype(np.float32),
        alpha=alpha.astype(np.float32),
        alpha_err=np.full(SHAPE, err, dtype=np.float32),
        P_D=psf.astype(np.float32),
        F_D=1.0,
        invalid=np.zeros(SHAPE, dtype=bool),
        scorr_scale=1.0,
        backend="numpy",
    )


# (x, y, S/N, expected flags); the masks and the reference source below go with them
PEAKS = [
    (40.3, 30.6, 10.0, 0),
    (6.0, 64.0, 8.0, CandidateFlag.EDGE),
    (90.0, 30.0, 9.0, CandidateFlag.MASKED),
    (30.0, 100.0, 7.0, CandidateFlag.NEAR_SATURATED),
    (64.0, 64.0, 12.0, CandidateFlag.NEAR_REFERENCE_SOURCE),
    (100.0, 95.0, 8.0, CandidateFlag.DIPOLE),
    (100.0, 100.0, -8.0, CandidateFlag.DIPOLE),
    (20.0, 20.0, 9.0, CandidateFlag.REPAIRED),  # on a repaired cosmic ray
    (60.0, 100.0, 9.0, 0),  # 3 px from a repaired bad column: its weight is elsewhere
]


@pytest.fixture(scope="module")
def detected(make_pair, tan_wcs):
    score = sum(gaussian_bump(x, y, s) for x, y, s, _ in PEAKS)
    score += gaussian_bump(110.0, 20.0, 4.0)  # below the 5σ threshold
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[30, 94] = MaskBit.NO_DATA  # 4 px from the third peak: within 2 FWHM
    mask[100, 40] = MaskBit.SATURATED  # 10 px from the fourth: within 4 FWHM, beyond 2
    mask[19:22, 19:22] = MaskBit.COSMIC_RAY
    mask[80:, 63] = MaskBit.BAD_COLUMN
    reference_sources = Table({"x": [66.0], "y": [65.0], "flux": [1e4], "snr": [100.0]})
    wcs = tan_wcs(SHAPE)
    pair = _blank_pair(
        make_pair,
        sigma=10.0,
        sigma_reference=5.0,
        mask=mask,
        wcs=wcs,
        reference_sources=reference_sources,
    )
    diff = _difference(score, score, 100.0 * score, 100.0)  # alpha: 100 ADU per σ
    return detect_candidates(diff, pair), pair


def nearest_row(table: Table, x: float, y: float):
    distance = np.hypot(np.asarray(table["x"]) - x, np.asarray(table["y"]) - y)
    return table[int(np.argmin(distance))], float(distance.min())


def test_every_peak_above_threshold_is_found_once(detected) -> None:
    table, _ = detected
    assert len(table) == len(PEAKS)
    assert list(table["candidate_id"]) == list(range(1, len(PEAKS) + 1))
    assert np.all(np.diff(np.abs(np.asarray(table["snr"]))) <= 0)  # strongest first


def test_positions_are_subpixel_and_measurements_read_at_the_peak(detected) -> None:
    table, pair = detected
    for x, y, snr, flag in PEAKS:
        row, distance = nearest_row(table, x, y)
        assert distance < 0.1
        # the significance is read at the peak pixel (up to 8% low for this sharp peak)
        at_pixel = gaussian_bump(x, y, snr)[round(y), round(x)]
        assert abs(at_pixel) - 0.3 <= abs(row["snr"]) <= abs(snr) + 0.3
        assert row["sign"] == np.sign(snr)
        # the flux at the summit between the pixels: the true flux, not the pixel's
        if flag != CandidateFlag.DIPOLE:  # (a dipole's two halves pull each other)
            assert row["flux"] == pytest.approx(100.0 * snr, rel=0.01)
        assert row["flux_err"] == pytest.approx(100.0)
    row, _ = nearest_row(table, 40.3, 30.6)  # 0.3 and 0.4 px off: 3% low at the pixel
    assert abs(row["flux"] - 1000.0) < 0.3 * abs(100.0 * row["snr"] - 1000.0)
    row, _ = nearest_row(table, 40.3, 30.6)
    assert row["fwhm"] == pytest.approx(FWHM, rel=0.05)
    assert row["elongation"] == pytest.approx(1.0, abs=0.05)
    world = pair.wcs.pixel_to_world(row["x"], row["y"])
    assert row["ra"] == pytest.approx(world.ra.deg, abs=1e-9)
    assert row["dec"] == pytest.approx(world.dec.deg, abs=1e-9)


def test_the_threshold_and_snr_apply_to_the_summit_between_pixels(make_pair, tan_wcs) -> None:
    # σ = 1.27 px: 0.45 px off along x the nearest pixel reads 6% low
    bumps = [(30.45, 30.0, 5.2), (80.45, 80.0, 4.95), (60.0, 100.0, 5.2)]
    score = sum(gaussian_bump(x, y, a) for x, y, a in bumps)
    assert score[30, 30] < 5.0  # the pixel grid alone misses the first
    assert score[80, 80] > 5.0 / SUMMIT_GAIN  # the second is looked at, and rejected
    pair = _blank_pair(make_pair, wcs=tan_wcs(SHAPE))
    diff = _difference(score, score, 100.0 * score, 100.0)
    table = detect_candidates(diff, pair)
    assert len(table) == 2  # the 4.95σ summit stays below the threshold
    for x, y, amplitude in (bumps[0], bumps[2]):
        row, distance = nearest_row(table, x, y)
        assert distance < 0.1
        assert row["snr"] == pytest.approx(amplitude, rel=0.01)
    with pytest.warns(NoDetectionsWarning):
        pixel = detect_candidates(diff, pair, threshold=5.3)
    assert len(pixel) == 0
    pixel = detect_candidates(diff, pair, summit=False)
    assert len(pixel) == 1 and pixel["snr"][0] == pytest.approx(5.2)  # the centred one only


def test_flags_are_set_by_edges_masks_sources_and_dipoles(detected) -> None:
    table, _ = detected
    for x, y, _, flags in PEAKS:
        row, _ = nearest_row(table, x, y)
        assert row["flags"] == int(flags), f"peak at ({x}, {y}): {CandidateFlag(row['flags'])!r}"


def test_repaired_share_column_is_the_weight_on_repaired_pixels(detected) -> None:
    table, pair = detected
    on_ray, _ = nearest_row(table, 20.0, 20.0)
    beside_column, _ = nearest_row(table, 60.0, 100.0)
    clean, _ = nearest_row(table, 40.3, 30.6)
    repaired = (pair.mask & np.uint8(MaskBit.COSMIC_RAY | MaskBit.BAD_COLUMN)) > 0
    expected = repaired_share(repaired, PSF, np.array([20, 100]), np.array([20, 60]))
    assert on_ray["repaired_share"] == pytest.approx(expected[0], rel=1e-6)
    assert beside_column["repaired_share"] == pytest.approx(expected[1], rel=1e-6)
    assert on_ray["repaired_share"] > 0.1 > beside_column["repaired_share"] > 0.0
    assert clean["repaired_share"] == 0.0


def test_an_empty_score_map_warns_and_returns_an_empty_table(make_pair) -> None:
    pair = _blank_pair(make_pair)
    zeros = np.zeros(SHAPE, dtype=np.float32)
    diff = Difference(
        D=zeros,
        S=zeros,
        S_corr=zeros,
        alpha=zeros,
        alpha_err=zeros + 1,
        P_D=PSF,
        F_D=1.0,
        invalid=np.zeros(SHAPE, dtype=bool),
        scorr_scale=1.0,
        backend="numpy",
    )
    with pytest.warns(NoDetectionsWarning):
        table = detect_candidates(diff, pair, threshold=3.0)
    assert len(table) == 0
    assert table["flags"].dtype.kind == "i" and table["x"].dtype.kind == "f"
    assert table["repaired_share"].dtype.kind == "f"


def test_constructed_cases_sit_inside_the_flag_radii() -> None:
    # the flag radii scale with the measured FWHM; keep the constructed cases meaningful
    assert 2.0 * measure_fwhm(PSF) > 4.0 + 1.0  # the NO_DATA pixel is inside 2 FWHM
    assert 2.0 * measure_fwhm(PSF) < 10.0 < 4.0 * measure_fwhm(PSF)


def test_repaired_share_is_the_matched_filter_weight_on_repaired_pixels() -> None:
    repaired = np.zeros(SHAPE, dtype=bool)
    repaired[:, 63] = True  # a bad column
    share = repaired_share(repaired, PSF, np.array([50, 50, 50]), np.array([63, 61, 10]))
    weight = PSF**2 / np.sum(PSF**2)
    assert share[0] == pytest.approx(weight[:, 12].sum())  # the column through the centre
    assert share[1] == pytest.approx(weight[:, 14].sum())  # two columns off
    assert share[2] == 0.0
    assert share[0] > 0.1 > share[1]


@pytest.mark.parametrize("width", [1.0, 2.5])
def test_faint_peaks_measure_their_own_width_not_the_noise(
    make_pair, tan_wcs, grid_positions, render_stars, width: float
) -> None:
    """S/N 8 sources in a sharp-seeing difference: point sources measure the PSF's FWHM
    and pass the validation's shape cuts; sources 2.5 times wider mostly fail them.

    Unweighted moments of the positive part of a box measured point sources like these
    at about twice the PSF's width (the noise's positive half spread over the box), so
    the validation's shape cut threw out real transients in sharp images.
    """
    sigma = 1.0
    xs, ys = grid_positions(SHAPE, 16.0, margin=20.0, jitter=0.5, seed=7)
    source = moffat_psf(25, width * FWHM_SHARP, 3.0)
    flux = 8.0 * sigma / np.sqrt(np.sum(source**2))  # S/N 8 in its own matched filter
    image = render_stars(SHAPE, xs, ys, np.full(xs.size, flux), width * FWHM_SHARP)
    image += np.random.default_rng(7).normal(0.0, sigma, SHAPE)
    score = sum(gaussian_bump(x, y, 8.0) for x, y in zip(xs, ys, strict=True))
    pair = _blank_pair(make_pair, PSF_SHARP, sigma, wcs=tan_wcs(SHAPE))
    table = detect_candidates(_difference(image, score, image, 1.0, PSF_SHARP), pair)
    assert len(table) == xs.size
    ratio = np.asarray(table["fwhm"]) / measure_fwhm(PSF_SHARP)
    elongation = np.asarray(table["elongation"])
    if width == 1.0:  # every one passes the validation's default cuts (0.5-2 FWHM, 2)
        assert 0.9 < np.median(ratio) < 1.15
        assert np.all((ratio > 0.5) & (ratio < 2.0))
        assert np.all(elongation < 2.0)
    else:  # wider than 2 FWHM, or too diffuse to measure (NaN): the shape cut's reject
        assert np.mean(~(ratio <= 2.0)) > 0.7


def test_a_peak_with_negative_second_moments_measures_as_too_sharp(make_pair, tan_wcs) -> None:
    """A spike in a negative ring: the signed moments go below zero, not to NaN or a warning."""
    image = np.zeros(SHAPE)
    yy, xx = np.indices(SHAPE)
    ring = np.abs(np.hypot(yy - 64, xx - 64) - 3.0) < 0.5
    image[ring] = -1.0
    image[64, 64] = 40.0
    score = gaussian_bump(64.0, 64.0, 9.0)
    pair = _blank_pair(make_pair, wcs=tan_wcs(SHAPE))
    (row,) = detect_candidates(_difference(image, score, image, 1.0), pair)
    assert 0 < row["fwhm"] < 0.5 * measure_fwhm(PSF)  # the shape cut's "sharper than a PSF"
    assert np.isfinite(row["elongation"]) and row["elongation"] >= 1.0


@pytest.mark.parametrize("sign", [1, -1])
def test_a_faint_peak_whose_centre_pixel_noise_flipped_still_measures_its_shape(
    make_pair, tan_wcs, sign: int
) -> None:
    """The light is measured with the candidate's sign (S_corr's), not the sign of D's
    single peak pixel: at S/N 7 under a 5 px PSF that pixel holds under 2σ of the
    source, so noise flips it for a few per cent of real transients, and they were cut
    for a shape (NaN) that was never measured.
    """
    image = gaussian_bump(64.0, 64.0, 1.0)
    image[64, 64] -= 1.2  # the noise that flips the peak pixel
    image *= sign
    assert np.sign(image[64, 64]) == -sign and sign * image.sum() > 0
    score = sign * gaussian_bump(64.0, 64.0, 7.0)
    pair = _blank_pair(make_pair, wcs=tan_wcs(SHAPE))
    (row,) = detect_candidates(_difference(image, score, image, 1.0), pair)
    assert row["sign"] == sign
    assert 0.5 * measure_fwhm(PSF) < row["fwhm"] < 2.0 * measure_fwhm(PSF)
    assert 1.0 <= row["elongation"] < 1.1
