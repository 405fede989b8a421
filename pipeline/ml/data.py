"""Labelled candidate triplets for the real/bogus classifier.

A sample is what the pipeline itself detects: every |S_corr| peak our preprocessing,
ZOGY differencing and detection find in a simulated pair, with its 63×63 science,
reference, difference and mask cutouts. Its label comes from what the simulator put there:

- ``real``: within ``match_radius`` of an injected transient (0.6 FWHM, at least 2 px);
- ``cosmic_ray``, ``bad_column``, ``saturated_star``: on or next to that artefact;
- ``dipole``: flagged as a dipole (a misregistration residual of a static source);
- ``static_residual``: on a static star or galaxy (PSF-mismatch residual, core noise);
- ``noise``: anything else (a noise peak).

Only ``real`` is positive; the other kinds are kept so the false-positive rate can be
reported per kind. Splits are by image, never by candidate (neighbouring candidates of
one image share its noise, PSF and artefacts: splitting them would leak).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import AstrError, ScienceError

if TYPE_CHECKING:  # astropy's table costs a search worker half a second to import
    from astropy.table import Table

log = logging.getLogger(__name__)

__all__ = [
    "BOGUS_KINDS",
    "KINDS",
    "CandidateDataset",
    "DatasetError",
    "assign_splits",
    "concatenate",
    "injected_dataset",
    "label_candidates",
    "load_dataset",
    "observing_conditions",
    "save_dataset",
    "simulated_dataset",
]

#: Every label kind, in code order (``kind_code`` indexes this tuple).
KINDS = (
    "real",
    "cosmic_ray",
    "bad_column",
    "saturated_star",
    "dipole",
    "static_residual",
    "noise",
)
BOGUS_KINDS = KINDS[1:]
SPLITS = ("train", "validation", "test")
_FORMAT = 1


class DatasetError(AstrError):
    """A dataset file is missing, unreadable, or not what it says it is."""


@dataclass(frozen=True)
class CandidateDataset:
    """Candidate triplets with labels, one row per detected candidate.

    Attributes
    ----------
    triplets : 4D ndarray of float32, shape (n, 4, size, size)
        Science, reference and difference cutouts (ADU, background subtracted) and the
        mask cutout (1 masked or beyond the image, 0 clean). Datasets built before the
        mask stamp have three.
    label : 1D ndarray of int8
        1 real, 0 bogus.
    kind_code : 1D ndarray of int8
        Index into ``KINDS``.
    snr : 1D ndarray of float32
        Detection S/N (signed S_corr).
    injected_snr : 1D ndarray of float32
        Injected S/N of the matched transient; NaN for bogus candidates.
    image : 1D ndarray of str
        Which pair a candidate came from (the unit of the splits).
    split : 1D ndarray of str
        ``train``, ``validation`` or ``test``.
    """

    triplets: np.ndarray
    label: np.ndarray
    kind_code: np.ndarray
    snr: np.ndarray
    injected_snr: np.ndarray
    image: np.ndarray
    split: np.ndarray

    def __len__(self) -> int:
        return int(self.label.shape[0])

    @property
    def kind(self) -> np.ndarray:
        """Kind names per candidate."""
        return np.asarray(KINDS, dtype=object)[self.kind_code].astype(str)

    @property
    def dataset_id(self) -> str:
        """Content hash: the same candidates, labels and splits give the same id."""
        digest = hashlib.sha256(f"astr-candidates-v{_FORMAT}".encode())
        for name in ("triplets", "label", "kind_code", "snr", "injected_snr"):
            array = np.ascontiguousarray(getattr(self, name))
            digest.update(f"{name}{array.dtype.str}{array.shape}".encode())
            digest.update(array.tobytes())
        for name in ("image", "split"):
            digest.update("\x00".join(getattr(self, name).tolist()).encode())
        return digest.hexdigest()[:16]

    def mask(self, split: str) -> np.ndarray:
        """Which candidates belong to one split (no copy of their stamps)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.split == split

    def subset(self, split: str) -> CandidateDataset:
        """The candidates of one split."""
        keep = self.mask(split)
        return CandidateDataset(**{name: getattr(self, name)[keep] for name in _FIELDS})

    def counts(self) -> dict[str, dict[str, int]]:
        """Candidates per split and kind."""
        kinds = self.kind
        return {
            split: {k: int(np.sum((self.split == split) & (kinds == k))) for k in KINDS}
            for split in SPLITS
        }


_FIELDS = ("triplets", "label", "kind_code", "snr", "injected_snr", "image", "split")


def label_candidates(
    candidates: Table,
    truth: Table,
    artefacts: Table,
    static_sources: Table,
    *,
    fwhm: float,
    match_radius: float = 2.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Label detected candidates from what was injected.

    All positions are on the reference pixel grid: candidates ``x``, ``y`` (with
    ``flags``), truth ``x_ref``, ``y_ref``, ``snr_injected``; artefacts ``kind``, ``x``,
    ``y``, ``length`` (already mapped onto the grid); static sources ``x``, ``y`` and
    optionally ``reach`` (pixels; default ``2 * fwhm``: bright stars leave residual rings
    further out).

    Parameters
    ----------
    fwhm : float
        PSF FWHM (pixels): the reach of an artefact's or a static source's residual.
    match_radius : float
        Largest distance (pixels) of a real candidate from its injected transient.

    Returns
    -------
    kind_code : ndarray of int8
        Index into ``KINDS`` per candidate; the first rule that applies wins, in the
        order of ``KINDS``.
    injected_snr : ndarray of float32
        Injected S/N of the matched transient, NaN when not real.
    """
    from pipeline.science.detection import CandidateFlag

    n = len(candidates)
    x = np.asarray(candidates["x"], dtype=float)
    y = np.asarray(candidates["y"], dtype=float)
    kind = np.full(n, KINDS.index("noise"), dtype=np.int8)
    injected = np.full(n, np.nan, dtype=np.float32)
    decided = np.zeros(n, dtype=bool)

    if len(truth):
        d = np.hypot(
            x[:, None] - np.asarray(truth["x_ref"])[None, :],
            y[:, None] - np.asarray(truth["y_ref"])[None, :],
        )
        nearest = np.argmin(d, axis=1)
        real = d[np.arange(n), nearest] <= match_radius
        kind[real] = KINDS.index("real")
        injected[real] = np.asarray(truth["snr_injected"], dtype=np.float32)[nearest[real]]
        decided |= real

    reach = 2.0 * fwhm
    for name in ("cosmic_ray", "bad_column", "saturated_star"):
        rows = artefacts[artefacts["kind"] == name] if len(artefacts) else artefacts
        hit = np.zeros(n, dtype=bool)
        for row in rows:
            ax, ay, length = float(row["x"]), float(row["y"]), float(row["length"])
            if name == "bad_column":  # a vertical stretch centred on (ax, ay)
                hit |= (np.abs(x - ax) <= reach) & (np.abs(y - ay) <= length / 2 + reach)
            elif name == "saturated_star":  # the star, its wings and its bleed trail
                hit |= (np.abs(x - ax) <= 3 * reach) & (np.abs(y - ay) <= length / 2 + 3 * reach)
            else:
                hit |= np.hypot(x - ax, y - ay) <= length / 2 + reach
        new = hit & ~decided
        kind[new] = KINDS.index(name)
        decided |= new

    dipole = (np.asarray(candidates["flags"], dtype=int) & int(CandidateFlag.DIPOLE)) != 0
    new = dipole & ~decided
    kind[new] = KINDS.index("dipole")
    decided |= new

    if len(static_sources):
        d = np.hypot(
            x[:, None] - np.asarray(static_sources["x"])[None, :],
            y[:, None] - np.asarray(static_sources["y"])[None, :],
        )
        if "reach" in static_sources.colnames:
            source_reach = np.maximum(np.asarray(static_sources["reach"], dtype=float), reach)
        else:
            source_reach = np.full(len(static_sources), reach)
        near = np.any(d <= source_reach[None, :], axis=1)
        new = near & ~decided
        kind[new] = KINDS.index("static_residual")
    return kind, injected


def assign_splits(
    images: Sequence[str], fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
) -> dict[str, str]:
    """Give each image a split, deterministically from its name.

    Images are ordered by a hash of their names and cut by ``fractions``; every split
    gets at least one image when there are three or more.
    """
    if len(fractions) != 3 or min(fractions) < 0 or not np.isclose(sum(fractions), 1.0):
        raise ValueError(f"fractions must be three non-negative numbers summing to 1: {fractions}")
    unique = sorted(set(images), key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    n = len(unique)
    n_test = round(fractions[2] * n)
    n_val = round(fractions[1] * n)
    if n >= 3:
        n_test, n_val = max(n_test, 1), max(n_val, 1)
    n_train = max(n - n_val - n_test, 0)
    names = ["train"] * n_train + ["validation"] * n_val + ["test"] * (n - n_train - n_val)
    return dict(zip(unique, names, strict=True))


def observing_conditions(seed: int) -> dict[str, object]:
    """Observing conditions of one simulated pair, drawn from ``seed``.

    A survey's nights differ in seeing, PSF shape, sky, transparency, reference depth,
    pointing and artefact load; a classifier trained on one setting learns that setting.
    Returns ``simulate_pair`` keyword arguments: science seeing 0.8-1.8 times the
    reference's (2.2-4.5 px), Moffat beta 2.5-4.5, science ellipticity up to 0.15, sky
    150-800 (reference) and 200-2000 ADU (science), flux scale 0.5-1.2, reference depth
    2-8 exposures, shifts up to 6 px and rotations up to 0.5°, PSF variation up to 15%,
    20-120 cosmic rays, 0-3 bad columns, 1-5 saturated stars, 300-1200 stars and 80-300
    galaxies per 1024² (scaled by area by the caller's ``shape``).
    """
    rng = np.random.default_rng((int(seed), 20260))
    fwhm_reference = float(rng.uniform(2.2, 4.5))
    return {
        "fwhm_reference": fwhm_reference,
        "fwhm_science": fwhm_reference * float(rng.uniform(0.8, 1.8)),
        "beta_reference": float(rng.uniform(2.5, 4.5)),
        "beta_science": float(rng.uniform(2.5, 4.5)),
        "ellipticity_science": float(rng.uniform(0.0, 0.15)),
        "sky_reference": float(rng.uniform(150.0, 800.0)),
        "sky_science": float(rng.uniform(200.0, 2000.0)),
        "flux_scale": float(rng.uniform(0.5, 1.2)),
        "reference_depth": float(rng.uniform(2.0, 8.0)),
        "shift": (float(rng.uniform(-6.0, 6.0)), float(rng.uniform(-6.0, 6.0))),
        "rotation_deg": float(rng.uniform(-0.5, 0.5)),
        "psf_variation": float(rng.uniform(0.0, 0.15)),
        "cosmic_rays": int(rng.integers(20, 121)),
        "bad_columns": int(rng.integers(0, 4)),
        "saturated_stars": int(rng.integers(1, 6)),
        "n_stars": int(rng.integers(300, 1201)),
        "n_galaxies": int(rng.integers(80, 301)),
    }


def simulated_dataset(
    seeds: Iterable[int],
    *,
    shape: tuple[int, int] = (1024, 1024),
    cutout_size: int = 63,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    threshold: float = 5.0,
    vary: bool = False,
    **simulation: object,
) -> CandidateDataset:
    """Run our preprocessing, differencing and detection on simulated pairs; label the result.

    Parameters
    ----------
    seeds : iterable of int
        One simulated pair per seed (``pipeline.science.simulate.simulate_pair``).
    shape, cutout_size, threshold :
        Image size, stamp size and detection threshold (σ of S_corr).
    fractions : tuple of float
        Train, validation and test shares of the images.
    vary : bool
        Draw each pair's observing conditions from its seed (:func:`observing_conditions`;
        source and artefact counts scaled to ``shape``); ``simulation`` overrides them.
    **simulation :
        Further ``simulate_pair`` arguments (transient S/N range, artefact counts...).
    """
    parts = []
    for seed in seeds:
        settings = {**_scaled_conditions(seed, shape), **simulation} if vary else simulation
        try:
            parts.append(_pair_samples(seed, shape, cutout_size, threshold, settings))
        except ScienceError as exc:  # the pipeline cannot process this pair: no samples
            log.warning("simulated pair seed %d skipped: %s", seed, exc)
    if not parts:
        raise ValueError("simulated_dataset: no pair could be processed (or no seed given)")
    merged = concatenate(parts)
    splits = assign_splits(merged.image.tolist(), fractions)
    split = np.array([splits[name] for name in merged.image], dtype="U10")
    return CandidateDataset(**{**_as_dict(merged), "split": split})


def _scaled_conditions(seed: int, shape: tuple[int, int]) -> dict[str, object]:
    """:func:`observing_conditions` with counts scaled from 1024² to ``shape``."""
    conditions = observing_conditions(seed)
    area = shape[0] * shape[1] / 1024**2
    for name in ("cosmic_rays", "n_stars", "n_galaxies"):
        conditions[name] = max(1, round(int(conditions[name]) * area))  # type: ignore[call-overload]
    return conditions


def _pair_samples(
    seed: int, shape: tuple[int, int], size: int, threshold: float, simulation: dict
) -> CandidateDataset:
    from astropy.table import Table

    from pipeline.science.simulate import simulate_pair

    sim = simulate_pair(shape=shape, seed=seed, **simulation)  # type: ignore[arg-type]
    pair, diff, candidates = _run_pipeline(sim.science, sim.reference, threshold)
    artefacts = _on_reference_grid(sim.artefacts, sim.science.wcs, sim.reference.wcs)
    fwhm = max(pair.psf_science.fwhm, pair.psf_reference.fwhm)
    static = Table(
        {
            "x": sim.sources["x_ref"],
            "y": sim.sources["y_ref"],
            "reach": _residual_reach(
                np.asarray(sim.sources["flux_sci"], dtype=float),
                float(sim.science.meta["sigma_bkg"]),
                fwhm,
            ),
        }
    )
    kind, injected = label_candidates(
        candidates, sim.truth, artefacts, static, fwhm=fwhm, match_radius=_match_radius(fwhm)
    )
    return _samples(
        pair, diff, candidates, kind, injected, size, f"sim-{shape[0]}x{shape[1]}-seed{seed}"
    )


def _match_radius(fwhm: float, least: float = 2.0) -> float:
    """How far (pixels) a transient's detection may lie from where it was injected.

    In broad seeing, and on a host whose light pulls the peak, the S_corr maximum of a
    transient lands a few pixels off: 0.6 FWHM (at least ``least``) still picks out one
    peak (detection keeps one per FWHM-sized box) and stops a real transient's own
    detection being labelled bogus.
    """
    return max(least, 0.6 * fwhm)


def _residual_reach(flux: np.ndarray, sigma: float, fwhm: float) -> np.ndarray:
    """How far (pixels) a static source's subtraction residual reaches.

    A few per cent of a star's light survives PSF matching; in a bright star the wings
    carry that residual above the noise well beyond its core: ``1.5 fwhm`` per decade of
    peak S/N, and at least ``2 fwhm``.
    """
    peak_snr = np.clip(flux, 0.0, None) / (1.13 * fwhm**2 * sigma)
    return fwhm * np.maximum(2.0, 1.5 * np.log10(np.maximum(peak_snr, 1.0)))


def _run_pipeline(science: object, reference: object, threshold: float) -> tuple:
    """Our preprocessing, ZOGY differencing and detection of one pair."""
    from pipeline.science.detection import NoDetectionsWarning, detect_candidates
    from pipeline.science.differencing import difference_pair
    from pipeline.science.preprocessing import preprocess_pair

    pair = preprocess_pair(science, reference)
    diff = difference_pair(pair)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        candidates = detect_candidates(diff, pair, threshold=threshold)
    return pair, diff, candidates


def _samples(
    pair: object,
    diff: object,
    candidates: Table,
    kind: np.ndarray,
    injected: np.ndarray,
    size: int,
    image: str,
    split: str = "train",
) -> CandidateDataset:
    """Cutouts and labels of one pair's candidates."""
    from pipeline.science.cutouts import cutout_triplets

    x, y = np.asarray(candidates["x"], dtype=float), np.asarray(candidates["y"], dtype=float)
    n = len(candidates)
    return CandidateDataset(
        triplets=cutout_triplets(
            pair.science,  # type: ignore[attr-defined]
            pair.reference,  # type: ignore[attr-defined]
            diff.D,  # type: ignore[attr-defined]
            x,
            y,
            size=size,
            mask=pair.mask,  # type: ignore[attr-defined]
        ),
        label=(kind == KINDS.index("real")).astype(np.int8),
        kind_code=kind,
        snr=np.asarray(candidates["snr"], dtype=np.float32),
        injected_snr=injected,
        image=np.full(n, image, dtype="U64"),
        split=np.full(n, split, dtype="U10"),
    )


def injected_dataset(
    science: object,
    reference: object,
    *,
    name: str,
    split: str = "train",
    trials: int = 10,
    n_fakes: int = 20,
    snr_range: tuple[float, float] = (3.0, 100.0),
    seed: int = 0,
    cutout_size: int = 63,
    threshold: float = 5.0,
    match_radius: float = 2.0,
    spacing: float = 18.0,
    exclude: Table | None = None,
) -> CandidateDataset:
    """Candidates of a real pair with fake point sources injected, labelled by the fakes.

    Each trial injects ``n_fakes`` point sources with the science image's own PSF (as our
    preprocessing measures it) at random positions at least ``spacing`` pixels apart,
    with S/N drawn log-uniformly from ``snr_range`` (background-limited PSF photometry,
    median science noise), then runs our preprocessing, differencing and detection. A
    candidate within ``max(match_radius, 0.6 FWHM)`` of a fake is ``real``; every other
    one is bogus: ``dipole`` when flagged so, ``static_residual`` near a reference-image
    source, ``noise`` otherwise. Unknown astrophysical variables in the pair are labelled bogus.

    Parameters
    ----------
    science, reference : pipeline.science.image.Image
        The real pair (science = one exposure, reference = e.g. a deeper stack).
    name : str
        The exposure's name: every candidate's ``image`` (all trials of one exposure
        share one split, so an exposure never leaks between splits).
    split : str
        Split of all candidates.
    trials, n_fakes, snr_range, seed :
        How many injection rounds, fakes per round, their S/N range and the seed.
    exclude : astropy.table.Table, optional
        Known astrophysical sources in the pair (``x``, ``y`` on the reference grid),
        such as a variable confirmed in another exposure: a candidate within the match
        radius of one is left out, being neither a fake nor bogus.
    """
    from astropy.table import Table

    from pipeline.science.simulate import inject_fakes, snr_to_flux

    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    base, _, _ = _run_pipeline(science, reference, threshold)
    psf = base.psf_science.global_stamp
    sigma = float(np.median(base.science_rms))
    rng = np.random.default_rng(seed)
    ny, nx = science.shape  # type: ignore[attr-defined]
    parts = []
    for trial in range(trials):
        xy = _spread_positions(rng, n_fakes, nx, ny, margin=20.0, spacing=spacing)
        snr = np.exp(rng.uniform(np.log(snr_range[0]), np.log(snr_range[1]), len(xy)))
        faked = inject_fakes(science, psf, xy, snr_to_flux(snr, sigma, psf), seed=seed + trial)  # type: ignore[arg-type]
        pair, diff, candidates = _run_pipeline(faked, reference, threshold)
        world = science.wcs.pixel_to_world(xy[:, 0], xy[:, 1])  # type: ignore[attr-defined]
        x_ref, y_ref = pair.wcs.world_to_pixel(world)
        truth = Table({"x_ref": x_ref, "y_ref": y_ref, "snr_injected": snr})
        fwhm = max(pair.psf_science.fwhm, pair.psf_reference.fwhm)
        sources = pair.reference_sources
        static = Table({"x": sources["x"], "y": sources["y"]}) if len(sources) else Table()
        none = Table({"kind": [], "x": [], "y": [], "length": []})
        kind, injected = label_candidates(
            candidates,
            truth,
            none,
            static,
            fwhm=fwhm,
            match_radius=_match_radius(fwhm, match_radius),
        )
        if exclude is not None and len(exclude) and len(candidates):
            known = _near_any(candidates, exclude, _match_radius(fwhm, match_radius))
            candidates, kind, injected = candidates[~known], kind[~known], injected[~known]
        parts.append(_samples(pair, diff, candidates, kind, injected, cutout_size, name, split))
    return concatenate(parts)


def _near_any(candidates: Table, sources: Table, radius: float) -> np.ndarray:
    """Which candidates lie within ``radius`` pixels of any of ``sources``."""
    from scipy.spatial import cKDTree

    tree = cKDTree(np.column_stack([np.asarray(sources["x"]), np.asarray(sources["y"])]))
    xy = np.column_stack([np.asarray(candidates["x"]), np.asarray(candidates["y"])])
    return np.isfinite(tree.query(xy, distance_upper_bound=radius)[0])


def _spread_positions(
    rng: np.random.Generator, n: int, nx: int, ny: int, *, margin: float, spacing: float
) -> np.ndarray:
    """Up to ``n`` uniform random (x, y) at least ``spacing`` apart, ``margin`` from the edges."""
    points: list[np.ndarray] = []
    for _ in range(200 * n):
        if len(points) == n:
            break
        p = rng.uniform([margin, margin], [nx - margin, ny - margin])
        if all(np.hypot(*(p - q)) >= spacing for q in points):
            points.append(p)
    return np.asarray(points).reshape(-1, 2)


def _on_reference_grid(artefacts: Table, science_wcs: object, reference_wcs: object) -> Table:
    """Artefact positions (science pixels) mapped onto the reference grid."""
    from astropy.table import Table

    if len(artefacts) == 0:
        return Table({"kind": [], "x": [], "y": [], "length": []})
    world = science_wcs.pixel_to_world(artefacts["x_sci"], artefacts["y_sci"])  # type: ignore[attr-defined]
    x, y = reference_wcs.world_to_pixel(world)  # type: ignore[attr-defined]
    return Table({"kind": artefacts["kind"], "x": x, "y": y, "length": artefacts["length"]})


def concatenate(parts: Sequence[CandidateDataset]) -> CandidateDataset:
    """One dataset holding all candidates of ``parts``, in order."""
    if not parts:
        raise ValueError("nothing to concatenate")
    return CandidateDataset(
        **{name: np.concatenate([getattr(p, name) for p in parts]) for name in _FIELDS}
    )


def _as_dict(data: CandidateDataset) -> dict[str, np.ndarray]:
    return {name: getattr(data, name) for name in _FIELDS}


def save_dataset(data: CandidateDataset, path: str | Path) -> Path:
    """Write a dataset as a compressed ``.npz`` atomically; returns the path.

    The file records its ``dataset_id``, checked again on load.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer, format=np.array(_FORMAT), dataset_id=np.array(data.dataset_id), **_as_dict(data)
    )
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".part", delete=False) as handle:
        handle.write(buffer.getvalue())
    os.replace(handle.name, path)
    return path


def load_dataset(path: str | Path) -> CandidateDataset:
    """Read a dataset written by :func:`save_dataset`, checking its content hash.

    Raises
    ------
    DatasetError
        If the file is missing, not a dataset, or its contents do not match its id.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            fields = {name: archive[name] for name in _FIELDS}
            recorded = str(archive["dataset_id"])
    except FileNotFoundError:
        raise DatasetError(f"dataset file {path} does not exist") from None
    except (OSError, ValueError, KeyError) as exc:
        raise DatasetError(f"{path} is not a candidate dataset: {exc}") from None
    data = CandidateDataset(**fields)
    if data.dataset_id != recorded:
        raise DatasetError(
            f"{path}: contents hash to {data.dataset_id} but the file says {recorded}; "
            "it was modified or damaged. Rebuild it."
        )
    return data
