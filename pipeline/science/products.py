"""Files the observation steps hand to each other: preprocessed pair, difference, candidates."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS

from pipeline.errors import ScienceError
from pipeline.science.cutouts import CHANNELS
from pipeline.science.differencing import Difference
from pipeline.science.photometry import FluxScale
from pipeline.science.preprocessing import PreprocessedPair
from pipeline.science.psf import PSFModel
from pipeline.science.registration import Registration

__all__ = [
    "CATALOG_COLUMNS",
    "load_difference",
    "load_preprocessed",
    "read_candidates",
    "save_cutouts",
    "save_difference",
    "save_preprocessed",
    "write_candidates",
]

CATALOG_COLUMNS = (
    "candidate_id",
    "ra",
    "dec",
    "x",
    "y",
    "snr",
    "flux",
    "flux_err",
    "sign",
    "flags",
    "rb_score",
)
_PRE_IMAGES = (
    "science",
    "reference",
    "science_rms",
    "reference_rms",
)
_DIFF_IMAGES = ("D", "S", "S_corr", "alpha", "alpha_err")


def _atomic_write(hdul: fits.HDUList, path: str | os.PathLike[str]) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".fits", dir=target.parent)
    os.close(fd)
    try:
        hdul.writeto(tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


def _json_hdu(data: dict[str, Any], name: str) -> fits.ImageHDU:
    """JSON as bytes in an image extension: header cards mangle long strings and quotes."""
    raw = np.frombuffer(json.dumps(data).encode("utf-8"), dtype=np.uint8)
    return fits.ImageHDU(raw, name=name)


def _open(path: str | os.PathLike[str], what: str) -> fits.HDUList:
    if not Path(path).is_file():
        raise ScienceError(f"{path} not found: run the step that makes the {what} first")
    return fits.open(path, memmap=False)


def save_preprocessed(pair: PreprocessedPair, path: str | os.PathLike[str]) -> None:
    """Write a preprocessed pair to one multi-extension FITS file (atomically)."""
    header = pair.wcs.to_header()
    hdus: list[Any] = [fits.PrimaryHDU(header=header), _json_hdu(_pre_meta(pair), "META")]
    image_header = pair.wcs.to_header()
    for name in _PRE_IMAGES:
        data = getattr(pair, name).astype(np.float32)
        hdus.append(fits.ImageHDU(data, header=image_header, name=name.upper()))
    hdus.append(fits.ImageHDU(pair.mask.astype(np.uint8), name="MASK"))
    hdus.append(fits.ImageHDU(pair.psf_science.basis, name="PSF_SCI"))
    hdus.append(fits.ImageHDU(pair.psf_reference.basis, name="PSF_REF"))
    hdus.append(fits.BinTableHDU(pair.reference_sources, name="REF_SOURCES"))
    hdus.append(fits.BinTableHDU(pair.science_sources, name="SCI_SOURCES"))
    _atomic_write(fits.HDUList(hdus), path)


def load_preprocessed(path: str | os.PathLike[str]) -> PreprocessedPair:
    """Read a file written by :func:`save_preprocessed`."""
    with _open(path, "preprocessed pair") as hdul:
        meta = json.loads(hdul["META"].data.tobytes().decode("utf-8"))
        wcs = WCS(hdul["SCIENCE"].header)
        images = {name: hdul[name.upper()].data.astype(np.float32) for name in _PRE_IMAGES}
        shape = images["science"].shape
        reg = meta["registration"]
        return PreprocessedPair(
            **images,
            science_gain=float(meta["gain_science"]),
            reference_gain=float(meta["gain_reference"]),
            mask=hdul["MASK"].data.astype(np.uint8),
            psf_science=PSFModel(
                hdul["PSF_SCI"].data.astype(np.float32),
                shape,
                int(meta["psf_science_stars"]),
                meta["fwhm_science"],
                meta.get("psf_science_error", 0.0),
            ),
            psf_reference=PSFModel(
                hdul["PSF_REF"].data.astype(np.float32),
                shape,
                int(meta["psf_reference_stars"]),
                meta["fwhm_reference"],
                meta.get("psf_reference_error", 0.0),
            ),
            flux=FluxScale(**meta["flux"]),
            registration=None
            if reg is None
            else Registration(
                wcs=WCS(fits.Header.fromstring(reg["wcs"])),
                n_matched=reg["n_matched"],
                offset=tuple(reg["offset"]),
                rms=tuple(reg["rms"]),
                refined=reg["refined"],
            ),
            wcs=wcs,
            reference_sources=Table(hdul["REF_SOURCES"].data),
            science_sources=Table(hdul["SCI_SOURCES"].data),
            timings=meta["timings"],
        )


def _pre_meta(pair: PreprocessedPair) -> dict[str, Any]:
    reg = pair.registration
    return {
        "fwhm_science": pair.psf_science.fwhm,
        "fwhm_reference": pair.psf_reference.fwhm,
        "psf_science_stars": pair.psf_science.n_stars,
        "psf_reference_stars": pair.psf_reference.n_stars,
        "psf_science_error": pair.psf_science.model_error,
        "psf_reference_error": pair.psf_reference.model_error,
        "gain_science": pair.science_gain,
        "gain_reference": pair.reference_gain,
        "flux": {
            "ratio": pair.flux.ratio,
            "error": pair.flux.error,
            "scatter": pair.flux.scatter,
            "n_stars": pair.flux.n_stars,
        },
        "registration": None
        if reg is None
        else {
            "wcs": reg.wcs.to_header().tostring(),
            "n_matched": reg.n_matched,
            "offset": list(reg.offset),
            "rms": list(reg.rms),
            "refined": reg.refined,
        },
        "timings": pair.timings,
    }


def save_difference(diff: Difference, wcs: WCS, path: str | os.PathLike[str]) -> None:
    """Write ZOGY products (D, S, S_corr, alpha, alpha_err, invalid, P_D, star shifts) to FITS."""
    header = wcs.to_header()
    header["F_D"] = (diff.F_D, "flux zero point of D")
    header["SCORRSC"] = (diff.scorr_scale, "robust std of S_corr before renormalising")
    header["BACKEND"] = (diff.backend, "where the transforms ran")
    header["ZOGYSEC"] = (round(diff.seconds, 4), "seconds spent in ZOGY")
    header["FLXFLOOR"] = (diff.flux_floor, "fractional flux-error floor in V_S, stars")
    header["FLXFLEXT"] = (diff.flux_floor_extended, "the same over galaxies")
    hdus: list[Any] = [fits.PrimaryHDU(header=header)]
    for name in _DIFF_IMAGES:
        hdus.append(
            fits.ImageHDU(getattr(diff, name).astype(np.float32), header=header, name=name.upper())
        )
    hdus.append(fits.ImageHDU(diff.invalid.astype(np.uint8), name="INVALID"))
    hdus.append(fits.ImageHDU(diff.P_D.astype(np.float32), name="P_D"))
    if diff.star_shifts.colnames:
        hdus.append(fits.BinTableHDU(diff.star_shifts, name="STARSHIFT"))
    _atomic_write(fits.HDUList(hdus), path)


def load_difference(path: str | os.PathLike[str]) -> tuple[Difference, WCS]:
    """Read a file written by :func:`save_difference`; returns the products and the WCS."""
    with _open(path, "difference image") as hdul:
        head = hdul[0].header
        maps = {name: hdul[name.upper()].data.astype(np.float32) for name in _DIFF_IMAGES}
        diff = Difference(
            **maps,
            P_D=hdul["P_D"].data.astype(np.float32),
            F_D=float(head["F_D"]),
            invalid=hdul["INVALID"].data.astype(bool),
            scorr_scale=float(head["SCORRSC"]),
            backend=str(head["BACKEND"]),
            seconds=float(head["ZOGYSEC"]),
            flux_floor=float(head.get("FLXFLOOR", 0.0)),
            flux_floor_extended=float(head.get("FLXFLEXT", 0.0)),
            star_shifts=Table.read(hdul["STARSHIFT"]) if "STARSHIFT" in hdul else Table(),
        )
        return diff, WCS(hdul["D"].header)


def write_candidates(
    table: Table, path: str | os.PathLike[str], *, observation_id: str | None = None
) -> None:
    """Write the candidate catalogue as ECSV (atomically), observation id in its metadata.

    Raises
    ------
    ScienceError
        If a required column is missing.
    """
    missing = [c for c in CATALOG_COLUMNS if c not in table.colnames]
    if missing:
        raise ScienceError(f"candidate table lacks column(s) {', '.join(missing)}")
    out = table.copy()
    out.meta["observation_id"] = observation_id
    out.meta["columns"] = {
        "x, y": "0-based pixel position on the reference grid",
        "ra, dec": "ICRS degrees",
        "snr": "signed S_corr at the peak (its summit between the pixels)",
        "flux, flux_err": "PSF-fit flux of the transient in science-image ADU",
        "sign": "+1 brighter in the science image, -1 fading",
        "flags": "bits: 1 edge, 2 masked, 4 near saturated star, 8 near reference source, "
        "16 dipole, 32 next to a repaired pixel (cosmic ray, bad column)",
        "repaired_share": "share of the matched filter's weight on repaired pixels",
        "rb_score": "real/bogus probability from the deployed model (NaN without one)",
    }
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".tmp-{target.name}")
    out.write(tmp, format="ascii.ecsv", overwrite=True)
    os.replace(tmp, target)


def read_candidates(path: str | os.PathLike[str]) -> Table:
    """Read a candidate catalogue written by :func:`write_candidates`."""
    if not Path(path).is_file():
        raise ScienceError(f"{path} not found: run detection first")
    return Table.read(path, format="ascii.ecsv")


def save_cutouts(stamps: np.ndarray, ids: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write (n, 3 or 4, size, size) science/reference/difference(/mask) stamps as a FITS cube.

    The ``CHANNELS`` header keyword names the stamps in order.
    """
    if stamps.ndim != 4 or stamps.shape[1] not in (3, 4):
        raise ValueError(f"stamps must have shape (n, 3 or 4, size, size), got {stamps.shape}")
    header = fits.Header()
    header["CHANNELS"] = ",".join(CHANNELS[: stamps.shape[1]])
    hdus = [
        fits.PrimaryHDU(stamps.astype(np.float32), header=header),
        fits.BinTableHDU(Table({"candidate_id": np.asarray(ids)}), name="IDS"),
    ]
    _atomic_write(fits.HDUList(hdus), path)
