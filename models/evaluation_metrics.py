"""Offline CTR metrics over a whole split (never averaged per batch)."""

from __future__ import annotations

import numpy as np

_EPS = 1e-7


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve via the rank-sum statistic, ties given average ranks."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = float(labels.sum())
    negatives = float(len(labels) - positives)
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # Average rank (1-based) for each run of equal scores.
    run_starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
    run_ends = np.r_[run_starts[1:], len(scores)]
    average_rank = (run_starts + run_ends + 1) / 2.0
    ranks = np.empty(len(scores), dtype=np.float64)
    ranks[order] = np.repeat(average_rank, run_ends - run_starts)
    rank_sum = float(ranks[labels > 0.5].sum())
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def log_loss(labels: np.ndarray, probabilities: np.ndarray) -> float:
    labels = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), _EPS, 1 - _EPS)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p)))


def normalized_entropy(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Log loss over the entropy of the observed CTR (He et al., 2014); below 1 beats a constant.
    NaN when the labels are all one class: that entropy is 0."""
    ctr = float(np.mean(labels))
    if ctr in (0.0, 1.0):
        return float("nan")
    background = -(ctr * np.log(ctr) + (1 - ctr) * np.log(1 - ctr))
    return log_loss(labels, probabilities) / background


def calibration(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean prediction over observed CTR; 1.0 is perfectly calibrated on average."""
    observed = float(np.mean(labels))
    return float(np.mean(probabilities)) / observed if observed > 0 else float("nan")


def undefined_because(labels: np.ndarray) -> str | None:
    """Why AUC, NE (and without positives calibration) are undefined on ``labels``; None when
    both classes are there."""
    positives = int(np.count_nonzero(np.asarray(labels) > 0.5))
    if positives == 0:
        return "no positive labels"
    if positives == len(labels):
        return "no negative labels"
    return None


def summary(labels: np.ndarray, probabilities: np.ndarray) -> dict:
    """The metrics of one split: NaN for a metric the labels leave undefined, and ``undefined``
    saying why (None when every metric is defined)."""
    return {
        "rows": len(labels),
        "auc": roc_auc(labels, probabilities),
        "logloss": log_loss(labels, probabilities),
        "ne": normalized_entropy(labels, probabilities),
        "calibration": calibration(labels, probabilities),
        "ctr": float(np.mean(labels)),
        "undefined": undefined_because(labels),
    }
