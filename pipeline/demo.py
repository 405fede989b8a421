"""A small simulated night for ``astr demo``: pairs with injected transients, and scoring.

Pure science-side code (no Prefect): write the pairs and a manifest, then compare
the pipeline's candidate catalogues with what was injected.
"""

from __future__ import annotations

import csv
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from pipeline.science import io
from pipeline.science.simulate import simulate_pair

__all__ = [
    "DemoPair",
    "Recovery",
    "jittered_night",
    "score_candidates",
    "simulate_night",
    "write_manifest",
]

#: Transients brighter than this (injected S/N) are the ones a survey expects to find.
DETECTABLE_SNR = 7.0


@dataclass(frozen=True)
class DemoPair:
    """One simulated pair on disk and its truth table."""

    name: str
    science_path: Path
    reference_path: Path
    truth_path: Path


@dataclass(frozen=True)
class Recovery:
    """How many injected transients a candidate catalogue recovered."""

    injected: int
    detectable: int
    recovered: int
    recovered_detectable: int
    candidates: int
    unmatched: int

    @property
    def completeness(self) -> float:
        """Recovered fraction of the transients with injected S/N >= 7."""
        return self.recovered_detectable / self.detectable if self.detectable else float("nan")


def simulate_night(
    folder: Path,
    *,
    pairs: int = 3,
    size: int = 1024,
    seed: int = 2026,
    transients: int = 30,
) -> list[DemoPair]:
    """Write ``pairs`` simulated science/reference pairs with injected transients.

    Each pair differs in seed, PSF and pointing; transients span S/N 4-40, some on
    galaxies, some fading.
    """
    folder.mkdir(parents=True, exist_ok=True)
    # The simulator's default star density (600 per 1024^2): fewer stars make the PSF
    # and flux-scale fits fragile, which is a property of the field, not of the pipeline.
    density = (size / 1024) ** 2
    made = []
    for i in range(pairs):
        name = f"pair-{i + 1:02d}"
        pair = simulate_pair(
            shape=(size, size),
            seed=seed + i,
            n_stars=int(600 * density),
            n_galaxies=int(150 * density),
            n_transients=transients,
            fwhm_science=3.8 + 0.4 * (i % 3),
            transient_snr=(4.0, 40.0),
            cosmic_rays=int(40 * density),
        )
        science = folder / f"{name}_science.fits"
        reference = folder / f"{name}_reference.fits"
        truth = folder / f"{name}_truth.ecsv"
        io.write_image(pair.science, science)
        io.write_image(pair.reference, reference)
        pair.truth.write(truth, format="ascii.ecsv", overwrite=True)
        made.append(DemoPair(name, science, reference, truth))
    return made


def jittered_night(
    science: Path,
    reference: Path,
    folder: Path,
    *,
    pairs: int,
    seed: int = 0,
    jitter: float = 0.05,
) -> list[DemoPair]:
    """Write ``pairs`` distinct copies of one science image, each against ``reference``.

    Each copy adds its own seeded Gaussian noise of ``jitter`` times the image's robust
    standard deviation, so each is a new observation (observations are identified by
    their inputs' checksums) that the pipeline treats as the original. Meant for load
    tests: thousands of pairs in seconds, every one as well-behaved as the original.
    The header (and WCS) is kept; ``truth_path`` is empty (nothing is injected).
    """
    from astropy.io import fits

    folder.mkdir(parents=True, exist_ok=True)
    with fits.open(science) as hdus:
        index = next(i for i, hdu in enumerate(hdus) if hdu.data is not None)
        data = np.asarray(hdus[index].data, dtype=np.float32)
        header = hdus[index].header.copy()
    finite = data[np.isfinite(data)]
    sigma = 1.4826 * float(np.median(np.abs(finite - np.median(finite)))) * jitter
    made = []
    for i in range(pairs):
        name = f"pair-{i + 1:04d}"
        noise = np.random.default_rng([seed, i]).normal(0.0, sigma, data.shape)
        path = folder / f"{name}_science.fits"
        fits.PrimaryHDU((data + noise).astype(np.float32), header).writeto(path, overwrite=True)
        made.append(DemoPair(name, path, Path(reference).resolve(), folder / f"{name}_truth.ecsv"))
    return made


def write_manifest(pairs: list[DemoPair], path: Path) -> Path:
    """A night manifest (CSV: name, science_path, reference_path), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", newline="", dir=path.parent, suffix=".tmp", delete=False
    ) as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "science_path", "reference_path"])
        for pair in pairs:
            writer.writerow([pair.name, pair.science_path, pair.reference_path])
    os.replace(handle.name, path)
    return path


def score_candidates(candidates: Table, truth: Table, radius: float = 2.0) -> Recovery:
    """Match passed candidates to injected transients on the reference pixel grid.

    Parameters
    ----------
    candidates : Table
        ``candidates.ecsv`` (``x``, ``y`` on the reference grid, ``passed``).
    truth : Table
        The simulation's truth (``x_ref``, ``y_ref``, ``snr_injected``).
    radius : float
        Match radius in pixels.
    """
    passed = candidates[candidates["passed"]] if "passed" in candidates.colnames else candidates
    cx = np.asarray(passed["x"], float)
    cy = np.asarray(passed["y"], float)
    tx = np.asarray(truth["x_ref"], float)
    ty = np.asarray(truth["y_ref"], float)
    if len(cx) and len(tx):
        d2 = (cx[:, None] - tx[None, :]) ** 2 + (cy[:, None] - ty[None, :]) ** 2
        hit_truth = (d2 <= radius**2).any(axis=0)
        hit_candidate = (d2 <= radius**2).any(axis=1)
    else:
        hit_truth = np.zeros(len(tx), bool)
        hit_candidate = np.zeros(len(cx), bool)
    detectable = np.asarray(truth["snr_injected"], float) >= DETECTABLE_SNR
    return Recovery(
        injected=len(tx),
        detectable=int(detectable.sum()),
        recovered=int(hit_truth.sum()),
        recovered_detectable=int((hit_truth & detectable).sum()),
        candidates=len(cx),
        unmatched=int((~hit_candidate).sum()),
    )
