"""The interface every embedding scheme implements.

A scheme maps ids in ``[0, num_embeddings)`` to ``dim``-wide vectors. Besides ``forward`` it
reports what a table costs at inference, honestly: ``inference_bytes`` is the scheme's own
closed-form count of everything serving must hold (weights, indices, masks, scales, hash
metadata), and ``inference_tensors`` returns those very tensors, so the two can be checked
against each other.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from .constants import FLOAT32_BYTES, INIT_STD

#: A count of rows or values, or an array of counts: the budget search evaluates a byte formula
#: for many settings at once.
Count = TypeVar("Count", int, np.ndarray)


def fp32_bytes(rows: int, dim: int) -> int:
    """Bytes of an uncompressed fp32 table: a full table's, and what every table stands in for."""
    return rows * dim * FLOAT32_BYTES


class EmbeddingTable(nn.Module, ABC):
    scheme: str = ""

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__()
        if num_embeddings < 1 or dim < 1:
            raise ValueError(f"a table needs rows and width, got {num_embeddings} x {dim}")
        self.num_embeddings = num_embeddings
        self.dim = dim

    @abstractmethod
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids: int64 [N] -> float32 [N, dim]."""

    @abstractmethod
    def settings(self) -> dict:
        """The scheme's own parameters (JSON-serialisable), enough to rebuild it."""

    @abstractmethod
    def parameter_count(self) -> int:
        """Values a paper would count: trainable (non-zero, where pruned) parameters."""

    @abstractmethod
    def inference_bytes(self) -> int:
        """Closed-form bytes serving needs for this table, metadata included."""

    @abstractmethod
    def inference_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors serving stores for this table, in their stored dtypes."""

    def full_bytes(self) -> int:
        """Bytes of the uncompressed fp32 table this one stands in for."""
        return fp32_bytes(self.num_embeddings, self.dim)

    def summary(self) -> dict:
        stored = self.inference_bytes()
        return {
            "scheme": self.scheme,
            "settings": self.settings(),
            "rows": self.num_embeddings,
            "dim": self.dim,
            "parameters": self.parameter_count(),
            "bytes": stored,
            "full_bytes": self.full_bytes(),
            "ratio": self.full_bytes() / stored,
        }


def sparse_table(rows: int, width: int, std: float = INIT_STD) -> nn.Embedding:
    """An embedding weight with sparse gradients (only touched rows are updated)."""
    table = nn.Embedding(rows, width, sparse=True)
    nn.init.normal_(table.weight, mean=0.0, std=std)
    return table
