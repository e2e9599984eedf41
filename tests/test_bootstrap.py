"""The paired bootstrap over test rows and seeds: each replicate is the AUC of the drawn rows,
a model against itself differs by exactly zero, a clearly better model is told apart, and two
equally good ones are not."""

import numpy as np
import pytest

from ctrserve.models.bootstrap import Interval, PairedBootstrap
from ctrserve.models.evaluation_metrics import roc_auc


def scored(signal: float, rows: int = 3000, seeds: int = 3, seed: int = 0
           ) -> tuple[np.ndarray, np.ndarray]:
    """Labels and, per seed, scores that carry ``signal`` of the label plus noise."""
    rng = np.random.default_rng(seed)
    labels = (rng.random(rows) < 0.3).astype(np.float32)
    noise = rng.normal(size=(seeds, rows))
    return labels, signal * labels + noise


def test_each_replicate_is_the_auc_of_the_rows_it_drew():
    labels, scores = scored(1.0, rows=500, seeds=1)
    scores = np.round(scores, 1)  # ties, which count one half
    bootstrap = PairedBootstrap(labels, seeds=1, replicates=70, seed=7, block=25)
    replicates = bootstrap.auc_replicates(scores)
    for block in range(3):  # the draws of block k come from the generator keyed (7, 1, k)
        draws = np.random.default_rng([7, 1, block]).integers(0, 500, (25, 500))
        for row in range(0, 25 if block < 2 else 20, 6):
            rows = draws[row]
            assert replicates[25 * block + row] == pytest.approx(
                roc_auc(labels[rows], scores[0][rows]), abs=1e-12)


def test_a_model_against_itself_and_seed_draws():
    labels, scores = scored(1.0)
    bootstrap = PairedBootstrap(labels, seeds=3, replicates=200)
    same = bootstrap.interval(scores, scores)
    assert same == Interval(0.0, 0.0, 0.0) and not same.excludes_zero
    assert bootstrap.seed_draws.shape == (200, 3) and set(bootstrap.seed_draws.ravel()) == {0, 1, 2}


def test_a_clearly_better_model_is_told_apart_and_an_equal_one_is_not():
    labels, strong = scored(1.0)
    _, weak = scored(0.6, seed=0)
    # Another draw of the noise at the same signal: a model of the same quality.
    twin = 1.0 * labels + np.random.default_rng(5).normal(size=strong.shape)
    bootstrap = PairedBootstrap(labels, seeds=3, replicates=400)
    better = bootstrap.interval(strong, weak)
    mean_auc = [np.mean([roc_auc(labels, s) for s in side]) for side in (strong, weak)]
    assert better.difference == pytest.approx(mean_auc[0] - mean_auc[1])
    assert better.excludes_zero and better.low > 0
    assert better.low < better.difference < better.high
    equal = bootstrap.interval(strong, twin)
    assert not equal.excludes_zero
    assert equal.text().endswith(" ≈") and not better.text().endswith(" ≈")
    # Swapping the sides mirrors the interval.
    mirrored = bootstrap.interval(weak, strong)
    assert mirrored.difference == pytest.approx(-better.difference)
    assert mirrored.low == pytest.approx(-better.high) and mirrored.high == pytest.approx(
        -better.low)


def test_predictions_of_the_wrong_shape_and_one_class_labels_are_refused():
    labels, scores = scored(1.0)
    with pytest.raises(ValueError, match="seeds, rows"):
        PairedBootstrap(labels, seeds=2).auc_replicates(scores)
    with pytest.raises(ValueError, match="positive and negative"):
        PairedBootstrap(np.zeros(10), seeds=1)
