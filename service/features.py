"""The rows of one request, as every request codec hands them to the data plane: raw columns by
name (the batcher transforms them, many requests at once) or the model's own tensors."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RawColumns:
    """Raw values by column name, ``rows`` per column (NaN / None / masked: missing)."""

    rows: int
    dense: dict[str, np.ndarray]
    categorical: dict[str, np.ndarray]

    def slice(self, start: int, stop: int) -> RawColumns:
        return RawColumns(stop - start,
                          {name: values[start:stop] for name, values in self.dense.items()},
                          {name: values[start:stop] for name, values in self.categorical.items()})


@dataclass
class ModelTensors:
    """The session's inputs: ``dense`` float32 [rows, n_dense], ``sparse`` int64 ids
    [rows, n_tables]."""

    rows: int
    dense: np.ndarray
    sparse: np.ndarray

    def slice(self, start: int, stop: int) -> ModelTensors:
        return ModelTensors(stop - start, self.dense[start:stop], self.sparse[start:stop])


Features = RawColumns | ModelTensors
