"""Tests for pipeline.science.io: reading, checking and writing FITS images."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from pipeline.errors import (
    BandMismatchError,
    EmptyImageError,
    FootprintError,
    ImageNotFoundError,
    ImageTooLargeError,
    InvalidOverrideError,
    NoImageError,
    NotFitsError,
    ScienceError,
    WCSError,
)
from pipeline.science.image import Image
from pipeline.science.io import (
    DEFAULTS,
    check_pair,
    normalise_band,
    overlap_fraction,
    read_image,
    write_image,
)

DECAM = Path(__file__).resolve().parents[1] / "data" / "decam"
SCALE = 0.25 / 3600  # deg per pixel


def make_wcs(
    shape: tuple[int, int] = (64, 64),
    crval: tuple[float, float] = (150.0, 2.0),
    shift: tuple[float, float] = (0.0, 0.0),
) -> WCS:
    """A TAN WCS with north up, centred on crval, its pixel grid shifted by (dx, dy) pixels."""
    ny, nx = shape
    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = list(crval)
    wcs.wcs.crpix = [(nx + 1) / 2 - shift[0], (ny + 1) / 2 - shift[1]]
    wcs.wcs.cd = [[-SCALE, 0.0], [0.0, SCALE]]
    return wcs


def noise(shape: tuple[int, ...] = (64, 64), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 5.0, shape).astype(np.float32)


def header_with(wcs: WCS | None = None, **cards: object) -> fits.Header:
    header = (make_wcs() if wcs is None else wcs).to_header()
    header.update(cards)
    return header


def write_fits(path: Path, data: np.ndarray, header: fits.Header | None = None) -> Path:
    fits.PrimaryHDU(data=data, header=header if header is not None else header_with()).writeto(path)
    return path


def make_image(
    shape: tuple[int, int] = (64, 64), band: str | None = "r", **wcs_args: object
) -> Image:
    return Image(data=noise(shape), wcs=make_wcs(shape, **wcs_args), band=band)


# --- the real DECam files ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "gain", "saturation"),
    [
        ("DEC-OBS04a.mini.fits", 3.984046692260535, 46536.1041736873),
        ("DEC-OBS04b.mini.fits", 3.984046692260535, 46536.1041736873),
        ("Stack-DEC-OBS18.fits", 4.1505, 46251.0),
    ],
)
def test_decam_files_read_with_their_header_facts(name: str, gain: float, saturation: float):
    image = read_image(DECAM / name)

    assert image.shape == (256, 256)
    assert image.data.dtype == np.float32
    assert image.gain == pytest.approx(gain)
    assert image.read_noise == pytest.approx(11.83702)
    assert image.saturation == pytest.approx(saturation)
    assert image.exptime == 330.0
    assert image.band == "i"
    assert image.mjd == pytest.approx(58334.39133794)
    assert image.meta["defaulted"] == []
    assert image.meta["keywords"]["saturation"] == "SATURATE"


def test_decam_wcs_maps_pixels_to_the_field_and_back():
    image = read_image(DECAM / "DEC-OBS04a.mini.fits")

    centre = image.wcs.pixel_to_world(127.5, 127.5)
    assert centre.ra.deg == pytest.approx(318.1082, abs=1e-3)
    assert centre.dec.deg == pytest.approx(-66.0156, abs=1e-3)
    x, y = image.wcs.world_to_pixel(image.wcs.pixel_to_world(10.0, 200.0))
    assert (float(x), float(y)) == pytest.approx((10.0, 200.0), abs=1e-6)
    scale_arcsec = math.sqrt(abs(np.linalg.det(image.wcs.pixel_scale_matrix))) * 3600
    assert scale_arcsec == pytest.approx(0.2623, abs=1e-3)
    assert image.wcs.array_shape == (256, 256)


def test_decam_pair_passes_check_pair_with_full_overlap():
    science = read_image(DECAM / "DEC-OBS04a.mini.fits")
    reference = read_image(DECAM / "Stack-DEC-OBS18.fits")

    assert check_pair(science, reference) == pytest.approx(1.0, abs=0.01)


# --- file and HDU errors -------------------------------------------------------------------


def test_missing_file_raises_image_not_found(tmp_path: Path):
    path = tmp_path / "nothing.fits"
    with pytest.raises(ImageNotFoundError, match="does not exist: check the path") as info:
        read_image(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert isinstance(info.value, ScienceError)


def test_directory_raises_image_not_found(tmp_path: Path):
    with pytest.raises(ImageNotFoundError, match="is a directory, not an image"):
        read_image(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "is empty"),
        (b"ra,dec,flux\n1,2,3\n", "is not a FITS file"),
    ],
)
def test_non_fits_file_raises_not_fits(tmp_path: Path, content: bytes, message: str):
    path = tmp_path / "catalog.fits"
    path.write_bytes(content)
    with pytest.raises(NotFitsError, match=message) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_truncated_file_raises_not_fits(tmp_path: Path):
    whole = write_fits(tmp_path / "whole.fits", noise((100, 100)))
    cut = tmp_path / "cut.fits"
    cut.write_bytes(whole.read_bytes()[:5000])
    with pytest.raises(NotFitsError, match="truncated") as info:
        read_image(cut)
    assert "cut.fits" in str(info.value)


def test_file_with_only_a_table_raises_no_image(tmp_path: Path):
    path = tmp_path / "table.fits"
    table = fits.BinTableHDU.from_columns([fits.Column(name="x", format="E", array=[1.0, 2.0])])
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(path)
    with pytest.raises(NoImageError, match="has no image HDU") as info:
        read_image(path)
    assert "BinTableHDU" in str(info.value)
    with pytest.raises(NoImageError, match=r"HDU 1 holds no image data"):
        read_image(path, hdu=1)
    with pytest.raises(NoImageError, match=r"has no HDU 'SCI'.*pass one of those as hdu="):
        read_image(path, hdu="SCI")


def test_image_hdu_after_empty_primary_is_read(tmp_path: Path):
    path = tmp_path / "mef.fits"
    data = noise()
    image_hdu = fits.ImageHDU(data=data, header=header_with(GAIN=2.0), name="SCI")
    fits.HDUList([fits.PrimaryHDU(), image_hdu]).writeto(path)

    image = read_image(path)

    assert image.meta["hdu"] == 1
    np.testing.assert_array_equal(image.data, data)
    assert image.gain == 2.0
    assert read_image(path, hdu="SCI").meta["hdu"] == 1


def test_tile_compressed_fz_file_is_read(tmp_path: Path):
    path = tmp_path / "image.fits.fz"
    data = np.random.default_rng(1).integers(0, 5000, (64, 48)).astype(np.int16)
    header = header_with(make_wcs((64, 48)), GAIN=3.0, FILTER="g")
    fits.HDUList([fits.PrimaryHDU(), fits.CompImageHDU(data=data, header=header)]).writeto(path)

    image = read_image(path)

    assert image.meta["hdu"] == 1
    assert image.shape == (64, 48)
    np.testing.assert_array_equal(image.data, data.astype(np.float32))
    assert (image.gain, image.band) == (3.0, "g")
    assert np.isfinite(image.wcs.pixel_to_world_values(20, 30)).all()


def test_cube_with_a_length_one_axis_is_squeezed(tmp_path: Path):
    data = noise((1, 40, 30))
    path = write_fits(tmp_path / "cube1.fits", data, header_with(make_wcs((40, 30))))

    image = read_image(path)

    assert image.shape == (40, 30)
    np.testing.assert_array_equal(image.data, data[0])
    assert image.wcs.naxis == 2
    assert image.wcs.pixel_to_world_values(14.5, 19.5) == pytest.approx((150.0, 2.0))


def test_true_cube_is_refused(tmp_path: Path):
    path = write_fits(tmp_path / "cube.fits", noise((3, 40, 30)), header_with(make_wcs((40, 30))))
    with pytest.raises(NoImageError, match=r"shape \(3, 40, 30\), a cube: split it") as info:
        read_image(path)
    assert "cube.fits" in str(info.value)


def test_image_too_large_names_both_numbers(tmp_path: Path):
    path = write_fits(tmp_path / "big.fits", noise((40, 30)))
    with pytest.raises(ImageTooLargeError, match="has 1200 pixels") as info:
        read_image(path, max_pixels=1000)
    assert "max_pixels=1000" in str(info.value)
    assert "big.fits" in str(info.value)


# --- pixel values --------------------------------------------------------------------------


def test_data_become_float32_with_inf_as_nan(tmp_path: Path):
    data = noise().astype(np.float64)
    data[3, 4], data[5, 6], data[7, 8] = np.inf, -np.inf, np.nan
    image = read_image(write_fits(tmp_path / "inf.fits", data))

    assert image.data.dtype == np.float32
    assert np.isnan(image.data).sum() == 3
    assert np.isnan(image.data[[3, 5, 7], [4, 6, 8]]).all()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (np.full((32, 32), np.nan, dtype=np.float32), "has no finite pixels"),
        (np.full((32, 32), 7.0, dtype=np.float32), "is constant .every finite pixel is 7"),
    ],
)
def test_empty_image_is_refused(tmp_path: Path, data: np.ndarray, message: str):
    path = write_fits(tmp_path / "flat.fits", data, header_with(make_wcs((32, 32))))
    with pytest.raises(EmptyImageError, match=message) as info:
        read_image(path)
    assert "flat.fits" in str(info.value)


# --- WCS -----------------------------------------------------------------------------------


def test_missing_wcs_raises_wcs_error_with_the_fix(tmp_path: Path):
    path = write_fits(tmp_path / "reference.fits", noise(), fits.Header())
    expected = f"{path} has no celestial WCS: add CTYPE/CRVAL/CRPIX/CD keywords or pass wcs="
    with pytest.raises(WCSError, match=re.escape(expected)):
        read_image(path)


def test_wcs_argument_replaces_a_missing_header_wcs(tmp_path: Path):
    path = write_fits(tmp_path / "reference.fits", noise(), fits.Header())
    image = read_image(path, wcs=make_wcs(crval=(10.0, -5.0)))
    assert image.wcs.pixel_to_world_values(31.5, 31.5) == pytest.approx((10.0, -5.0))


def test_singular_pixel_scale_matrix_is_refused(tmp_path: Path):
    wcs = make_wcs()
    wcs.wcs.cd = [[SCALE, SCALE], [SCALE, SCALE]]
    path = write_fits(tmp_path / "singular.fits", noise(), header_with(wcs))
    with pytest.raises(WCSError, match="singular or non-finite pixel scale matrix"):
        read_image(path)


def test_non_finite_crval_is_refused(tmp_path: Path):
    wcs = make_wcs()
    wcs.wcs.crval = [np.nan, 2.0]
    path = write_fits(tmp_path / "image.fits", noise(), fits.Header())
    with pytest.raises(WCSError, match="non-finite CRVAL or CRPIX"):
        read_image(path, wcs=wcs)


def test_linear_only_wcs_is_refused(tmp_path: Path):
    header = fits.Header({"CTYPE1": "LINEAR", "CTYPE2": "LINEAR", "CDELT1": 1.0, "CDELT2": 1.0})
    path = write_fits(tmp_path / "lab.fits", noise(), header)
    with pytest.raises(WCSError, match="has no celestial WCS"):
        read_image(path)


# --- header facts and overrides ------------------------------------------------------------


def test_missing_facts_get_defaults_and_are_listed(tmp_path: Path):
    image = read_image(write_fits(tmp_path / "bare.fits", noise()))

    assert image.gain == DEFAULTS["gain"] == 1.0
    assert image.read_noise == 0.0
    assert image.saturation == math.inf
    assert image.exptime == 1.0
    assert image.band is None
    assert image.mjd is None
    assert image.meta["defaulted"] == ["gain", "read_noise", "saturation", "exptime", "band", "mjd"]


@pytest.mark.parametrize(
    ("cards", "fact", "expected"),
    [
        ({"EGAIN": 2.5}, "gain", 2.5),
        ({"GAINA": 3.0, "GAINB": 5.0}, "gain", 4.0),
        ({"GAIN": 0.0, "EGAIN": 1.7}, "gain", 1.7),  # an impossible GAIN is skipped
        ({"READNOIS": 6.5}, "read_noise", 6.5),
        ({"RON": 4.0}, "read_noise", 4.0),
        ({"RDNOISEA": 10.0, "RDNOISEB": 12.0}, "read_noise", 11.0),
        ({"SATLEVEL": 60000.0}, "saturation", 60000.0),
        ({"SATURATA": 46000.0, "SATURATB": 42000.0}, "saturation", 42000.0),
        ({"EXPOSURE": 90.0}, "exptime", 90.0),
        ({"BAND": "SDSS-R"}, "band", "r"),
        ({"MJD-OBS": 60000.25}, "mjd", 60000.25),
        ({"DATE-OBS": "2018-08-04T09:23:31.598174"}, "mjd", 58334.39133794),
        ({"DATE-OBS": "2018-08-04", "TIME-OBS": "12:00:00"}, "mjd", 58334.5),
    ],
)
def test_alternative_header_keywords(tmp_path: Path, cards: dict, fact: str, expected: object):
    image = read_image(write_fits(tmp_path / "alt.fits", noise(), header_with(**cards)))
    assert getattr(image, fact) == pytest.approx(expected)
    assert fact not in image.meta["defaulted"]


@pytest.mark.parametrize(
    ("raw", "band"),
    [
        ("i DECam SDSS c0003 7835.0 1470.0", "i"),
        ("Y DECam c0005 10095.0 1130.0", "y"),
        ("r_sdss", "r"),
        ("SDSS-R", "r"),
        ("rp", "r"),
        ("r'", "r"),
        ("  g ", "g"),
        ("Z", "z"),
        ("R", "R"),  # Johnson–Cousins R is not SDSS r
        (" Halpha ", "Halpha"),
        ("VR DECam c0007 6300.0 2600.0", "VR DECam c0007 6300.0 2600.0"),
        ("   ", None),
    ],
)
def test_normalise_band(raw: str, band: str | None):
    assert normalise_band(raw) == band


def test_overrides_replace_header_values(tmp_path: Path):
    header = header_with(GAIN=4.0, FILTER="i", EXPTIME=30.0)
    path = write_fits(tmp_path / "science.fits", noise(), header)

    image = read_image(
        path, overrides={"gain": 2.5, "band": "SDSS-R", "mjd": 60000, "saturation": None}
    )

    assert (image.gain, image.band, image.mjd, image.exptime) == (2.5, "r", 60000.0, 30.0)
    assert image.meta["overridden"] == ["band", "gain", "mjd"]
    assert image.meta["defaulted"] == ["read_noise", "saturation"]
    assert (image.header["GAIN"], image.header["FILTER"], image.header["MJD-OBS"]) == (
        2.5,
        "r",
        60000.0,
    )


def test_unknown_override_key_names_the_allowed_keys(tmp_path: Path):
    path = write_fits(tmp_path / "science.fits", noise())
    with pytest.raises(InvalidOverrideError, match=r"unknown override key.*'gian'") as info:
        read_image(path, overrides={"gian": 2.0})
    assert "allowed keys are gain, read_noise, saturation, exptime, band, mjd" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    ("key", "value", "rule"),
    [
        ("gain", 0.0, "> 0"),
        ("gain", math.nan, "> 0"),
        ("gain", math.inf, "finite"),
        ("gain", True, "> 0"),
        ("gain", "2.0", "> 0"),
        ("read_noise", -1.0, ">= 0"),
        ("saturation", 0, "> 0"),
        ("exptime", -30.0, "> 0"),
        ("band", "", "non-empty string"),
        ("band", 3, "non-empty string"),
        ("mjd", math.inf, "finite"),
    ],
)
def test_invalid_override_is_refused(tmp_path: Path, key: str, value: object, rule: str):
    path = write_fits(tmp_path / "science.fits", noise())
    with pytest.raises(InvalidOverrideError, match=f"override {key}=") as info:
        read_image(path, overrides={key: value})
    assert rule in str(info.value)
    assert "science.fits" in str(info.value)


def test_infinite_saturation_override_is_allowed(tmp_path: Path):
    path = write_fits(tmp_path / "science.fits", noise(), header_with(SATURATE=40000.0))
    image = read_image(path, overrides={"saturation": math.inf})
    assert image.saturation == math.inf
    assert "SATURATE" not in image.header


# --- footprints and pairs ------------------------------------------------------------------


def test_overlap_of_identical_wcs_is_one():
    assert overlap_fraction(make_image(), make_image()) == pytest.approx(1.0)


@pytest.mark.parametrize("shift", [(32.0, 0.0), (0.0, -32.0)])
def test_overlap_of_half_shifted_wcs_is_one_half(shift: tuple[float, float]):
    science = make_image(shift=shift)
    assert overlap_fraction(science, make_image()) == pytest.approx(0.5, abs=0.03)


def test_overlap_of_quarter_shifted_small_science_image():
    # A 32 x 32 science image centred on the reference's corner covers 16 x 16 of its 64 x 64.
    science = Image(data=noise((32, 32)), wcs=make_wcs((32, 32), shift=(-32.0, -32.0)))
    assert overlap_fraction(science, make_image()) == pytest.approx(1 / 16, abs=0.01)


def test_overlap_converts_between_celestial_frames():
    reference = make_image()
    science = make_image()
    science.wcs.wcs.ctype = ["GLON-TAN", "GLAT-TAN"]
    centre = reference.wcs.pixel_to_world(31.5, 31.5).galactic
    science.wcs.wcs.crval = [centre.l.deg, centre.b.deg]
    science.wcs.wcs.set()
    # Same centre, rotated by the angle between galactic and equatorial north: a square
    # rotated about its centre still covers at least 2 (sqrt(2) - 1) = 0.83 of itself.
    assert overlap_fraction(science, reference) > 0.82


def test_disjoint_footprints_fail_check_pair():
    science = make_image(crval=(151.0, 2.0))
    science.path, reference = "science.fits", make_image()
    reference.path = "reference.fits"

    assert overlap_fraction(science, reference) == 0.0
    with pytest.raises(FootprintError, match=r"covers 0\.0% of reference image reference\.fits"):
        check_pair(science, reference)


def test_check_pair_enforces_min_overlap():
    science, reference = make_image(shift=(32.0, 0.0)), make_image()
    assert check_pair(science, reference, min_overlap=0.4) == pytest.approx(0.5, abs=0.03)
    with pytest.raises(FootprintError, match=r"covers 50.0% .*less than min_overlap=60%"):
        check_pair(science, reference, min_overlap=0.6)


def test_band_mismatch_is_refused_only_when_both_bands_are_known():
    science, reference = make_image(band="r"), make_image(band="i")
    with pytest.raises(BandMismatchError, match="in band 'r' but reference image is in band 'i'"):
        check_pair(science, reference)
    assert check_pair(make_image(band=None), reference) == pytest.approx(1.0)


# --- writing -------------------------------------------------------------------------------


def test_write_read_round_trip_keeps_data_facts_wcs_and_mask(tmp_path: Path):
    data = noise((40, 50))
    data[2, 3] = np.nan
    mask = np.zeros((40, 50), dtype=bool)
    mask[10:12, 20:25] = True
    image = Image(
        data=data,
        wcs=make_wcs((40, 50)),
        gain=2.2,
        read_noise=5.5,
        saturation=50000.0,
        exptime=45.0,
        band="z",
        mjd=60123.456789,
        mask=mask,
    )
    path = tmp_path / "out.fits"

    write_image(image, path)
    back = read_image(path)

    np.testing.assert_array_equal(back.data, data)
    for fact in ("gain", "read_noise", "saturation", "exptime", "band", "mjd"):
        assert getattr(back, fact) == getattr(image, fact), fact
    assert back.meta["defaulted"] == []
    np.testing.assert_array_equal(back.mask, mask)
    corners = ([0, 49, 0, 49], [0, 0, 39, 39])
    np.testing.assert_allclose(
        back.wcs.pixel_to_world_values(*corners), image.wcs.pixel_to_world_values(*corners)
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.fits"]


def test_round_trip_of_unknown_facts(tmp_path: Path):
    image = Image(data=noise(), wcs=make_wcs())
    path = tmp_path / "bare.fits"
    write_image(image, path)
    back = read_image(path)
    assert (back.saturation, back.band, back.mjd, back.mask) == (math.inf, None, None, None)
    assert back.meta["defaulted"] == ["saturation", "band", "mjd"]


def test_decam_round_trip_keeps_tpv_wcs_and_header_cards(tmp_path: Path):
    image = read_image(DECAM / "DEC-OBS04a.mini.fits")
    path = tmp_path / "decam.fits"
    write_image(image, path)
    back = read_image(path)

    np.testing.assert_array_equal(back.data, image.data)
    assert (back.gain, back.read_noise, back.saturation, back.band, back.mjd) == (
        image.gain,
        image.read_noise,
        image.saturation,
        "i",
        image.mjd,
    )
    corners = ([0, 255, 0, 255], [0, 0, 255, 255])
    np.testing.assert_allclose(
        back.wcs.pixel_to_world_values(*corners), image.wcs.pixel_to_world_values(*corners)
    )
    assert back.header["FWHM"] == pytest.approx(5.231596)  # non-WCS cards are carried
    assert "LTV1" not in back.header  # stale IRAF physical-coordinate cards are not


def test_write_replaces_atomically_and_leaves_no_temp_file_on_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    path = tmp_path / "image.fits"
    write_image(Image(data=noise(), wcs=make_wcs(), gain=2.0), path)
    before = path.read_bytes()

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(fits.HDUList, "writeto", fail)
    with pytest.raises(OSError, match="disk full"):
        write_image(Image(data=noise(seed=1), wcs=make_wcs(), gain=3.0), path)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.fits"]


def test_write_refuses_a_mask_of_another_shape(tmp_path: Path):
    image = Image(data=noise(), wcs=make_wcs(), mask=np.zeros((3, 3), dtype=bool))
    with pytest.raises(ValueError, match="mask shape"):
        write_image(image, tmp_path / "image.fits")


def test_mask_of_another_shape_in_a_file_is_refused(tmp_path: Path):
    path = tmp_path / "masked.fits"
    primary = fits.PrimaryHDU(data=noise(), header=header_with())
    mask = fits.ImageHDU(data=np.zeros((3, 3), dtype=np.uint8), name="MASK")
    fits.HDUList([primary, mask]).writeto(path)
    with pytest.raises(ScienceError, match=r"MASK HDU of shape \(3, 3\) but an image of shape"):
        read_image(path)
