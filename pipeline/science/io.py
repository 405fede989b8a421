"""Read, check and write the FITS images that enter the pipeline.

:func:`read_image` turns a FITS file into an :class:`~pipeline.science.image.Image` with a
validated celestial WCS and normalised header facts (gain, read noise, saturation, exposure time,
band, MJD); :func:`check_pair` refuses a science/reference pair that cannot be differenced;
:func:`write_image` writes an image back so that :func:`read_image` recovers the same facts.
"""

from __future__ import annotations

import math
import os
import re
import statistics
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.time import Time
from astropy.utils.exceptions import AstropyUserWarning
from astropy.wcs import WCS, FITSFixedWarning
from erfa import ErfaWarning

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

__all__ = [
    "DEFAULTS",
    "MASK_EXTNAME",
    "OVERRIDE_KEYS",
    "check_pair",
    "normalise_band",
    "overlap_fraction",
    "read_image",
    "write_image",
]

#: Value of each header fact when neither the header nor an override gives one.
DEFAULTS: Mapping[str, Any] = MappingProxyType(
    {
        "gain": 1.0,
        "read_noise": 0.0,
        "saturation": math.inf,
        "exptime": 1.0,
        "band": None,
        "mjd": None,
    }
)

#: Keys accepted by ``read_image(overrides=...)``.
OVERRIDE_KEYS: tuple[str, ...] = tuple(DEFAULTS)

#: EXTNAME of the optional bad-pixel mask written next to the image (uint8, nonzero = bad).
MASK_EXTNAME = "MASK"

_IMAGE_HDU_TYPES = (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)

# Magic bytes of plain FITS and of the compressed wrappers astropy opens transparently.
_FITS_MAGIC = (b"SIMPLE", b"\x1f\x8b", b"BZh")

# Per fact: single keywords in order of preference, then per-amplifier keywords and how to
# combine them (a CCD read by two amplifiers saturates at the lower of the two levels).
_NUMERIC_KEYWORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...], Callable[..., float]]] = {
    "gain": (("GAIN", "EGAIN"), ("GAINA", "GAINB"), statistics.fmean),
    "read_noise": (("RDNOISE", "READNOIS", "RON"), ("RDNOISEA", "RDNOISEB"), statistics.fmean),
    "saturation": (("SATURATE", "SATLEVEL"), ("SATURATA", "SATURATB"), min),
    "exptime": (("EXPTIME", "EXPOSURE"), (), min),
    "mjd": (("MJD-OBS",), (), min),
}
_BAND_KEYWORDS = ("FILTER", "BAND")

# Keyword each fact is written to, with its comment, and every keyword read for the fact (removed
# when the fact is unknown, so that a stale alternative cannot come back on reading).
_FACT_CARDS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gain": ("GAIN", "[e-/ADU] gain", ("GAIN", "EGAIN", "GAINA", "GAINB")),
    "read_noise": (
        "RDNOISE",
        "[e-] read noise",
        ("RDNOISE", "READNOIS", "RON", "RDNOISEA", "RDNOISEB"),
    ),
    "saturation": (
        "SATURATE",
        "[ADU] saturation level",
        ("SATURATE", "SATLEVEL", "SATURATA", "SATURATB"),
    ),
    "exptime": ("EXPTIME", "[s] exposure time", ("EXPTIME", "EXPOSURE")),
    "band": ("FILTER", "band", _BAND_KEYWORDS),
    "mjd": ("MJD-OBS", "[d] MJD at start of exposure", ("MJD-OBS", "DATE-OBS", "TIME-OBS")),
}

# Cards not carried from an image's original header into a written file: structure (rewritten
# by astropy) and every WCS keyword, because after resampling the old WCS cards would contradict
# the new WCS (e.g. stale TPV PV terms or IRAF LTV offsets).
_DROPPED_CARD = re.compile(
    r"^(SIMPLE|BITPIX|NAXIS\d*|EXTEND|PCOUNT|GCOUNT|XTENSION|EXTNAME|EXTVER|BSCALE|BZERO|BLANK"
    r"|CHECKSUM|DATASUM|Z[A-Z0-9_]*"
    r"|WCSAXES[A-Z]?|WCSNAME[A-Z]?|WCSDIM|CTYPE\d+[A-Z]?|CRVAL\d+[A-Z]?|CRPIX\d+[A-Z]?"
    r"|CDELT\d+[A-Z]?|CUNIT\d+[A-Z]?|CROTA\d+|CD\d+_\d+[A-Z]?|PC\d+_\d+[A-Z]?|PV\d+_\d+[A-Z]?"
    r"|PS\d+_\d+[A-Z]?|CNAME\d+[A-Z]?|CRDER\d+[A-Z]?|CSYER\d+[A-Z]?|LONPOLE[A-Z]?|LATPOLE[A-Z]?"
    r"|RADESYS[A-Z]?|RADECSYS|EQUINOX[A-Z]?|EPOCH|MJDREF|A_\w+|B_\w+|AP_\w+|BP_\w+"
    r"|WAT\d_\d+|LTV\d|LTM\d_\d|CPDIS\d|CQDIS\d|DP\d|DQ\d|D2IM\w+)$"
)

# Bands written as SDSS-like names: 'r_sdss', 'SDSS-R', 'sdss r', 'rp', "r'".
_SDSS_BAND = re.compile(r"^(?:sdss[-_ ]?)?([ugriz])(?:[-_ ]?sdss|p|'|[-_ ]?prime)?$", re.IGNORECASE)
# Upper-case single letters that name Johnson–Cousins bands, distinct from SDSS u, r, i.
_JOHNSON_LETTERS = frozenset("URI")

# Reference pixels sampled per axis by overlap_fraction (error ~ 1/_OVERLAP_SAMPLES per edge).
_OVERLAP_SAMPLES = 200


def _is_positive(value: float) -> bool:
    return math.isfinite(value) and value > 0


def _is_non_negative(value: float) -> bool:
    return math.isfinite(value) and value >= 0


def _is_positive_or_inf(value: float) -> bool:
    return value > 0  # NaN compares False; +inf means "never saturates"


# Per numeric fact: the test its value must pass, and how to say so in an error message.
_RULES: dict[str, tuple[Callable[[float], bool], str]] = {
    "gain": (_is_positive, "a finite number > 0 (electrons per ADU)"),
    "read_noise": (_is_non_negative, "a finite number >= 0 (electrons)"),
    "saturation": (_is_positive_or_inf, "a number > 0 (ADU; inf for none)"),
    "exptime": (_is_positive, "a finite number > 0 (seconds)"),
    "mjd": (math.isfinite, "a finite number (days)"),
}


def normalise_band(value: str) -> str | None:
    """Normalise a filter name to a short band label.

    Parameters
    ----------
    value : str
        A FILTER/BAND header value or a user-given band, e.g. DECam's
        ``'i DECam SDSS c0003 7835.0 1470.0'``, ``'r_sdss'``, ``'SDSS-R'``, ``'rp'``.

    Returns
    -------
    band : str or None
        A lower-case letter for SDSS-like bands (``'u'``, ``'g'``, ``'r'``, ``'i'``, ``'z'``,
        ``'y'``); the upper-case single letters ``'U'``, ``'R'``, ``'I'`` are kept, since they
        name Johnson–Cousins bands; anything else is returned stripped but otherwise unchanged.
        None for a blank string.
    """
    text = value.strip()
    if not text:
        return None
    # A lone letter first: instrument strings such as DECam's put the band letter first.
    first = text.split()[0]
    if len(first) == 1 and first.lower() in "ugrizy":
        return first if first in _JOHNSON_LETTERS else first.lower()
    sdss = _SDSS_BAND.match(text)
    return sdss.group(1).lower() if sdss else text


def read_image(
    path: str | os.PathLike[str],
    *,
    hdu: int | str | None = None,
    overrides: Mapping[str, Any] | None = None,
    wcs: WCS | None = None,
    max_pixels: int = 64_000_000,
) -> Image:
    """Read a 2-D FITS image with its celestial WCS and normalised header facts.

    Parameters
    ----------
    path : str or path-like
        A FITS file (``.fits``, ``.fz`` tile-compressed, or gzip/bzip2-compressed).
    hdu : int or str, optional
        Index or EXTNAME of the HDU to read. By default the primary HDU if it holds an image,
        else the first image HDU (``ImageHDU`` or ``CompImageHDU``) other than ``MASK``.
    overrides : mapping, optional
        Values that replace the header's, with keys from :data:`OVERRIDE_KEYS`: ``gain``
        (e-/ADU, > 0), ``read_noise`` (e-, >= 0), ``saturation`` (ADU, > 0), ``exptime``
        (s, > 0), ``band`` (non-empty str, normalised by :func:`normalise_band`) and ``mjd``
        (days, finite). A value of None means "use the header".
    wcs : astropy.wcs.WCS, optional
        Celestial WCS to use instead of the header's; validated the same way.
    max_pixels : int, optional
        Largest number of pixels accepted, checked before the data are loaded.

    Returns
    -------
    image : Image
        ``data`` is a 2D float32 ndarray of shape (ny, nx) in ADU with NaN where the file has
        NaN, inf or BLANK; length-1 axes of a 3-D HDU are squeezed. Facts missing from the
        header take :data:`DEFAULTS` and are listed in ``meta["defaulted"]``;
        ``meta["overridden"]`` lists overridden facts, ``meta["keywords"]`` the header keyword
        each other fact came from, and ``meta["hdu"]`` the index read. ``mask`` is read from a
        ``MASK`` HDU when there is one (True = bad pixel).

    Raises
    ------
    InvalidOverrideError
        An override key is unknown or its value is out of range.
    ImageNotFoundError
        The file does not exist or cannot be read.
    NotFitsError
        The file is not FITS, or is truncated or corrupt.
    NoImageError
        No HDU holds a 2-D image (a real 3-D cube is refused).
    ImageTooLargeError
        The image has more than ``max_pixels`` pixels.
    EmptyImageError
        The image has no finite pixel, or all finite pixels are equal.
    WCSError
        There is no usable celestial WCS.
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive integer, not {max_pixels!r}")
    label = str(path)
    overridden = _validate_overrides(overrides or {}, label)
    with _open_fits(Path(path)) as hdul:
        index = _select_hdu(hdul, hdu, label)
        chosen = hdul[index]
        shape = _squeezed_shape(chosen.shape, index, label)
        _check_size(shape, max_pixels, label)
        data = _load_data(chosen, shape, label)
        _check_not_empty(data, label)
        header = chosen.header.copy()
        if wcs is None:
            celestial = _header_wcs(header, chosen.shape, hdul, label)
        else:
            celestial = _checked_wcs(wcs.celestial, data.shape, label)
        mask = _read_mask(hdul, index, data.shape, label)
    facts, sources = _header_facts(header)
    defaulted = [key for key in OVERRIDE_KEYS if key not in facts and key not in overridden]
    facts = {**DEFAULTS, **facts, **overridden}
    _set_fact_cards(header, {key: facts[key] for key in overridden})
    meta = {
        "hdu": index,
        "defaulted": defaulted,
        "overridden": sorted(overridden),
        "keywords": {key: src for key, src in sources.items() if key not in overridden},
    }
    return Image(data=data, wcs=celestial, header=header, mask=mask, path=label, meta=meta, **facts)


def overlap_fraction(science: Image, reference: Image) -> float:
    """Fraction of the reference image's pixels that the science image covers.

    A lattice of up to 200 x 200 reference pixel centres is mapped to the sky with the
    reference WCS and back into science pixels with the science WCS (frames are converted where
    they differ); a point is covered when it falls inside the science pixel grid.

    Parameters
    ----------
    science, reference : Image
        Images with celestial WCSs; only their WCSs and shapes are used.

    Returns
    -------
    fraction : float
        Covered fraction in [0, 1], accurate to about 1%.
    """
    ny, nx = reference.shape
    x, y = _pixel_lattice(ny, nx)
    with warnings.catch_warnings():
        # Points far outside the science image may not converge through its distortion
        # model; astropy then warns and returns a best guess, which lands outside anyway.
        warnings.filterwarnings("ignore", message=".*converge", category=UserWarning)
        sky = reference.wcs.pixel_to_world(x, y)
        sx, sy = science.wcs.world_to_pixel(sky)
    sny, snx = science.shape
    covered = _inside(sx, snx) & _inside(sy, sny)
    return float(np.count_nonzero(covered) / covered.size)


def check_pair(science: Image, reference: Image, *, min_overlap: float = 0.5) -> float:
    """Check that a science image can be differenced against a reference image.

    Parameters
    ----------
    science, reference : Image
        The pair to difference.
    min_overlap : float, optional
        Smallest acceptable :func:`overlap_fraction`, in (0, 1].

    Returns
    -------
    fraction : float
        Fraction of the reference image covered by the science image.

    Raises
    ------
    BandMismatchError
        Both bands are known and differ.
    FootprintError
        The covered fraction is below ``min_overlap``.
    """
    if not 0 < min_overlap <= 1:
        raise ValueError(f"min_overlap must be in (0, 1], not {min_overlap!r}")
    sci, ref = _describe(science, "science"), _describe(reference, "reference")
    if science.band is not None and reference.band is not None and science.band != reference.band:
        raise BandMismatchError(
            f"{sci} is in band {science.band!r} but {ref} is in band {reference.band!r}: "
            "difference images taken in the same band, or correct a wrong header with "
            "overrides={'band': ...}"
        )
    fraction = overlap_fraction(science, reference)
    if fraction < min_overlap:
        raise FootprintError(
            f"{sci} covers {fraction:.1%} of {ref}, less than min_overlap={min_overlap:.0%}: "
            "check that both images show the same field (compare CRVAL1/CRVAL2), "
            "or lower min_overlap"
        )
    return fraction


def write_image(image: Image, path: str | os.PathLike[str]) -> None:
    """Write an image, its WCS and its normalised facts to a FITS file, atomically.

    The primary HDU holds ``data`` as float32 with the WCS, the cards of ``image.header``
    other than structural and WCS keywords, and GAIN, RDNOISE, SATURATE, EXPTIME, FILTER and
    MJD-OBS (the last three, and SATURATE when ``saturation`` is inf, are omitted when
    unknown). A ``mask`` is written as a uint8 ImageHDU named ``MASK``. The file is written
    under a temporary name in the same directory and then renamed, so readers never see a
    partial file.

    Parameters
    ----------
    image : Image
        ``data`` must be 2-D; ``mask``, if given, must have the same shape.
    path : str or path-like
        Destination; an existing file is replaced.
    """
    data = np.asarray(image.data, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"image data must be 2-D, not of shape {data.shape}")
    hdus: list[fits.PrimaryHDU | fits.ImageHDU] = [
        fits.PrimaryHDU(data=data, header=_output_header(image))
    ]
    if image.mask is not None:
        mask = np.asarray(image.mask)
        if mask.shape != data.shape:
            raise ValueError(f"mask shape {mask.shape} differs from data shape {data.shape}")
        hdus.append(fits.ImageHDU(data=(mask != 0).astype(np.uint8), name=MASK_EXTNAME))
    _atomic_write(fits.HDUList(hdus), Path(path))


# --- reading -------------------------------------------------------------------------------


@contextmanager
def _open_fits(path: Path) -> Iterator[fits.HDUList]:
    _check_fits_magic(path, _first_bytes(path))
    try:
        with warnings.catch_warnings():
            # Reading the pixels of a truncated HDU fails later, with a clearer error.
            warnings.filterwarnings("ignore", "File may have been truncated", AstropyUserWarning)
            hdul = fits.open(path, memmap=False, lazy_load_hdus=False)
    except (OSError, ValueError, EOFError) as exc:
        raise NotFitsError(
            f"{path} is not a readable FITS file ({exc}): check that the file is complete "
            "(re-copy or re-download it)"
        ) from exc
    with hdul:
        yield hdul


def _first_bytes(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            return handle.read(6)
    except FileNotFoundError as exc:
        raise ImageNotFoundError(
            f"{path} does not exist: check the path (relative paths start at {Path.cwd()})"
        ) from exc
    except IsADirectoryError as exc:
        raise ImageNotFoundError(
            f"{path} is a directory, not an image: pass the path of a FITS file"
        ) from exc
    except OSError as exc:
        raise ImageNotFoundError(
            f"{path} cannot be read ({exc.strerror}): check the file's permissions"
        ) from exc


def _check_fits_magic(path: Path, head: bytes) -> None:
    if not head:
        raise NotFitsError(f"{path} is empty: pass a FITS image (.fits, .fz)")
    if not head.startswith(_FITS_MAGIC):
        raise NotFitsError(
            f"{path} is not a FITS file (it does not start with a SIMPLE card): "
            "pass a FITS image (.fits, .fz)"
        )


def _describe_hdu(hdul: fits.HDUList, index: int) -> str:
    name = hdul[index].name
    return f"HDU {index} ({name!r})" if name and name != "PRIMARY" else f"HDU {index}"


def _has_image(hdu: Any) -> bool:
    return isinstance(hdu, _IMAGE_HDU_TYPES) and len(hdu.shape) > 0 and math.prod(hdu.shape) > 0


def _select_hdu(hdul: fits.HDUList, hdu: int | str | None, label: str) -> int:
    if hdu is not None:
        return _named_hdu(hdul, hdu, label)
    candidates = [i for i, h in enumerate(hdul) if _has_image(h) and h.name.upper() != MASK_EXTNAME]
    if not candidates:
        raise NoImageError(
            f"{label} has no image HDU (HDUs: {_hdu_summary(hdul)}): "
            "pass a file that holds a 2-D image"
        )
    planar = [i for i in candidates if len(_drop_unit_axes(hdul[i].shape)) == 2]
    return planar[0] if planar else candidates[0]  # the first candidate is refused later


def _named_hdu(hdul: fits.HDUList, hdu: int | str, label: str) -> int:
    try:
        index = hdul.index_of(hdu)
    except KeyError:
        index = len(hdul)
    if not 0 <= index < len(hdul):
        raise NoImageError(
            f"{label} has no HDU {hdu!r} (HDUs: {_hdu_summary(hdul)}): pass one of those as hdu="
        )
    if not _has_image(hdul[index]):
        raise NoImageError(
            f"{label} {_describe_hdu(hdul, index)} holds no image data "
            f"(HDUs: {_hdu_summary(hdul)}): pass an image HDU as hdu="
        )
    return index


def _hdu_summary(hdul: fits.HDUList) -> str:
    parts = [
        f"{i} {h.name or '?'} {type(h).__name__} {getattr(h, 'shape', '')}".rstrip()
        for i, h in enumerate(hdul)
    ]
    return "; ".join(parts)


def _drop_unit_axes(shape: Sequence[int]) -> tuple[int, ...]:
    return tuple(n for n in shape if n != 1)


def _squeezed_shape(shape: Sequence[int], index: int, label: str) -> tuple[int, int]:
    kept = _drop_unit_axes(shape)
    if len(kept) != 2:
        kind = "a cube" if len(kept) > 2 else "not a 2-D image"
        raise NoImageError(
            f"{label} HDU {index} has shape {tuple(shape)}, {kind}: "
            "split it into 2-D images (one per plane) and read those"
        )
    return kept[0], kept[1]


def _check_size(shape: tuple[int, int], max_pixels: int, label: str) -> None:
    npix = shape[0] * shape[1]
    if npix > max_pixels:
        raise ImageTooLargeError(
            f"{label} has {npix} pixels ({shape[1]} x {shape[0]}), more than "
            f"max_pixels={max_pixels}: cut it into smaller images or raise max_pixels"
        )


def _hdu_data(hdu: Any, label: str) -> np.ndarray | None:
    try:
        return hdu.data
    except (OSError, ValueError, EOFError) as exc:
        raise NotFitsError(
            f"{label} HDU {hdu.name or '?'} has unreadable pixel data ({exc}): the file is "
            "truncated or corrupt; re-copy or re-download it"
        ) from exc


def _load_data(hdu: Any, shape: tuple[int, int], label: str) -> np.ndarray:
    raw = np.asarray(_hdu_data(hdu, label))
    with np.errstate(over="ignore", invalid="ignore"):
        data = raw.astype(np.float32).reshape(shape)
    blank = hdu.header.get("BLANK")
    if raw.dtype.kind in "iu" and isinstance(blank, int):
        data[(raw == blank).reshape(shape)] = np.nan
    data[~np.isfinite(data)] = np.nan
    return data


def _check_not_empty(data: np.ndarray, label: str) -> None:
    if np.isnan(data).all():
        raise EmptyImageError(
            f"{label} has no finite pixels (all NaN, inf or BLANK): check that the file holds "
            "image data, or choose another HDU with hdu="
        )
    low, high = np.nanmin(data), np.nanmax(data)
    if low == high:
        raise EmptyImageError(
            f"{label} is constant (every finite pixel is {low:g}): check that the exposure "
            "was read out and calibrated correctly"
        )


def _header_wcs(header: fits.Header, shape: Sequence[int], hdul: fits.HDUList, label: str) -> WCS:
    hint = "add CTYPE/CRVAL/CRPIX/CD keywords or pass wcs="
    try:
        with warnings.catch_warnings():
            # astropy reports each keyword it repaired (e.g. MJD-OBS derived from DATE-OBS).
            warnings.simplefilter("ignore", FITSFixedWarning)
            full = WCS(header, fobj=hdul)
    except (ValueError, KeyError, TypeError, MemoryError) as exc:
        raise WCSError(f"{label} has an unreadable WCS ({exc}): {hint}") from exc
    if full.wcs.lng < 0 or full.wcs.lat < 0:
        raise WCSError(f"{label} has no celestial WCS: {hint}")
    # FITS axis k is numpy axis ndim-1-k; the sky axes must be the ones that were kept.
    ndim = len(shape)
    sky_axes = sorted(ndim - 1 - k for k in (full.wcs.lng, full.wcs.lat))
    kept_axes = [i for i, n in enumerate(shape) if n != 1]
    if ndim != full.naxis or sky_axes != kept_axes:
        raise WCSError(
            f"{label} has celestial WCS axes that do not match its image axes (shape "
            f"{tuple(shape)}): fix CTYPEn so that RA/Dec describe the image axes, or pass wcs="
        )
    return _checked_wcs(full.celestial, tuple(n for n in shape if n != 1), label)


def _checked_wcs(wcs: WCS, shape: tuple[int, ...], label: str) -> WCS:
    hint = "add CTYPE/CRVAL/CRPIX/CD keywords or pass wcs="
    if wcs.naxis != 2 or not wcs.has_celestial:
        raise WCSError(f"{label} has no celestial WCS: {hint}")
    if not (np.isfinite(wcs.wcs.crval).all() and np.isfinite(wcs.wcs.crpix).all()):
        raise WCSError(f"{label} has a non-finite CRVAL or CRPIX: {hint}")
    matrix = wcs.pixel_scale_matrix
    scale = np.abs(matrix).max() if np.isfinite(matrix).all() else 0.0
    if scale == 0 or abs(np.linalg.det(matrix)) <= 1e-12 * scale**2:
        raise WCSError(
            f"{label} has a singular or non-finite pixel scale matrix (CD or PC x CDELT = "
            f"{matrix.tolist()}): fix the CD/CDELT keywords or pass wcs="
        )
    ny, nx = shape
    try:
        centre = wcs.pixel_to_world_values((nx - 1) / 2, (ny - 1) / 2)
    except ValueError as exc:
        raise WCSError(
            f"{label} WCS cannot map the image centre to the sky ({exc}): {hint}"
        ) from exc
    if not np.isfinite(centre).all():
        raise WCSError(f"{label} WCS maps the image centre to non-finite coordinates: {hint}")
    checked = wcs.deepcopy()
    checked.array_shape = (ny, nx)
    return checked


def _read_mask(
    hdul: fits.HDUList, index: int, shape: tuple[int, int], label: str
) -> np.ndarray | None:
    if MASK_EXTNAME not in hdul or hdul.index_of(MASK_EXTNAME) == index:
        return None
    raw = _hdu_data(hdul[MASK_EXTNAME], label)
    if raw is None:
        return None
    if raw.size != shape[0] * shape[1]:
        raise ScienceError(
            f"{label} has a {MASK_EXTNAME} HDU of shape {raw.shape} but an image of shape "
            f"{shape}: rewrite the file with a matching mask or remove the {MASK_EXTNAME} HDU"
        )
    return np.asarray(raw).reshape(shape) != 0


# --- header facts --------------------------------------------------------------------------


def _header_number(header: fits.Header, key: str) -> float | None:
    value = header.get(key)
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float | np.integer | np.floating):
        return float(value)
    if isinstance(value, str):
        with suppress(ValueError):
            return float(value)
    return None


def _numeric_fact(header: fits.Header, fact: str) -> tuple[float, str] | None:
    singles, amplifiers, combine = _NUMERIC_KEYWORDS[fact]
    valid = _RULES[fact][0]
    for key in singles:
        value = _header_number(header, key)
        if value is not None and valid(value):
            return value, key
    found = {key: _header_number(header, key) for key in amplifiers}
    usable = {key: v for key, v in found.items() if v is not None and valid(v)}
    if usable:
        return float(combine(usable.values())), "+".join(usable)
    return None


def _mjd_from_date(header: fits.Header) -> tuple[float, str] | None:
    date, time = header.get("DATE-OBS"), header.get("TIME-OBS")
    if not isinstance(date, str) or not date.strip():
        return None
    text, source = date.strip(), "DATE-OBS"
    if "T" not in text and isinstance(time, str) and time.strip():
        text, source = f"{text}T{time.strip()}", "DATE-OBS+TIME-OBS"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ErfaWarning)  # "dubious year" past the leap table
            mjd = float(Time(text, scale="utc").mjd)
    except ValueError:
        return None
    return (mjd, source) if math.isfinite(mjd) else None


def _band_fact(header: fits.Header) -> tuple[str, str] | None:
    for key in _BAND_KEYWORDS:
        value = header.get(key)
        band = normalise_band(value) if isinstance(value, str) else None
        if band is not None:
            return band, key
    return None


def _header_facts(header: fits.Header) -> tuple[dict[str, Any], dict[str, str]]:
    found: dict[str, tuple[Any, str] | None] = {
        fact: _numeric_fact(header, fact)
        for fact in ("gain", "read_noise", "saturation", "exptime")
    }
    found["band"] = _band_fact(header)
    found["mjd"] = _numeric_fact(header, "mjd") or _mjd_from_date(header)
    facts = {fact: pair[0] for fact, pair in found.items() if pair is not None}
    sources = {fact: pair[1] for fact, pair in found.items() if pair is not None}
    return facts, sources


def _validate_overrides(overrides: Mapping[str, Any], label: str) -> dict[str, Any]:
    unknown = [key for key in overrides if key not in OVERRIDE_KEYS]
    if unknown:
        raise InvalidOverrideError(
            f"unknown override key(s) {', '.join(map(repr, unknown))} for {label}: "
            f"allowed keys are {', '.join(OVERRIDE_KEYS)}"
        )
    return {
        key: _validated_override(key, value, label)
        for key, value in overrides.items()
        if value is not None
    }


def _validated_override(key: str, value: Any, label: str) -> Any:
    if key == "band":
        band = normalise_band(value) if isinstance(value, str) else None
        if band is None:
            raise InvalidOverrideError(
                f"override band={value!r} for {label} is invalid: band must be a non-empty "
                "string such as 'i'"
            )
        return band
    valid, wanted = _RULES[key]
    number = float(value) if isinstance(value, int | float | np.integer | np.floating) else math.nan
    if isinstance(value, bool | np.bool_) or not valid(number):
        raise InvalidOverrideError(
            f"override {key}={value!r} for {label} is invalid: {key} must be {wanted}"
        )
    return number


# --- writing -------------------------------------------------------------------------------


def _set_fact_cards(header: fits.Header, facts: Mapping[str, Any]) -> None:
    """Write each fact to its keyword, or remove every keyword for it when it is unknown."""
    for fact, value in facts.items():
        keyword, comment, readers = _FACT_CARDS[fact]
        if value is None or (isinstance(value, float) and math.isinf(value)):
            for key in readers:
                header.remove(key, ignore_missing=True, remove_all=True)
        else:
            header[keyword] = (value if isinstance(value, str) else float(value), comment)


def _output_header(image: Image) -> fits.Header:
    header = image.header.copy()
    for keyword in {card.keyword for card in header.cards if _DROPPED_CARD.match(card.keyword)}:
        header.remove(keyword, remove_all=True)
    header.update(image.wcs.to_header(relax=True))
    facts = {fact: getattr(image, fact) for fact in _FACT_CARDS}
    _set_fact_cards(header, facts)
    return header


def _atomic_write(hdul: fits.HDUList, path: Path) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    descriptor, temporary = tempfile.mkstemp(
        dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as handle:
            hdul.writeto(handle, output_verify="silentfix")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


# --- geometry ------------------------------------------------------------------------------


def _pixel_lattice(ny: int, nx: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates (x, y), each 1-D, of cell centres of a coarse lattice over (ny, nx)."""
    my, mx = min(ny, _OVERLAP_SAMPLES), min(nx, _OVERLAP_SAMPLES)
    ys = (np.arange(my) + 0.5) * ny / my - 0.5
    xs = (np.arange(mx) + 0.5) * nx / mx - 0.5
    grid_x, grid_y = np.meshgrid(xs, ys)
    return grid_x.ravel(), grid_y.ravel()


def _inside(coordinate: np.ndarray, size: int) -> np.ndarray:
    """True where a pixel coordinate lies on a grid of ``size`` pixels (NaN is outside)."""
    with np.errstate(invalid="ignore"):
        return (coordinate >= -0.5) & (coordinate < size - 0.5)


def _describe(image: Image, role: str) -> str:
    return f"{role} image {image.path}" if image.path else f"{role} image"
