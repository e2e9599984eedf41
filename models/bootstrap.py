"""Paired bootstrap intervals for a difference in test AUC, over test rows and seeds.

Two models scored on the same test rows, each trained once per seed with the same seeds: a
replicate draws the test rows with replacement and the seeds with replacement, the same draws
for both models, and takes the difference of their AUC on the drawn rows averaged over the drawn
seeds. The 2.5th and 97.5th percentiles of the replicates bound a 95% interval, which carries
both sources of noise a comparison has: which rows happen to be in the test part, and which
seeds. A difference is claimed only where its interval excludes zero.

Every model compared under one ``PairedBootstrap`` meets the same draws, so a report computes
each model's replicates once (``auc_replicates``) and compares any two of them (``interval``).
Row draws are made in blocks from generators keyed by (seed, block), so they take
``block x rows`` memory at a time, and are the same however often they are made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .evaluation_metrics import roc_auc


@dataclass(frozen=True)
class Interval:
    """A difference ``a - b`` in mean AUC and its 95% paired bootstrap interval."""

    difference: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}

    def text(self, digits: int = 4) -> str:
        """``-0.0158 [-0.0190, -0.0121]``, with ≈ when the interval holds zero."""
        shown = (f"{self.difference:+.{digits}f} [{self.low:+.{digits}f}, "
                 f"{self.high:+.{digits}f}]")
        return shown if self.excludes_zero else shown + " ≈"


class PairedBootstrap:
    """The draws shared by every model compared on ``labels`` with ``seeds`` seeds each."""

    def __init__(self, labels: np.ndarray, seeds: int, replicates: int = 1000, seed: int = 0,
                 block: int = 50) -> None:
        self.labels = np.asarray(labels, dtype=np.float64) > 0.5
        if not self.labels.any() or self.labels.all():
            raise ValueError("a paired AUC bootstrap needs positive and negative test rows")
        if seeds < 1 or replicates < 1:
            raise ValueError(f"need at least one seed and one replicate, got {seeds}, "
                             f"{replicates}")
        self.seeds = seeds
        self.replicates = replicates
        self.seed = seed
        self.block = block
        #: Which seeds each replicate averages over: [replicates, seeds], with replacement.
        self.seed_draws = np.random.default_rng([seed, 0]).integers(0, seeds,
                                                                     (replicates, seeds))

    def auc_replicates(self, predictions: np.ndarray) -> np.ndarray:
        """A model's mean AUC over the drawn seeds on the drawn rows, per replicate.

        ``predictions``: [seeds, rows], one row of scores per seed, in the seeds' order.
        """
        predictions = np.asarray(predictions, dtype=np.float64)
        if predictions.shape != (self.seeds, len(self.labels)):
            raise ValueError(f"predictions must be [{self.seeds}, {len(self.labels)}] (seeds, "
                             f"rows), got {list(predictions.shape)}")
        per_seed = np.stack([self._resampled_auc(scores) for scores in predictions])
        return per_seed[self.seed_draws, np.arange(self.replicates)[:, None]].mean(axis=1)

    def interval(self, a: np.ndarray, b: np.ndarray, a_replicates: np.ndarray | None = None,
                 b_replicates: np.ndarray | None = None) -> Interval:
        """``a - b`` (each [seeds, rows]); pass their ``auc_replicates`` where already made."""
        a_replicates = self.auc_replicates(a) if a_replicates is None else a_replicates
        b_replicates = self.auc_replicates(b) if b_replicates is None else b_replicates
        difference = float(np.mean([roc_auc(self.labels, scores) for scores in a])
                           - np.mean([roc_auc(self.labels, scores) for scores in b]))
        low, high = np.percentile(a_replicates - b_replicates, [2.5, 97.5])
        return Interval(difference, float(low), float(high))

    def _resampled_auc(self, scores: np.ndarray) -> np.ndarray:
        """AUC of ``scores`` on each replicate's draw of the rows (ties count one half)."""
        n = len(scores)
        order = np.argsort(scores, kind="mergesort")
        ordered = scores[order]
        positive = self.labels[order]
        # Runs of equal scores: a positive beats the negatives below its run, half of its own.
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
        aucs = []
        for index, first in enumerate(range(0, self.replicates, self.block)):
            size = min(self.block, self.replicates - first)
            rng = np.random.default_rng([self.seed, 1, index])
            draws = rng.integers(0, n, (size, n)) + np.arange(size)[:, None] * n
            counts = np.bincount(draws.ravel(), minlength=size * n).reshape(size, n)
            weights = counts[:, order].astype(np.float64)
            positives = np.add.reduceat(weights * positive, starts, axis=1)
            negatives = np.add.reduceat(weights * ~positive, starts, axis=1)
            below = np.cumsum(negatives, axis=1) - negatives
            wins = (positives * (below + negatives / 2)).sum(axis=1)
            aucs.append(wins / (positives.sum(axis=1) * negatives.sum(axis=1)))
        return np.concatenate(aucs)
