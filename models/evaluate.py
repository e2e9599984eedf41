"""Offline scoring of a checkpoint on one part of a data set."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from . import evaluation_metrics
from .checkpoint import load_checkpoint
from .data import DataConfig
from .train import predict, transformed


def evaluate(checkpoint_dir: str | Path, data: DataConfig | None = None, part: str = "test",
             predictions_path: str | Path | None = None) -> dict:
    """Metrics of the checkpoint over the whole ``part`` (its own data set unless ``data``).

    With ``predictions_path`` the probabilities are also written, one per line, in row order.
    ``labeled`` says whether the data had labels; only then are the metrics there (None for a
    metric the labels leave undefined, with ``undefined`` saying why).
    """
    checkpoint = load_checkpoint(checkpoint_dir)
    data = data or DataConfig.from_dict(checkpoint.config["data"])
    labels, probabilities = predict(
        checkpoint.model, transformed(data, part, checkpoint.transform, 65536),
        torch.device("cpu"),
    )
    if predictions_path is not None:
        np.savetxt(predictions_path, probabilities, fmt="%.8f")
    result: dict = {"part": part, "rows": len(probabilities), "data": data.to_dict(),
                    "labeled": len(labels) > 0,
                    "predictions": str(predictions_path) if predictions_path else None}
    if len(labels):
        # An undefined metric is None (JSON has no NaN).
        result.update({name: None if isinstance(value, float) and math.isnan(value) else value
                       for name, value in evaluation_metrics.summary(labels,
                                                                     probabilities).items()})
    return result
