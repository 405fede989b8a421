"""Operating point, calibration, per-kind false positives and the efficiency curve."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ml.data import KINDS, CandidateDataset
from pipeline.ml.evaluate import evaluate, expected_calibration_error, threshold_at_fnr


def _dataset(kinds: list[str], injected: list[float]) -> CandidateDataset:
    n = len(kinds)
    code = np.array([KINDS.index(k) for k in kinds], dtype=np.int8)
    return CandidateDataset(
        triplets=np.zeros((n, 3, 4, 4), dtype=np.float32),
        label=(code == 0).astype(np.int8),
        kind_code=code,
        snr=np.ones(n, dtype=np.float32),
        injected_snr=np.array(injected, dtype=np.float32),
        image=np.full(n, "img", dtype="U8"),
        split=np.full(n, "test", dtype="U10"),
    )


def test_threshold_misses_at_most_the_allowed_fraction():
    p = np.linspace(0.01, 1.0, 100)
    labels = np.ones(100, dtype=bool)
    assert threshold_at_fnr(p, labels, 0.0) == pytest.approx(0.01)
    t = threshold_at_fnr(p, labels, 0.05)
    assert np.mean(p < t) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="fnr"):
        threshold_at_fnr(p, labels, 1.0)


def test_calibration_error_is_zero_when_frequencies_match():
    p = np.repeat([0.25, 0.75], 400)
    y = np.r_[np.arange(400) < 100, np.arange(400) < 300]
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(np.full(10, 0.9), np.zeros(10)) == pytest.approx(0.9)


def test_evaluate_counts_false_positives_per_kind_and_recall_per_snr():
    kinds = ["real"] * 4 + ["cosmic_ray", "cosmic_ray", "noise", "static_residual"]
    injected = [4.0, 6.0, 8.0, 20.0] + [np.nan] * 4
    data = _dataset(kinds, injected)
    p = np.array([0.3, 0.6, 0.9, 0.95, 0.7, 0.1, 0.2, 0.05])
    result = evaluate(p, data, fnr=0.25)  # may lose one of four real: threshold 0.6
    assert result.threshold == pytest.approx(0.6)
    assert result.fnr == pytest.approx(0.25) and result.fpr == pytest.approx(0.25)
    assert result.fpr_by_kind["cosmic_ray"] == pytest.approx(0.5)
    assert result.fpr_by_kind["noise"] == 0.0 and np.isnan(result.fpr_by_kind["bad_column"])
    assert result.recall_by_snr["3-5"] == 0.0 and result.recall_by_snr["5-7"] == 1.0
    assert result.recall_by_snr[">=30"] != result.recall_by_snr[">=30"]  # NaN: empty bin
    metrics = result.metrics()
    assert metrics["fpr_kind_cosmic_ray"] == 0.5 and "fpr_kind_bad_column" not in metrics
    with pytest.raises(ValueError, match="probabilities for"):
        evaluate(p[:3], data)
