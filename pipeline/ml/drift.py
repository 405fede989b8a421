"""Score drift: tonight's real/bogus scores against the model's training scores.

The population stability index (PSI) compares two histograms over the same bins:
``PSI = sum((a_i - e_i) * ln(a_i / e_i))`` with ``e`` the expected (training) and
``a`` the actual (tonight's) fractions. The usual reading: below 0.1 stable, 0.1–0.25
a moderate shift worth a look, above 0.25 a shift that calls for retraining.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "DRIFT_BINS",
    "PSI_ALERT",
    "PSI_WARN",
    "DriftCheck",
    "check_drift",
    "population_stability_index",
    "score_histogram",
]

#: Equal-width bins of the score in [0, 1].
DRIFT_BINS = 10
PSI_WARN = 0.1
PSI_ALERT = 0.25
#: Floor on a bin's fraction, so an empty bin gives a large but finite term.
_EPS = 1e-4


@dataclass(frozen=True)
class DriftCheck:
    """The outcome of one drift check."""

    psi: float
    n_scores: int
    level: str  # "stable", "moderate", "shift" or "too few" (fewer than min_scores)
    histogram: tuple[int, ...]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "psi": self.psi,
            "n_scores": self.n_scores,
            "level": self.level,
            "histogram": list(self.histogram),
        }


def score_histogram(scores: np.ndarray, bins: int = DRIFT_BINS) -> np.ndarray:
    """Counts of finite scores in ``bins`` equal-width bins over [0, 1] (1.0 in the last)."""
    s = np.asarray(scores, dtype=float)
    s = s[np.isfinite(s)]
    if s.size and (s.min() < 0 or s.max() > 1):
        raise ValueError(f"scores must be probabilities in [0, 1], got {s.min()}..{s.max()}")
    which = np.minimum((s * bins).astype(int), bins - 1)
    return np.bincount(which, minlength=bins).astype(np.int64)


def population_stability_index(
    expected: Sequence[float] | np.ndarray, actual: Sequence[float] | np.ndarray
) -> float:
    """PSI between two histograms (counts or fractions) over the same bins.

    Raises
    ------
    ValueError
        If the histograms differ in length or either is empty.
    """
    e = np.asarray(expected, dtype=float)
    a = np.asarray(actual, dtype=float)
    if e.shape != a.shape or e.ndim != 1:
        raise ValueError(f"histograms must have the same bins, got {e.shape} and {a.shape}")
    if e.sum() <= 0 or a.sum() <= 0 or (e < 0).any() or (a < 0).any():
        raise ValueError("histograms must be non-negative and not empty")
    e = np.maximum(e / e.sum(), _EPS)
    a = np.maximum(a / a.sum(), _EPS)
    return float(np.sum((a - e) * np.log(a / e)))


def check_drift(
    reference: Sequence[float] | np.ndarray,
    scores: np.ndarray,
    *,
    min_scores: int = 20,
) -> DriftCheck:
    """Compare tonight's ``scores`` with the model's ``reference`` histogram.

    Parameters
    ----------
    reference : sequence of float
        Histogram (counts or fractions) of the model's scores on its training
        candidates, over ``len(reference)`` equal-width bins.
    scores : ndarray
        Tonight's scores (NaN ignored).
    min_scores : int
        Below this many scores the PSI is still given but the level is ``too few``.
    """
    counts = score_histogram(scores, bins=len(reference))
    n = int(counts.sum())
    psi = population_stability_index(reference, counts) if n else float("nan")
    if n < min_scores:
        level = "too few"
    elif psi < PSI_WARN:
        level = "stable"
    elif psi < PSI_ALERT:
        level = "moderate"
    else:
        level = "shift"
    return DriftCheck(psi=psi, n_scores=n, level=level, histogram=tuple(int(c) for c in counts))
