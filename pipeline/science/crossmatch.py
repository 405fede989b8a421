"""Cross-match candidates with reference-image sources and external catalogues."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from astropy import units as u
from astropy.coordinates import SkyCoord
from astropy.table import Table

from pipeline.errors import ScienceError

__all__ = ["crossmatch", "read_catalog"]

_RA_NAMES = ("ra", "RA", "raj2000", "RAJ2000", "ra_deg", "RA_ICRS")
_DEC_NAMES = ("dec", "DEC", "Dec", "dej2000", "DEJ2000", "dec_deg", "DE_ICRS")


def read_catalog(path: str | os.PathLike[str]) -> Table:
    """Read a source catalogue (ECSV, FITS, VOTable or CSV) with ra/dec in degrees.

    Returns
    -------
    Table
        The catalogue with columns renamed to ``ra`` and ``dec``.

    Raises
    ------
    ScienceError
        If the file is missing, unreadable or has no recognisable coordinate columns.
    """
    file = Path(path)
    if not file.is_file():
        raise ScienceError(f"catalogue {file} not found: fix catalog_path or leave it empty")
    try:
        suffix = file.suffix.lower()
        fmt = {
            ".ecsv": "ascii.ecsv",
            ".csv": "ascii.csv",
            ".fits": "fits",
            ".fit": "fits",
            ".xml": "votable",
            ".vot": "votable",
        }.get(suffix)
        table = Table.read(file, format=fmt) if fmt else Table.read(file)
    except Exception as exc:
        raise ScienceError(f"catalogue {file} could not be read: {exc}") from None
    ra = next((n for n in _RA_NAMES if n in table.colnames), None)
    dec = next((n for n in _DEC_NAMES if n in table.colnames), None)
    if ra is None or dec is None:
        raise ScienceError(
            f"catalogue {file} has no ra/dec columns (looked for {', '.join(_RA_NAMES)} and "
            f"{', '.join(_DEC_NAMES)}; found {', '.join(table.colnames)})"
        )
    if (ra, dec) != ("ra", "dec"):
        table.rename_columns([ra, dec], ["ra", "dec"])
    return table


def crossmatch(
    ra: np.ndarray, dec: np.ndarray, catalog: Table, radius_arcsec: float
) -> tuple[np.ndarray, np.ndarray]:
    """Nearest catalogue source of each position within ``radius_arcsec``.

    Parameters
    ----------
    ra, dec : ndarray
        Positions in degrees (ICRS).
    catalog : Table
        With ``ra`` and ``dec`` columns in degrees.
    radius_arcsec : float
        Match radius.

    Returns
    -------
    index : ndarray of int
        Row in ``catalog`` of the match, -1 where none is within the radius.
    separation : ndarray of float
        Separation in arcseconds (NaN where there is no match).
    """
    n = len(ra)
    if n == 0 or len(catalog) == 0:
        return np.full(n, -1), np.full(n, np.nan)
    here = SkyCoord(np.asarray(ra) * u.deg, np.asarray(dec) * u.deg)
    there = SkyCoord(
        np.asarray(catalog["ra"], dtype=float) * u.deg,
        np.asarray(catalog["dec"], dtype=float) * u.deg,
    )
    index, separation, _ = here.match_to_catalog_sky(there)
    sep = separation.to_value(u.arcsec)
    ok = sep <= radius_arcsec
    return np.where(ok, index, -1), np.where(ok, sep, np.nan)
