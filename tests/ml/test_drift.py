"""Score drift: the population stability index and its reading."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.ml.drift import check_drift, population_stability_index, score_histogram


def test_histogram_bins_scores_and_puts_one_in_the_last_bin() -> None:
    counts = score_histogram(np.array([0.0, 0.05, 0.1, 0.55, 0.99, 1.0, np.nan]))
    assert counts.tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    with pytest.raises(ValueError, match="probabilities"):
        score_histogram(np.array([0.5, 1.2]))


def test_psi_by_hand() -> None:
    # e = (0.5, 0.5), a = (0.8, 0.2): 0.3 ln 1.6 + (-0.3) ln 0.4
    expected = 0.3 * np.log(1.6) - 0.3 * np.log(0.4)
    assert population_stability_index([50, 50], [80, 20]) == pytest.approx(expected)
    assert population_stability_index([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="same bins"):
        population_stability_index([1, 2], [1, 2, 3])


def test_same_distribution_is_stable_and_a_shift_is_not() -> None:
    rng = np.random.default_rng(1)
    reference = score_histogram(rng.beta(0.5, 2.0, 20000))
    same = check_drift(reference, rng.beta(0.5, 2.0, 2000))
    shifted = check_drift(reference, rng.beta(2.0, 0.5, 2000))
    assert same.level == "stable" and same.psi < 0.02
    assert shifted.level == "shift" and shifted.psi > 1.0
    assert sum(same.histogram) == 2000 == same.n_scores
    few = check_drift(reference, rng.beta(0.5, 2.0, 5))
    assert few.level == "too few" and np.isfinite(few.psi)
