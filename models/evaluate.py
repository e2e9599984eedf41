"""Offline scoring of a checkpoint on one part of a data set (``ctrserve evaluate``), and two
models' test AUC compared over seeds with a paired bootstrap interval (``ctrserve compare``)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from . import evaluation_metrics
from .bootstrap import PairedBootstrap
from .checkpoint import load_checkpoint
from .data import DataConfig
from .evaluation_metrics import roc_auc
from .train import predict, transformed


def evaluate(checkpoint_dir: str | Path, data: DataConfig | None = None, part: str = "test",
             predictions_path: str | Path | None = None) -> dict:
    """Metrics of the checkpoint over the whole ``part`` (its own data set unless ``data``).

    ``data`` in csv or parquet without a spec of its own is read with the checkpoint's. With
    ``predictions_path`` the probabilities are also written, one per line, in row order.
    ``labeled`` says whether the data had labels; only then are the metrics there (None for a
    metric the labels leave undefined, with ``undefined`` saying why). ``by_unseen_fields``
    groups the rows by how many of their values training never saw (:func:`by_unseen_fields`).
    """
    scored = score(checkpoint_dir, data, part)
    if predictions_path is not None:
        np.savetxt(predictions_path, scored.probabilities, fmt="%.8f")
    result: dict = {"part": part, "rows": len(scored.probabilities),
                    "data": scored.data.to_dict(), "labeled": scored.labels is not None,
                    "predictions": str(predictions_path) if predictions_path else None}
    if scored.labels is not None:
        result.update(_defined(evaluation_metrics.summary(scored.labels, scored.probabilities)))
    result["by_unseen_fields"] = by_unseen_fields(scored.labels, scored.probabilities,
                                                  scored.unseen)
    return result


@dataclass(frozen=True)
class Scores:
    """A checkpoint's predictions on one part, in row order."""

    data: DataConfig
    #: None when the data has no labels.
    labels: np.ndarray | None
    probabilities: np.ndarray
    #: Per row, how many of its values training never saw.
    unseen: np.ndarray


def score(checkpoint_dir: str | Path, data: DataConfig | None = None,
          part: str = "test") -> Scores:
    """The checkpoint's predictions on ``part`` of ``data`` (default: its own data set)."""
    checkpoint = load_checkpoint(checkpoint_dir)
    data = data or DataConfig.from_dict(checkpoint.config["data"])
    if data.spec_path is None and data.column_spec is None and data.format in ("csv", "parquet"):
        data = replace(data, column_spec=checkpoint.transform.spec.to_dict())
    labels, probabilities, unseen = [], [], []
    for chunk in transformed(data, part, checkpoint.transform, 65536):
        chunk_labels, chunk_probabilities = predict(checkpoint.model, [chunk],
                                                    torch.device("cpu"))
        labels.append(chunk_labels)
        probabilities.append(chunk_probabilities)
        unseen.append(checkpoint.transform.unseen_counts(chunk.sparse))
    all_labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.float32)
    return Scores(
        data=data,
        labels=all_labels if len(all_labels) else None,
        probabilities=(np.concatenate(probabilities) if probabilities
                       else np.zeros(0, dtype=np.float32)),
        unseen=np.concatenate(unseen) if unseen else np.zeros(0, dtype=np.int64),
    )


def compare(checkpoints: list[str], against: list[str], part: str = "test",
            replicates: int = 1000) -> dict:
    """Test AUC of models trained with several seeds (``checkpoints``) against others
    (``against``, the same seeds in the same order), each on its own data's ``part``, which
    must be the same labelled rows: each side's mean AUC and their difference with its 95%
    paired bootstrap interval over rows and seeds (``bootstrap.py``)."""
    if len(checkpoints) != len(against) or not checkpoints:
        raise ValueError(f"compare pairs models seed by seed: got {len(checkpoints)} against "
                         f"{len(against)}")
    sides = [[score(path, part=part) for path in side] for side in (checkpoints, against)]
    labels = sides[0][0].labels
    if labels is None:
        raise ValueError(f"{checkpoints[0]}: the {part} part has no labels")
    for path, scored in zip([*checkpoints, *against], [*sides[0], *sides[1]], strict=True):
        if scored.labels is None or not np.array_equal(scored.labels, labels):
            raise ValueError(f"{path}: its {part} part is not the same labelled rows as "
                             f"{checkpoints[0]}'s")
    predictions = [np.stack([s.probabilities for s in side]) for side in sides]
    interval = PairedBootstrap(labels, len(checkpoints), replicates).interval(*predictions)
    return {"part": part, "rows": len(labels), "seeds": len(checkpoints),
            "auc": [float(np.mean([roc_auc(labels, p) for p in side])) for side in predictions],
            **interval.to_dict()}


def by_unseen_fields(labels: np.ndarray | None, probabilities: np.ndarray,
                     unseen: np.ndarray) -> list[dict]:
    """Rows grouped by their number of values unseen in training (``unseen[i]`` for row
    ``i``): each group's rows and mean prediction, and with labels its metrics. A model whose
    unknown-value rows never learned drifts off the base rate as that number grows."""
    groups = []
    for count in np.unique(unseen):
        rows = unseen == count
        group = {"unseen_fields": int(count), "rows": int(rows.sum()),
                 "mean_prediction": float(probabilities[rows].mean())}
        if labels is not None:
            group.update(_defined(evaluation_metrics.summary(labels[rows], probabilities[rows])))
        groups.append(group)
    return groups


def _defined(metrics: dict) -> dict:
    """An undefined metric (NaN) as None: JSON has no NaN."""
    return {name: None if isinstance(value, float) and math.isnan(value) else value
            for name, value in metrics.items()}
