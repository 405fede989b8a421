"""Labelled candidate triplets for the real/bogus classifier.

A sample is what the pipeline itself detects: every |S_corr| peak our preprocessing,
ZOGY differencing and detection find in a simulated pair, with its 63×63 science,
reference and difference cutouts. Its label comes from what the simulator put there:

- ``real``: within ``match_radius`` of an injected transient;
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

import numpy as np
from astropy.table import Table

from pipeline.errors import AstrError, ScienceError

log = logging.getLogger(__name__)

__all__ = [
    "BOGUS_KINDS",
    "KINDS",
    "CandidateDataset",
    "DatasetError",
    "assign_splits",
    "concatenate",
    "label_candidates",
    "load_dataset",
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
    triplets : 4D ndarray of float32, shape (n, 3, size, size)
        Science, reference and difference cutouts (ADU, background subtracted).
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

    def subset(self, split: str) -> CandidateDataset:
        """The candidates of one split."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        keep = self.split == split
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
    ``y``, ``length`` (already mapped onto the grid); static sources ``x``, ``y``.

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
        near = d.min(axis=1) <= reach
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


def simulated_dataset(
    seeds: Iterable[int],
    *,
    shape: tuple[int, int] = (1024, 1024),
    cutout_size: int = 63,
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    threshold: float = 5.0,
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
    **simulation :
        Further ``simulate_pair`` arguments (transient S/N range, artefact counts...).
    """
    parts = []
    for seed in seeds:
        try:
            parts.append(_pair_samples(seed, shape, cutout_size, threshold, simulation))
        except ScienceError as exc:  # the pipeline cannot process this pair: no samples
            log.warning("simulated pair seed %d skipped: %s", seed, exc)
    if not parts:
        raise ValueError("simulated_dataset: no pair could be processed (or no seed given)")
    merged = concatenate(parts)
    splits = assign_splits(merged.image.tolist(), fractions)
    split = np.array([splits[name] for name in merged.image], dtype="U10")
    return CandidateDataset(**{**_as_dict(merged), "split": split})


def _pair_samples(
    seed: int, shape: tuple[int, int], size: int, threshold: float, simulation: dict
) -> CandidateDataset:
    from pipeline.science.cutouts import cutout_triplets
    from pipeline.science.detection import NoDetectionsWarning, detect_candidates
    from pipeline.science.differencing import difference_pair
    from pipeline.science.preprocessing import preprocess_pair
    from pipeline.science.simulate import simulate_pair

    sim = simulate_pair(shape=shape, seed=seed, **simulation)  # type: ignore[arg-type]
    pair = preprocess_pair(sim.science, sim.reference)
    diff = difference_pair(pair)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NoDetectionsWarning)
        candidates = detect_candidates(diff, pair, threshold=threshold)
    artefacts = _on_reference_grid(sim.artefacts, sim.science.wcs, sim.reference.wcs)
    static = Table({"x": sim.sources["x_ref"], "y": sim.sources["y_ref"]})
    fwhm = max(pair.psf_science.fwhm, pair.psf_reference.fwhm)
    kind, injected = label_candidates(candidates, sim.truth, artefacts, static, fwhm=fwhm)
    x, y = np.asarray(candidates["x"]), np.asarray(candidates["y"])
    n = len(candidates)
    return CandidateDataset(
        triplets=cutout_triplets(pair.science, pair.reference, diff.D, x, y, size=size),
        label=(kind == KINDS.index("real")).astype(np.int8),
        kind_code=kind,
        snr=np.asarray(candidates["snr"], dtype=np.float32),
        injected_snr=injected,
        image=np.full(n, f"sim-{shape[0]}x{shape[1]}-seed{seed}", dtype="U64"),
        split=np.full(n, "train", dtype="U10"),
    )


def _on_reference_grid(artefacts: Table, science_wcs: object, reference_wcs: object) -> Table:
    """Artefact positions (science pixels) mapped onto the reference grid."""
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
