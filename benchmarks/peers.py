"""Run published difference-imaging codes (peers) on the same images as our ZOGY.

Two peers are wrapped, each behind one function that returns a :class:`PeerResult`:

* ``sfft`` (Hu et al. 2022, https://github.com/thomasvrussell/sfft), through its
  ``Easy_CrowdedPacket`` (default) or ``Easy_SparsePacket`` interface on the NumPy backend
  (pyFFTW + numba on the CPU; no GPU). Both interfaces call SExtractor, so the
  ``source-extractor`` binary must be installed (Debian package ``source-extractor``).
* ``properimage`` (Sánchez et al. 2019), through :func:`properimage.operations.subtract`, its
  ZOGY implementation.

The peers live in their own virtual environment (see ``benchmarks/install_peers.sh``): sfft
1.7.3 calls ``np.in1d``, removed in NumPy 2.4, so that environment pins ``numpy==2.3.5``. This
module imports the peers lazily, inside the functions, so importing it needs only NumPy, SciPy
and Astropy.

Every peer's difference image is scored by the *same* detector, :func:`matched_filter_detect`.
Timing covers only the peer's own differencing call (``time.perf_counter``); peak memory is
measured with :mod:`tracemalloc` around that call, which counts NumPy buffers and Python
objects but not FFTW plans, numba-compiled native scratch or the SExtractor subprocess.

Run ``python benchmarks/peers.py`` (in the peers' environment) for a smoke run on the DECam
pair in ``shared/data/decam``; ``--synthetic 1024`` runs on a simulated pair instead.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from astropy.io import fits
from astropy.table import Table
from scipy import ndimage, signal

__all__ = [
    "PeerResult",
    "gaussian_psf",
    "make_synthetic_pair",
    "matched_filter_detect",
    "run_properimage",
    "run_sfft",
]

DECAM_DIR_CANDIDATES = (
    Path(__file__).resolve().parents[1] / "shared" / "data" / "decam",
    Path(__file__).resolve().parents[2] / "shared" / "data" / "decam",
)
DECAM_SCIENCE = "DEC-OBS04a.mini.fits"
DECAM_REFERENCE = "Stack-DEC-OBS18.fits"
DECAM_SCIENCE_FWHM = 5.2  # px, from the data README
SEXTRACTOR_NAMES = ("sex", "sextractor")  # the names sfft looks for, in this order
SEXTRACTOR_BINARIES = ("source-extractor", "sex", "sextractor")  # Debian ships the first only


@dataclass
class PeerResult:
    """What one peer produced for one image pair.

    Attributes
    ----------
    name : str
        Peer name (``"sfft"`` or ``"properimage"``), with the flavour where there is a choice.
    difference : numpy.ndarray
        Difference image in NumPy (row = y, column = x) order, same shape as the inputs;
        a transient of the science image is positive. NaN where the peer masked pixels.
    difference_psf : numpy.ndarray or None
        PSF of the difference image (normalised to sum 1, centred) where the peer gives one.
    scorr : numpy.ndarray or None
        The peer's corrected score image where it gives one (properimage's S_corr is not
        unit-variance).
    seconds : float
        Wall time of the peer's own differencing call (``time.perf_counter``).
    peak_memory_mb : float or None
        Peak traced allocation during that call in MiB (:mod:`tracemalloc`), or None when
        memory was not traced.
    """

    name: str
    difference: np.ndarray
    difference_psf: np.ndarray | None
    scorr: np.ndarray | None
    seconds: float
    peak_memory_mb: float | None


# --------------------------------------------------------------------------------------------
# helpers


def _measure(call: Callable[[], Any], trace_memory: bool) -> tuple[Any, float, float | None]:
    """Run ``call`` and return its result, wall seconds and traced peak MiB."""
    if trace_memory:
        tracemalloc.start()
        tracemalloc.reset_peak()
    start = time.perf_counter()
    try:
        result = call()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] / 2**20 if trace_memory else None
    finally:
        if trace_memory:
            tracemalloc.stop()
    return result, seconds, peak


def _read_image(path: str | os.PathLike[str]) -> tuple[np.ndarray, fits.Header]:
    """Read the primary HDU as native-endian float64 with its header."""
    with fits.open(path) as hdul:
        data = np.asarray(hdul[0].data, dtype=np.float64)
        header = hdul[0].header.copy()
    if data.ndim != 2:
        raise ValueError(f"{path}: expected a 2-D primary image, got shape {data.shape}")
    return data, header


def _background(data: np.ndarray) -> tuple[np.ndarray, float]:
    """Return the sep background map and global rms of ``data`` (NaNs masked)."""
    import sep

    mask = ~np.isfinite(data)
    bkg = sep.Background(np.where(mask, 0.0, data), mask=mask)
    return bkg.back(), float(bkg.globalrms)


@contextlib.contextmanager
def _sextractor_on_path(workdir: Path) -> Iterator[None]:
    """Make SExtractor callable as ``sex``, the name sfft runs.

    Debian's package installs only ``source-extractor``; sfft tries ``sex`` then
    ``sextractor``. If neither is on ``PATH``, a symlink ``sex`` to whichever binary exists
    (``PATH`` or the running interpreter's ``bin``) is put in ``workdir/_bin`` and that folder
    is prepended to ``PATH`` for the duration of the block.
    """
    if any(shutil.which(name) for name in SEXTRACTOR_NAMES):
        yield
        return
    search = os.pathsep.join([os.environ.get("PATH", ""), str(Path(sys.executable).parent)])
    binary = next(
        (found for name in SEXTRACTOR_BINARIES if (found := shutil.which(name, path=search))),
        None,
    )
    if binary is None:
        raise FileNotFoundError(
            "sfft's Easy packets need SExtractor: install the Debian package "
            "'source-extractor' (benchmarks/install_peers.sh does it)"
        )
    shim = workdir / "_bin"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "sex"
    if not link.exists():
        link.symlink_to(binary)
    old_path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([str(shim), old_path])
    try:
        yield
    finally:
        os.environ["PATH"] = old_path


def gaussian_psf(fwhm: float, size: int | None = None) -> np.ndarray:
    """Return a centred circular Gaussian PSF normalised to sum 1.

    Parameters
    ----------
    fwhm : float
        Full width at half maximum in pixels.
    size : int, optional
        Odd side length; default ``2 * ceil(3 * fwhm) + 1``.

    Returns
    -------
    numpy.ndarray
        ``size × size`` array summing to 1.
    """
    if fwhm <= 0:
        raise ValueError("fwhm must be positive")
    sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
    if size is None:
        size = 2 * int(np.ceil(3.0 * fwhm)) + 1
    if size % 2 == 0:
        raise ValueError("size must be odd")
    half = size // 2
    yy, xx = np.mgrid[-half : half + 1, -half : half + 1]
    psf = np.exp(-(xx**2 + yy**2) / (2.0 * sigma**2))
    return psf / psf.sum()


# --------------------------------------------------------------------------------------------
# sfft


def _prepare_sfft_input(
    source: Path,
    target: Path,
    *,
    gain: float | None,
    saturation: float | None,
    subtract_sky: bool,
) -> None:
    """Write a float64 copy of ``source`` with the header keys sfft reads.

    ``GAIN`` and ``SATURATE`` are set from the arguments when given (they must then exist one
    way or the other). With ``subtract_sky`` the sep background is removed and ``ESATUR``
    (effective saturation above the removed sky, the key the sparse flavour reads) is written.
    """
    data, header = _read_image(source)
    if gain is not None:
        header["GAIN"] = (float(gain), "e-/ADU (set by benchmarks.peers)")
    if saturation is not None:
        header["SATURATE"] = (float(saturation), "ADU (set by benchmarks.peers)")
    for key in ("GAIN", "SATURATE"):
        if key not in header:
            raise ValueError(f"{source}: header has no {key}; pass it to run_sfft")
    if subtract_sky:
        back, _ = _background(data)
        data = data - back
        header["ESATUR"] = (
            float(header["SATURATE"]) - float(np.nanmedian(back)),
            "SATURATE minus subtracted sky (benchmarks.peers)",
        )
    for key in ("BSCALE", "BZERO"):
        header.pop(key, None)
    fits.PrimaryHDU(data=data, header=header).writeto(target, overwrite=True)


def run_sfft(
    science_path: str | os.PathLike[str],
    reference_path: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    *,
    gain: float | None = None,
    saturation: float | None = None,
    psf_fwhm: float | None = None,
    flavor: Literal["crowded", "sparse"] = "crowded",
    kernel_poly_order: int = 2,
    background_poly_order: int | None = None,
    threads: int | None = None,
    trace_memory: bool = True,
) -> PeerResult:
    """Subtract with sfft on its NumPy (CPU) backend.

    The default is sfft's crowded flavour (``Easy_CrowdedPacket.ECP``). DECam extragalactic
    fields are "sparse" in sfft's terms, but the sparse flavour solves only on the isolated
    point sources its Hough-transform classifier picks: on the 256² DECam cutouts it picks
    two stars (1 % of the pixels) and a quadratic kernel then diverges (difference std ~2e5
    ADU against 33 ADU). The crowded flavour fits every unsaturated pixel (galaxies included,
    which is right for a convolution model of the static sky), needs no sky subtraction and
    is stable on cutouts and full frames alike. ``flavor="sparse"`` runs
    ``Easy_SparsePacket.ESP`` on sep-sky-subtracted copies with ``ESATUR``.

    Parameters
    ----------
    science_path, reference_path : path-like
        FITS images on the same pixel grid, with ``GAIN`` and ``SATURATE`` in their headers
        unless ``gain``/``saturation`` are given.
    workdir : path-like
        Folder for the prepared inputs, the difference FITS and sfft's SExtractor scratch.
    gain : float, optional
        e-/ADU written into both prepared headers (overrides ``GAIN``).
    saturation : float, optional
        Saturation level in ADU written into both prepared headers (overrides ``SATURATE``).
    psf_fwhm : float, optional
        The larger of the two FWHMs in pixels; sets the kernel half-width as sfft itself would
        (``clip(int(2 × FWHM), 2, 20)``). None lets sfft measure both FWHMs with SExtractor.
    flavor : {"crowded", "sparse"}
        Which Easy packet to run (see above).
    kernel_poly_order : int
        Degree of the kernel's spatial polynomial (sfft default 2).
    background_poly_order : int, optional
        Degree of the differential-background polynomial; None takes the packet's default
        (2 crowded, 0 sparse).
    threads : int, optional
        NumPy-backend threads; default ``os.cpu_count()``.
    trace_memory : bool
        Trace peak memory with :mod:`tracemalloc` (slows pure-Python code a little).

    Returns
    -------
    PeerResult
        ``difference`` = SCI − K⊗REF when the reference has the better seeing (else
        K⊗SCI − REF, sign-flipped by sfft so transients stay positive); no PSF, no score.

    Notes
    -----
    The first call for a new (size, kernel, polynomial) configuration JIT-compiles numba
    kernels (~10 s here); they are cached in sfft's ``__pycache__`` so later runs are warm.
    """
    from sfft.EasyCrowdedPacket import Easy_CrowdedPacket
    from sfft.EasySparsePacket import Easy_SparsePacket

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    sparse = flavor == "sparse"
    if flavor not in ("crowded", "sparse"):
        raise ValueError(f"flavor must be 'crowded' or 'sparse', not {flavor!r}")
    sci = work / "sfft_sci.fits"
    ref = work / "sfft_ref.fits"
    diff_path = work / f"sfft_{flavor}_diff.fits"
    for source, target in ((science_path, sci), (reference_path, ref)):
        _prepare_sfft_input(
            Path(source), target, gain=gain, saturation=saturation, subtract_sky=sparse
        )
    ker_hw = None if psf_fwhm is None else int(np.clip(2.0 * psf_fwhm, 2, 20))
    common: dict[str, Any] = {
        "FITS_REF": str(ref),
        "FITS_SCI": str(sci),
        "FITS_DIFF": str(diff_path),
        "ForceConv": "AUTO",
        "GKerHW": ker_hw,
        "KerPolyOrder": kernel_poly_order,
        "GAIN_KEY": "GAIN",
        "BACKEND_4SUBTRACT": "Numpy",
        "NUM_CPU_THREADS_4SUBTRACT": threads or os.cpu_count() or 1,
        "VERBOSE_LEVEL": 0,
    }
    if background_poly_order is not None:
        common["BGPolyOrder"] = background_poly_order
    if sparse:

        def call() -> Any:
            return Easy_SparsePacket.ESP(SATUR_KEY="ESATUR", **common)
    else:

        def call() -> Any:
            return Easy_CrowdedPacket.ECP(SATUR_KEY="SATURATE", **common)

    # SExtractor writes scratch next to its inputs; run from workdir so nothing leaks elsewhere.
    old_cwd = Path.cwd()
    with _sextractor_on_path(work), contextlib.redirect_stdout(sys.stderr):
        os.chdir(work)
        try:
            out, seconds, peak = _measure(call, trace_memory)
        finally:
            os.chdir(old_cwd)
    difference = np.ascontiguousarray(np.asarray(out[0], dtype=np.float64).T)
    return PeerResult(
        name=f"sfft-{flavor}",
        difference=difference,
        difference_psf=None,
        scorr=None,
        seconds=seconds,
        peak_memory_mb=peak,
    )


# --------------------------------------------------------------------------------------------
# properimage


def _prepare_properimage_input(source: Path, target: Path) -> float:
    """Write a copy of ``source`` that properimage's masking can handle; return the pedestal.

    properimage multiplies by ``GAIN`` and then masks every pixel below −50 e- or above
    65000 e- and grows that mask seven times, so a sky-subtracted image (the DECam cutouts)
    ends up ~97 % masked and its PSF stamps turn NaN. A sky-subtracted input (global
    background within 3 rms of zero) gets back the sky pedestal its noise implies,
    ``gain·σ² − RDNOISE²/gain`` ADU (at least 10 σ), which also makes the Poisson term of
    properimage's S_corr variance meaningful. Other inputs are copied unchanged (pedestal 0).
    """
    data, header = _read_image(source)
    back, rms = _background(data)
    level = float(np.nanmedian(back))
    pedestal = 0.0
    if abs(level) < 3.0 * rms:
        gain = float(header.get("GAIN", 1.0))
        read_noise = float(header.get("RDNOISE", 0.0))
        pedestal = max(gain * rms**2 - read_noise**2 / gain, 10.0 * rms)
        data = data + pedestal
        header["PEDESTAL"] = (pedestal, "ADU added by benchmarks.peers for properimage")
    for key in ("BSCALE", "BZERO"):
        header.pop(key, None)
    fits.PrimaryHDU(data=data, header=header).writeto(target, overwrite=True)
    return pedestal


def _centred_stamp(image: np.ndarray, size: int = 31) -> np.ndarray:
    """Cut a ``size²`` stamp around the peak of a full-frame PSF (periodic), sum 1."""
    peak = np.unravel_index(int(np.nanargmax(image)), image.shape)
    half = size // 2
    rows = (np.arange(-half, half + 1) + peak[0]) % image.shape[0]
    cols = (np.arange(-half, half + 1) + peak[1]) % image.shape[1]
    stamp = image[np.ix_(rows, cols)]
    total = stamp.sum()
    return stamp / total if total != 0 else stamp


def run_properimage(
    science_path: str | os.PathLike[str],
    reference_path: str | os.PathLike[str],
    workdir: str | os.PathLike[str],
    *,
    fitted_psf: bool = True,
    trace_memory: bool = True,
) -> PeerResult:
    """Subtract with properimage's ZOGY, :func:`properimage.operations.subtract`.

    Parameters
    ----------
    science_path, reference_path : path-like
        FITS images on the same pixel grid (``align=False`` is passed: they must already be
        registered). ``GAIN`` is read from the header (1 if absent).
    workdir : path-like
        Folder for the prepared inputs (see :func:`_prepare_properimage_input`).
    fitted_psf : bool
        properimage's default True models each PSF as one Gaussian; False uses its
        Karhunen-Loève PSF basis.
    trace_memory : bool
        Trace peak memory with :mod:`tracemalloc`.

    Returns
    -------
    PeerResult
        ``difference`` = real part of ZOGY's D (in properimage's normalisation, electrons
        scaled by the noise), ``difference_psf`` = a 31² stamp of its P_D, ``scorr`` = its
        S_corr (not unit-variance), masked pixels set to NaN in all three images.

    Notes
    -----
    The timed call is the construction of both ``SingleImage`` objects (cheap: PSF
    estimation is lazy) plus ``subtract``. Each ``SingleImage`` keeps PSF stamps in a
    tinynpydb file under a temporary folder made at import; they are used as context
    managers so those files are removed.
    """
    import properimage.operations as operations
    from properimage.single_image import SingleImage, SingleImageGaussPSF

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    sci = work / "properimage_sci.fits"
    ref = work / "properimage_ref.fits"
    _prepare_properimage_input(Path(science_path), sci)
    _prepare_properimage_input(Path(reference_path), ref)
    image_class = SingleImageGaussPSF if fitted_psf else SingleImage

    def call() -> Any:
        with image_class(str(ref)) as ref_image, image_class(str(sci)) as new_image:
            return operations.subtract(
                ref=ref_image, new=new_image, align=False, fitted_psf=fitted_psf
            )

    (d, p, s_corr, mask), seconds, peak = _measure(call, trace_memory)
    bad = np.asarray(mask, dtype=bool)
    difference = np.asarray(d).real.astype(np.float64)
    scorr = np.asarray(s_corr).real.astype(np.float64)
    if bad.shape == difference.shape:
        difference[bad] = np.nan
        scorr[bad] = np.nan
    return PeerResult(
        name="properimage",
        difference=difference,
        difference_psf=_centred_stamp(np.asarray(p, dtype=np.float64)),
        scorr=scorr,
        seconds=seconds,
        peak_memory_mb=peak,
    )


# --------------------------------------------------------------------------------------------
# the common detector


def matched_filter_detect(
    difference: np.ndarray,
    psf: np.ndarray,
    *,
    threshold: float = 5.0,
    mask: np.ndarray | None = None,
    edge: int = 10,
) -> Table:
    """Detect positive and negative point sources in a difference image with one PSF filter.

    The difference (NaNs set to 0 and masked) is cross-correlated with the PSF normalised to
    sum 1 (:func:`scipy.signal.fftconvolve` with the flipped PSF); the noise of the filtered
    image is 1.4826 × MAD over unmasked, non-edge pixels; a detection is a local maximum of
    ``|filtered|`` in its 5×5 neighbourhood above ``threshold`` × noise, not masked and at
    least ``edge`` pixels from the border.

    Parameters
    ----------
    difference : numpy.ndarray
        2-D difference image (NumPy order).
    psf : numpy.ndarray
        2-D PSF stamp (any normalisation; odd sides keep positions unbiased).
    threshold : float
        Detection threshold in units of the filtered image's robust sigma.
    mask : numpy.ndarray, optional
        Boolean, True = bad pixel; combined with the non-finite pixels of ``difference``.
    edge : int
        Border width in pixels that is never searched nor used for the noise.

    Returns
    -------
    astropy.table.Table
        Columns ``x``, ``y`` (0-based column, row), ``snr`` (filtered value / noise, signed)
        and ``peak`` (the difference-image pixel value there); sorted by descending |snr|.
    """
    image = np.asarray(difference, dtype=np.float64)
    if image.ndim != 2:
        raise ValueError("difference must be 2-D")
    kernel = np.asarray(psf, dtype=np.float64)
    if kernel.ndim != 2 or not np.isfinite(kernel).all() or kernel.sum() == 0:
        raise ValueError("psf must be a finite 2-D array with non-zero sum")
    kernel = kernel / kernel.sum()
    bad = ~np.isfinite(image)
    if mask is not None:
        if mask.shape != image.shape:
            raise ValueError("mask shape differs from difference shape")
        bad |= np.asarray(mask, dtype=bool)
    filtered = signal.fftconvolve(np.where(bad, 0.0, image), kernel[::-1, ::-1], mode="same")
    usable = ~bad
    if edge > 0:
        usable[:edge, :] = usable[-edge:, :] = False
        usable[:, :edge] = usable[:, -edge:] = False
    values = filtered[usable]
    if values.size == 0:
        raise ValueError("no unmasked pixels left to estimate the noise")
    noise = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    if not noise > 0:
        raise ValueError("robust noise of the filtered image is zero")
    magnitude = np.abs(filtered)
    is_peak = magnitude == ndimage.maximum_filter(magnitude, size=5, mode="nearest")
    rows, cols = np.nonzero(is_peak & usable & (magnitude > threshold * noise))
    snr = filtered[rows, cols] / noise
    order = np.argsort(-np.abs(snr))
    return Table(
        {
            "x": cols[order].astype(int),
            "y": rows[order].astype(int),
            "snr": snr[order],
            "peak": image[rows[order], cols[order]],
        }
    )


# --------------------------------------------------------------------------------------------
# a synthetic pair


def make_synthetic_pair(
    directory: str | os.PathLike[str],
    *,
    size: int = 1024,
    n_stars: int = 800,
    n_transients: int = 20,
    fwhm_reference: float = 3.0,
    fwhm_science: float = 4.2,
    sky_reference: float = 300.0,
    sky_science: float = 600.0,
    seed: int = 0,
) -> tuple[Path, Path, Table]:
    """Write a simulated science/reference pair on one TAN grid, with Poisson noise.

    Stars (positions uniform, fluxes log-uniform 500–3e5 e-, peaks below properimage's
    65000 cap) appear in both images; ``n_transients`` point sources of 3000–20000 e- appear
    in the science image only. Gain is 1 e-/ADU, no read noise, nothing saturates.

    Parameters
    ----------
    directory : path-like
        Output folder (created).
    size : int
        Image side in pixels.
    n_stars, n_transients : int
        Numbers of static stars and science-only transients.
    fwhm_reference, fwhm_science : float
        Gaussian PSF FWHMs in pixels.
    sky_reference, sky_science : float
        Flat sky levels in e-.
    seed : int
        Random seed.

    Returns
    -------
    tuple of (Path, Path, astropy.table.Table)
        Science path, reference path and the transients' truth (x, y, flux).
    """
    from astropy.wcs import WCS

    rng = np.random.default_rng(seed)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    margin = 12
    xs = rng.uniform(margin, size - margin, n_stars)
    ys = rng.uniform(margin, size - margin, n_stars)
    fluxes = np.exp(rng.uniform(np.log(500.0), np.log(3e5), n_stars))
    tx = rng.uniform(3 * margin, size - 3 * margin, n_transients)
    ty = rng.uniform(3 * margin, size - 3 * margin, n_transients)
    tflux = rng.uniform(3000.0, 20000.0, n_transients)

    wcs = WCS(naxis=2)
    wcs.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    wcs.wcs.crval = [150.0, 2.0]
    wcs.wcs.crpix = [size / 2 + 0.5, size / 2 + 0.5]
    wcs.wcs.cdelt = [-0.263 / 3600.0, 0.263 / 3600.0]

    def render(x: np.ndarray, y: np.ndarray, flux: np.ndarray, fwhm: float) -> np.ndarray:
        sigma = fwhm / (2.0 * np.sqrt(2.0 * np.log(2.0)))
        half = int(np.ceil(5 * sigma))
        image = np.zeros((size, size))
        offsets = np.arange(-half, half + 1)
        for xi, yi, fi in zip(x, y, flux, strict=True):
            cx, cy = round(xi), round(yi)
            gx = np.exp(-((cx + offsets - xi) ** 2) / (2 * sigma**2))
            gy = np.exp(-((cy + offsets - yi) ** 2) / (2 * sigma**2))
            stamp = np.outer(gy, gx)
            r0, c0 = cy - half, cx - half
            rs = slice(max(r0, 0), min(r0 + stamp.shape[0], size))
            cs = slice(max(c0, 0), min(c0 + stamp.shape[1], size))
            image[rs, cs] += (
                fi * stamp[rs.start - r0 : rs.stop - r0, cs.start - c0 : cs.stop - c0] / stamp.sum()
            )
        return image

    paths = {}
    for kind, fwhm, sky in (
        ("reference", fwhm_reference, sky_reference),
        ("science", fwhm_science, sky_science),
    ):
        model = sky + render(xs, ys, fluxes, fwhm)
        if kind == "science":
            model += render(tx, ty, tflux, fwhm)
        data = rng.poisson(model).astype(np.float64)
        header = wcs.to_header()
        header["GAIN"] = (1.0, "e-/ADU")
        header["RDNOISE"] = (0.0, "e-")
        header["SATURATE"] = (1.0e6, "ADU")
        header["FWHM"] = (fwhm, "px, simulated")
        header["SKYLEVEL"] = (sky, "e-, simulated")
        paths[kind] = out / f"synthetic_{kind}_{size}.fits"
        fits.PrimaryHDU(data=data, header=header).writeto(paths[kind], overwrite=True)
    truth = Table({"x": tx, "y": ty, "flux": tflux})
    return paths["science"], paths["reference"], truth


# --------------------------------------------------------------------------------------------
# smoke run


def _find_decam() -> Path:
    for candidate in DECAM_DIR_CANDIDATES:
        if (candidate / DECAM_SCIENCE).exists():
            return candidate
    raise FileNotFoundError(f"no {DECAM_SCIENCE} in {[str(c) for c in DECAM_DIR_CANDIDATES]}")


def _recovered(found: Table, truth: Table, radius: float = 3.0) -> int:
    """Count truth positions with a positive detection within ``radius`` pixels."""
    if len(found) == 0 or len(truth) == 0:
        return 0
    positive = found[found["snr"] > 0]
    fx = np.asarray(positive["x"], float)[:, None]
    fy = np.asarray(positive["y"], float)[:, None]
    dist = np.hypot(fx - np.asarray(truth["x"])[None, :], fy - np.asarray(truth["y"])[None, :])
    return int(np.sum(dist.min(axis=0) <= radius)) if len(positive) else 0


def main(argv: list[str] | None = None) -> int:
    """Run both peers on one pair and print time, difference std and 5σ detections."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--synthetic", type=int, metavar="SIZE", help="simulated SIZE² pair")
    parser.add_argument("--flavor", choices=("crowded", "sparse"), default="crowded")
    parser.add_argument("--peers", default="sfft,properimage", help="comma-separated")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="astr-peers-"))
    failures = 0
    try:
        truth = None
        if args.synthetic:
            sci, ref, truth = make_synthetic_pair(workdir / "inputs", size=args.synthetic)
            psf = gaussian_psf(4.2)
            label = f"synthetic {args.synthetic}²"
        else:
            decam = _find_decam()
            sci, ref = decam / DECAM_SCIENCE, decam / DECAM_REFERENCE
            psf = gaussian_psf(DECAM_SCIENCE_FWHM)
            label = f"DECam {DECAM_SCIENCE} − {DECAM_REFERENCE}"
        print(f"pair: {label}; workdir {workdir}")
        runners: dict[str, Callable[[], PeerResult]] = {
            "sfft": lambda: run_sfft(sci, ref, workdir / "sfft", flavor=args.flavor),
            "properimage": lambda: run_properimage(sci, ref, workdir / "properimage"),
        }
        for name in args.peers.split(","):
            try:
                result = runners[name.strip()]()
                diff = result.difference
                if not np.isfinite(diff).any():
                    raise RuntimeError("difference image is all NaN")
                found = matched_filter_detect(diff, psf, threshold=5.0)
                std = float(np.nanstd(diff))
                mad = 1.4826 * float(np.nanmedian(np.abs(diff - np.nanmedian(diff))))
                extra = ""
                if truth is not None:
                    extra = f", transients recovered {_recovered(found, truth)}/{len(truth)}"
                memory = "n/a" if result.peak_memory_mb is None else f"{result.peak_memory_mb:.0f}"
                print(
                    f"{result.name:>16}: {result.seconds:7.2f} s, peak traced {memory} MiB, "
                    f"diff std {std:.4g} (robust {mad:.4g}), NaN {int(np.isnan(diff).sum())}, "
                    f"5σ detections {len(found)} "
                    f"(+{int(np.sum(found['snr'] > 0))}/−{int(np.sum(found['snr'] < 0))}){extra}"
                )
            except Exception as error:  # report every peer, then fail
                failures += 1
                print(f"{name:>16}: FAILED {type(error).__name__}: {error}", file=sys.stderr)
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
