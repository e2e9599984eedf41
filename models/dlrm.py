"""DLRM (Naumov et al., 2019) over per-table embedding schemes, and a logistic-regression baseline.

DLRM: a bottom MLP maps the dense features to a ``dim``-wide vector; the pairwise dot products of
that vector and every table's embedding, with the vector itself, feed a top MLP that gives one
logit. A model with no dense columns has no bottom MLP and no dense input; a learned constant
vector takes the bottom output's place, so its dot products with the embeddings still give every
table a first-order term.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import pairwise
from typing import cast

import torch
from torch import nn

from .embeddings.base import EmbeddingTable
from .embeddings.scheme_settings import EmbeddingConfig
from .schemes import TableData, build_tables, why_full

MODEL_KINDS = ("dlrm", "lr")


@dataclass(frozen=True)
class ModelConfig:
    kind: str = "dlrm"
    dim: int = 16
    #: Hidden widths of the bottom MLP; its output width is ``dim``.
    bottom: tuple[int, ...] = (512, 256, 64)
    #: Hidden widths of the top MLP; its output is one logit.
    top: tuple[int, ...] = (512, 256)
    embeddings: EmbeddingConfig = field(default_factory=EmbeddingConfig)

    def __post_init__(self) -> None:
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; choose one of {MODEL_KINDS}")

    @property
    def table_width(self) -> int:
        """Width of the embedding tables: ``dim``, or one weight per value for ``lr``."""
        return self.dim if self.kind == "dlrm" else 1

    def to_dict(self) -> dict:
        data = asdict(self)
        data["embeddings"] = self.embeddings.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        return cls(
            kind=data.get("kind", "dlrm"),
            dim=int(data.get("dim", 16)),
            bottom=tuple(data.get("bottom", (512, 256, 64))),
            top=tuple(data.get("top", (512, 256))),
            embeddings=EmbeddingConfig.from_dict(data.get("embeddings", {})),
        )


def mlp(widths: list[int], final_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for index, (n_in, n_out) in enumerate(pairwise(widths)):
        layers.append(nn.Linear(n_in, n_out))
        if final_activation or index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class CTRModel(nn.Module):
    """Shared shape of both model kinds: dense [N, n_dense] and ids [N, n_tables] -> logits [N]."""

    def __init__(self, n_dense: int, table_sizes: list[int], table_names: list[str],
                 config: ModelConfig, data: TableData | None = None) -> None:
        super().__init__()
        self.n_dense = n_dense
        self.table_names = list(table_names)
        self.config = config
        self.tables = nn.ModuleList(
            build_tables(self.table_names, list(table_sizes), config.table_width,
                         config.embeddings, data)
        )

    def embedding_tables(self) -> list[EmbeddingTable]:
        """``tables`` (a ``ModuleList``, so that it registers them) as the tables they are."""
        return cast(list[EmbeddingTable], list(self.tables))

    def embed(self, sparse: torch.Tensor) -> list[torch.Tensor]:
        return [table(sparse[:, index]) for index, table in enumerate(self.tables)]

    def forward(self, dense: torch.Tensor, sparse: torch.Tensor) -> torch.Tensor:
        return self.logits(dense, sparse, self.embed(sparse))

    def logits(self, dense: torch.Tensor, sparse: torch.Tensor,
               embedded: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def table_summaries(self) -> list[dict]:
        """Each table's summary, with ``full_because``: why a table configured with another
        scheme stays full ('' when it does not)."""
        return [
            {"table": name, **table.summary(), "full_because": why_full(
                self.config.embeddings.for_table(name), table.num_embeddings, table.dim)}
            for name, table in zip(self.table_names, self.embedding_tables(), strict=True)
        ]


class DLRM(CTRModel):
    pair_rows: torch.Tensor
    pair_cols: torch.Tensor

    def __init__(self, n_dense: int, table_sizes: list[int], table_names: list[str],
                 config: ModelConfig, data: TableData | None = None) -> None:
        super().__init__(n_dense, table_sizes, table_names, config, data)
        dim = config.dim
        if n_dense:
            self.bottom = mlp([n_dense, *config.bottom, dim], final_activation=True)
        else:
            self.constant = nn.Parameter(torch.randn(dim) * 0.01)
        n_vectors = len(table_sizes) + 1
        n_pairs = n_vectors * (n_vectors - 1) // 2
        self.top = mlp([dim + n_pairs, *config.top, 1], final_activation=False)
        upper = torch.triu_indices(n_vectors, n_vectors, offset=1)
        self.register_buffer("pair_rows", upper[0], persistent=False)
        self.register_buffer("pair_cols", upper[1], persistent=False)

    def logits(self, dense: torch.Tensor, sparse: torch.Tensor,
               embedded: list[torch.Tensor]) -> torch.Tensor:
        x = self.bottom(dense) if self.n_dense else self.constant.expand(sparse.shape[0], -1)
        vectors = torch.stack([x, *embedded], dim=1)
        dots = torch.bmm(vectors, vectors.transpose(1, 2))
        pairs = dots[:, self.pair_rows, self.pair_cols]
        return self.top(torch.cat([x, pairs], dim=1)).squeeze(1)


class LogisticRegression(CTRModel):
    """One weight per categorical value (a width-1 table per column), one per dense column."""

    def __init__(self, n_dense: int, table_sizes: list[int], table_names: list[str],
                 config: ModelConfig, data: TableData | None = None) -> None:
        super().__init__(n_dense, table_sizes, table_names, config, data)
        self.dense_weights = nn.Linear(n_dense, 1) if n_dense else None
        self.bias = nn.Parameter(torch.zeros(1))

    def logits(self, dense: torch.Tensor, sparse: torch.Tensor,
               embedded: list[torch.Tensor]) -> torch.Tensor:
        logit = torch.stack(embedded, dim=0).sum(dim=0).squeeze(1) + self.bias
        if self.dense_weights is not None:
            logit = logit + self.dense_weights(dense).squeeze(1)
        return logit


def build_model(n_dense: int, table_sizes: list[int], table_names: list[str],
                config: ModelConfig, data: TableData | None = None) -> CTRModel:
    """``data``: what some schemes build their tables from (see ``build_tables``)."""
    model_class = DLRM if config.kind == "dlrm" else LogisticRegression
    return model_class(n_dense, table_sizes, table_names, config, data)
