"""What a survey asks of a real/bogus model, measured on a labelled test set.

Published operating points are quoted as a false-positive rate at a fixed miss rate
(braai: 1.7% FPR at 1.7% FNR; ATLAS: 0.72% FPR at 1% missed), so that is the headline
here too, with the ROC AUC, the calibration error, the false-positive rate per bogus
kind and the recall as a function of injected S/N (the efficiency curve).
"""

from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.ml.data import BOGUS_KINDS, CandidateDataset
from pipeline.ml.metrics import binary_nll, roc_auc

__all__ = [
    "Evaluation",
    "evaluate",
    "expected_calibration_error",
    "recall_by_snr",
    "threshold_at_fnr",
]

#: Injected S/N bins of the efficiency curve.
SNR_BINS = (3.0, 5.0, 7.0, 10.0, 15.0, 30.0, np.inf)


@dataclass(frozen=True)
class Evaluation:
    """Figures of one model on one test set (all rates are fractions)."""

    n_real: int
    n_bogus: int
    auc: float
    nll: float
    ece: float
    threshold: float
    fnr: float
    fpr: float
    fpr_by_kind: dict[str, float]
    recall_by_snr: dict[str, float]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat numeric metrics (for tracking: ``fpr_kind_cosmic_ray``, ``recall_snr_5-7``...)."""
        names = ("auc", "nll", "ece", "threshold", "fnr", "fpr")
        flat = {k: float(getattr(self, k)) for k in names}
        flat.update({f"fpr_kind_{k}": v for k, v in self.fpr_by_kind.items() if np.isfinite(v)})
        flat.update({f"recall_snr_{k}": v for k, v in self.recall_by_snr.items() if np.isfinite(v)})
        return flat


def threshold_at_fnr(probabilities: np.ndarray, labels: np.ndarray, fnr: float) -> float:
    """The highest threshold that misses at most ``fnr`` of the real candidates."""
    if not 0.0 <= fnr < 1.0:
        raise ValueError(f"fnr must be in [0, 1), got {fnr}")
    real = np.sort(np.asarray(probabilities, dtype=float)[np.asarray(labels).astype(bool)])
    if real.size == 0:
        raise ValueError("no real candidates to set a threshold on")
    allowed = int(np.floor(fnr * real.size))  # real candidates we may lose
    return float(real[allowed])


def expected_calibration_error(
    probabilities: np.ndarray, labels: np.ndarray, bins: int = 10
) -> float:
    """Mean |observed fraction real − mean probability| over equal-width bins, weighted."""
    p = np.asarray(probabilities, dtype=float)
    y = np.asarray(labels).astype(float)
    which = np.minimum((p * bins).astype(int), bins - 1)
    error = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            error += inside.mean() * abs(y[inside].mean() - p[inside].mean())
    return float(error)


def recall_by_snr(
    probabilities: np.ndarray,
    injected_snr: np.ndarray,
    labels: np.ndarray,
    threshold: float,
    bins: tuple[float, ...] = SNR_BINS,
) -> dict[str, float]:
    """Fraction of detected real candidates kept at ``threshold``, per injected-S/N bin."""
    p = np.asarray(probabilities, dtype=float)
    snr = np.asarray(injected_snr, dtype=float)
    real = np.asarray(labels).astype(bool)
    out = {}
    for lo, hi in itertools.pairwise(bins):
        inside = real & (snr >= lo) & (snr < hi)
        label = f"{lo:g}-{hi:g}" if np.isfinite(hi) else f">={lo:g}"
        out[label] = float(np.mean(p[inside] >= threshold)) if inside.any() else float("nan")
    return out


def evaluate(probabilities: np.ndarray, data: CandidateDataset, fnr: float = 0.02) -> Evaluation:
    """All figures of a model's probabilities on ``data`` at a miss rate of ``fnr``."""
    p = np.asarray(probabilities, dtype=float)
    if p.shape != data.label.shape:
        raise ValueError(f"{p.size} probabilities for {len(data)} candidates")
    real = data.label.astype(bool)
    threshold = threshold_at_fnr(p, real, fnr)
    called = p >= threshold
    kinds = data.kind
    by_kind = {
        k: float(np.mean(called[kinds == k])) if np.any(kinds == k) else float("nan")
        for k in BOGUS_KINDS
    }
    return Evaluation(
        n_real=int(real.sum()),
        n_bogus=int((~real).sum()),
        auc=roc_auc(p, real),
        nll=binary_nll(p, real),
        ece=expected_calibration_error(p, real),
        threshold=threshold,
        fnr=float(np.mean(~called[real])),
        fpr=float(np.mean(called[~real])),
        fpr_by_kind=by_kind,
        recall_by_snr=recall_by_snr(p, data.injected_snr, real, threshold),
    )
