"""Stamps around candidates, and cross-matching with reference sources and catalogues."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from astropy.table import Table

from pipeline.errors import ScienceError
from pipeline.science.crossmatch import crossmatch, read_catalog
from pipeline.science.cutouts import cutout, cutout_triplets


def coded_image(shape: tuple[int, int] = (100, 120)) -> np.ndarray:
    """Pixel value 1000·y + x: every pixel says where it came from."""
    yy, xx = np.indices(shape)
    return (1000.0 * yy + xx).astype(np.float32)


def test_cutout_is_centred_on_the_nearest_pixel() -> None:
    image = coded_image()
    stamp = cutout(image, 50.3, 40.6, size=7)
    assert stamp.shape == (7, 7) and stamp.dtype == np.float32
    assert stamp[3, 3] == 1000 * 41 + 50
    assert stamp[0, 0] == 1000 * 38 + 47
    assert np.array_equal(stamp, image[38:45, 47:54])


def test_cutout_at_an_edge_is_nan_padded_and_stays_centred() -> None:
    image = coded_image()
    stamp = cutout(image, 1.0, 98.0, size=7)  # 2 columns off the left, 2 rows off the top
    assert stamp[3, 3] == 1000 * 98 + 1
    assert np.isnan(stamp[:, :2]).all() and np.isnan(stamp[-2:, :]).all()
    assert np.array_equal(stamp[:5, 2:], image[95:100, 0:5])
    # entirely outside: all NaN, no error
    assert np.isnan(cutout(image, -50.0, -50.0, size=7)).all()


def test_triplets_stack_science_reference_difference() -> None:
    science = coded_image()
    x, y = np.array([10.0, 60.0, 119.0]), np.array([5.0, 50.0, 99.0])
    stamps = cutout_triplets(science, science + 0.25, science + 0.5, x, y)
    assert stamps.shape == (3, 3, 63, 63) and stamps.dtype == np.float32
    assert stamps[1, 0, 31, 31] == 1000 * 50 + 60
    assert stamps[1, 1, 31, 31] == 1000 * 50 + 60.25
    assert stamps[1, 2, 31, 31] == 1000 * 50 + 60.5
    assert np.isnan(stamps[2, :, 31, 32:]).all()  # beyond the right edge
    assert cutout_triplets(science, science, science, np.zeros(0), np.zeros(0)).shape == (
        0,
        3,
        63,
        63,
    )


def test_the_mask_stamp_marks_defects_and_the_outside() -> None:
    science = coded_image()
    mask = np.zeros(science.shape, dtype=np.uint8)
    mask[50, 58:61] = 8  # a repaired cosmic ray left of the candidate at (60, 50)
    mask[10:20, 100] = 2  # a lost (saturated) patch elsewhere
    x, y = np.array([60.0, 119.0]), np.array([50.0, 50.0])
    stamps = cutout_triplets(science, science, science, x, y, size=7, mask=mask)
    assert stamps.shape == (2, 4, 7, 7)
    np.testing.assert_array_equal(
        stamps[0, :3], cutout_triplets(science, science, science, x, y, size=7)[0]
    )
    assert stamps[0, 3, 3, 1:4].tolist() == [1.0, 1.0, 1.0] and stamps[0, 3].sum() == 3
    assert (stamps[1, 3, :, 4:] == 1).all() and (stamps[1, 3, :, :4] == 0).all()  # right edge
    with pytest.raises(ValueError, match="mask shape"):
        cutout_triplets(science, science, science, x, y, mask=mask[:10])


ARCSEC = 1.0 / 3600.0


def test_crossmatch_finds_the_nearest_within_the_radius_only() -> None:
    catalog = Table({"ra": [150.0, 150.0, 150.01], "dec": [2.0, 2.0 + 3 * ARCSEC, 2.0]})
    ra = np.array([150.0, 150.0, 150.01 + 2.0 * ARCSEC / np.cos(np.deg2rad(2.0)), 151.0])
    dec = np.array([2.0 + 0.4 * ARCSEC, 2.0 + 2.4 * ARCSEC, 2.0, 2.0])
    index, separation = crossmatch(ra, dec, catalog, radius_arcsec=1.0)
    assert list(index) == [0, 1, -1, -1]
    assert separation[0] == pytest.approx(0.4, abs=1e-3)
    assert separation[1] == pytest.approx(0.6, abs=1e-3)
    assert np.isnan(separation[2:]).all()
    # the 2" offset in RA is a true 2" on the sky (cos dec applied)
    index, separation = crossmatch(ra[2:3], dec[2:3], catalog, radius_arcsec=2.5)
    assert index[0] == 2 and separation[0] == pytest.approx(2.0, abs=1e-3)


def test_crossmatch_with_nothing_to_match() -> None:
    index, separation = crossmatch(np.array([1.0, 2.0]), np.array([0.0, 0.0]), Table(), 1.0)
    assert list(index) == [-1, -1] and np.isnan(separation).all()
    index, _ = crossmatch(np.zeros(0), np.zeros(0), Table({"ra": [1.0], "dec": [0.0]}), 1.0)
    assert len(index) == 0


@pytest.mark.parametrize(
    ("ra", "dec", "suffix"),
    [
        ("ra", "dec", ".ecsv"),
        ("RA", "DEC", ".csv"),
        ("RAJ2000", "DEJ2000", ".fits"),
        ("RA_ICRS", "DE_ICRS", ".vot"),
        ("ra_deg", "Dec", ".ecsv"),
    ],
)
def test_read_catalog_accepts_coordinate_column_variants(
    tmp_path: Path, ra: str, dec: str, suffix: str
) -> None:
    path = tmp_path / f"catalog{suffix}"
    fmt = {".ecsv": "ascii.ecsv", ".csv": "ascii.csv", ".fits": "fits", ".vot": "votable"}
    Table({ra: [150.1, 150.2], dec: [2.1, 2.2], "name": ["a", "b"]}).write(path, format=fmt[suffix])
    table = read_catalog(path)
    assert list(table["ra"]) == [150.1, 150.2]
    assert list(table["dec"]) == [2.1, 2.2]
    assert "name" in table.colnames


def test_read_catalog_says_what_is_wrong(tmp_path: Path) -> None:
    path = tmp_path / "no_coords.ecsv"
    Table({"x": [1.0], "y": [2.0]}).write(path, format="ascii.ecsv")
    with pytest.raises(ScienceError, match=r"no ra/dec columns .*found x, y"):
        read_catalog(path)
    with pytest.raises(ScienceError, match="not found"):
        read_catalog(tmp_path / "missing.fits")
    broken = tmp_path / "broken.fits"
    broken.write_bytes(b"SIMPLE  = this is not FITS")
    with pytest.raises(ScienceError, match="could not be read"):
        read_catalog(broken)
