"""Classifier figures of merit, as pure numpy functions of scores and labels."""

from __future__ import annotations

import numpy as np

__all__ = ["binary_nll", "roc_auc", "roc_curve"]


def _check(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=float).ravel()
    labels = np.asarray(labels).ravel().astype(bool)
    if scores.shape != labels.shape:
        raise ValueError(f"{scores.size} scores for {labels.size} labels")
    if labels.all() or not labels.any():
        raise ValueError("both classes are needed (all labels are the same)")
    return scores, labels


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve (Mann-Whitney, ties counted half)."""
    scores, labels = _check(scores, labels)
    ranks = _average_ranks(scores)
    n_pos = labels.sum()
    n_neg = labels.size - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct threshold, highest first.

    Returns
    -------
    fpr, tpr, thresholds : 1D ndarrays
        A candidate is called real when its score is ``>= threshold``; the curve starts
        at (0, 0) with an infinite threshold.
    """
    scores, labels = _check(scores, labels)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    fp = (last + 1) - tp
    fpr = np.r_[0.0, fp / (~labels).sum()]
    tpr = np.r_[0.0, tp / labels.sum()]
    return fpr, tpr, np.r_[np.inf, s[last]]


def binary_nll(probabilities: np.ndarray, labels: np.ndarray, eps: float = 1e-7) -> float:
    """Mean negative log-likelihood of labels under predicted probabilities of "real"."""
    p = np.clip(np.asarray(probabilities, dtype=float).ravel(), eps, 1 - eps)
    y = np.asarray(labels).ravel().astype(bool)
    return float(-np.mean(np.where(y, np.log(p), np.log1p(-p))))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (``scipy.stats.rankdata``'s default).

    >>> _average_ranks(np.array([0.3, 0.1, 0.3, 0.2]))
    array([3.5, 1. , 3.5, 2. ])
    """
    order = np.argsort(values, kind="stable")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(values.size, dtype=float)
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks
