"""The uncompressed baseline: one fp32 row per id."""

from __future__ import annotations

import torch

from .base import EmbeddingTable, fp32_bytes, sparse_table


class FullTable(EmbeddingTable):
    scheme = "full"

    def __init__(self, num_embeddings: int, dim: int) -> None:
        super().__init__(num_embeddings, dim)
        self.table = sparse_table(num_embeddings, dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)

    def settings(self) -> dict:
        return {}

    def parameter_count(self) -> int:
        return self.num_embeddings * self.dim

    def inference_bytes(self) -> int:
        return fp32_bytes(self.num_embeddings, self.dim)

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.table.weight.detach()}
