"""The hashing trick: ``id mod buckets`` picks the row, so distinct ids collide."""

from __future__ import annotations

import math

import torch

from .base import Count, EmbeddingTable, sparse_table
from .constants import FLOAT32_BYTES, INT64_BYTES


def hash_buckets(rows: int, compression: float) -> int:
    """Buckets of a table of ``rows`` rows hashed ``compression`` times smaller."""
    return min(math.ceil(rows / compression), rows)


def hashed_bytes(buckets: Count, dim: int) -> Count:
    """Bytes of a hashed table: the fp32 buckets and their int64 count. ``buckets`` may be an
    array (the budget search evaluates many at once)."""
    return buckets * dim * FLOAT32_BYTES + INT64_BYTES


class HashedTable(EmbeddingTable):
    scheme = "hash"

    def __init__(self, num_embeddings: int, dim: int, buckets: int) -> None:
        super().__init__(num_embeddings, dim)
        if buckets < 1:
            raise ValueError(f"hashing needs at least one bucket, got {buckets}")
        self.buckets = min(buckets, num_embeddings)
        self.table = sparse_table(self.buckets, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(torch.remainder(ids, self.buckets))

    def settings(self) -> dict:
        return {"buckets": self.buckets}

    def parameter_count(self) -> int:
        return self.buckets * self.dim

    def inference_bytes(self) -> int:
        return hashed_bytes(self.buckets, self.dim)

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.table.weight.detach(),
            "buckets": torch.tensor([self.buckets], dtype=torch.int64),
        }
