"""Compositional embeddings from complementary partitions (Shi et al., KDD 2020).

An id is written in a mixed radix ``(m_1, ..., m_k)``: digit ``j`` is
``(id // (m_1 * ... * m_{j-1})) mod m_j``. Each digit picks a row of its own small table and the
rows are combined by ``mult`` (elementwise product), ``add`` or ``concat``. When
``m_1 * ... * m_k >= num_embeddings`` the digit tuples of distinct ids differ (the partitions are
complementary), so every id keeps a unique vector while the tables hold ``sum(m_j)`` rows instead
of ``num_embeddings``. The quotient-remainder trick is ``k = 2`` with radices
``(collisions, ceil(n / collisions))``: remainder ``id mod c``, quotient ``id // c``.

Digits use integer ``//`` and ``%`` on int64, exact for every id below 2**63 (the reference
implementation divides in floating point and picks wrong rows past 2**24).

Initialisation gives the combined vector the scale of a plain table (``INIT_STD``): for ``mult``
the largest table starts at that scale and the others at exactly one, so the product starts as an
ordinary table instead of the product of two tiny numbers; for ``add`` each part has variance
``INIT_STD**2 / k``; for ``concat`` each part has ``INIT_STD``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from .base import Count, EmbeddingTable, sparse_table
from .constants import FLOAT32_BYTES, INIT_STD, INT64_BYTES

OPERATIONS: tuple[str, ...] = ("mult", "add", "concat")


def quotient_remainder_radices(num_embeddings: int, collisions: int) -> tuple[int, int]:
    if collisions < 1:
        raise ValueError(f"collisions must be at least 1, got {collisions}")
    return collisions, math.ceil(num_embeddings / collisions)


def balanced_radices(num_embeddings: int, partitions: int) -> tuple[int, ...]:
    """``partitions`` radices of nearly equal size whose product covers ``num_embeddings``."""
    if partitions < 2:
        raise ValueError(f"complementary partitions need k >= 2, got {partitions}")
    radices: list[int] = []
    remaining = num_embeddings
    for left in range(partitions, 0, -1):
        radix = max(1, math.ceil(remaining ** (1.0 / left) - 1e-9))
        radices.append(radix)
        remaining = math.ceil(remaining / radix)
    return tuple(radices)


def digits(ids: torch.Tensor, radices: tuple[int, ...]) -> list[torch.Tensor]:
    """Mixed-radix digits of ``ids`` (int64), least significant first."""
    out = []
    place = 1
    for radix in radices:
        out.append(torch.remainder(ids // place, radix))
        place *= radix
    return out


def part_widths(dim: int, partitions: int, operation: str) -> list[int]:
    if operation != "concat":
        return [dim] * partitions
    if dim < partitions:
        raise ValueError(f"concat of {partitions} parts needs dim >= {partitions}, got {dim}")
    return [dim // partitions + (1 if j < dim % partitions else 0) for j in range(partitions)]


def compositional_bytes(radices: Sequence[Count], dim: int, operation: str) -> Count:
    """Bytes of a compositional table: each part's fp32 rows and the int64 radices. The radices
    may be arrays (the budget search evaluates many settings at once)."""
    widths = part_widths(dim, len(radices), operation)
    rows = [radix * width for radix, width in zip(radices, widths, strict=True)]
    return sum(rows[1:], start=rows[0]) * FLOAT32_BYTES + len(radices) * INT64_BYTES


class CompositionalTable(EmbeddingTable):
    """Reported as scheme ``qr`` with two partitions and ``kpart`` with more."""

    def __init__(
        self, num_embeddings: int, dim: int, radices: tuple[int, ...], operation: str
    ) -> None:
        super().__init__(num_embeddings, dim)
        if operation not in OPERATIONS:
            raise ValueError(f"operation must be one of {', '.join(OPERATIONS)}, got {operation!r}")
        if math.prod(radices) < num_embeddings:
            raise ValueError(
                f"radices {radices} cover {math.prod(radices)} ids, fewer than {num_embeddings}: "
                "the partitions would not be complementary"
            )
        self.radices = tuple(int(r) for r in radices)
        self.scheme = "qr" if len(radices) == 2 else "kpart"
        self.operation = operation
        widths = part_widths(dim, len(radices), operation)
        largest = max(range(len(radices)), key=lambda j: radices[j])
        self.tables = nn.ModuleList()
        for j, (radix, width) in enumerate(zip(self.radices, widths, strict=True)):
            if operation == "mult":
                table = sparse_table(radix, width, INIT_STD)
                if j != largest:
                    nn.init.ones_(table.weight)
            elif operation == "add":
                table = sparse_table(radix, width, INIT_STD / math.sqrt(len(radices)))
            else:
                table = sparse_table(radix, width, INIT_STD)
            self.tables.append(table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        parts = [table(d) for table, d in zip(self.tables, digits(ids, self.radices), strict=True)]
        if self.operation == "concat":
            return torch.cat(parts, dim=-1)
        combined = parts[0]
        for part in parts[1:]:
            combined = combined * part if self.operation == "mult" else combined + part
        return combined

    def settings(self) -> dict:
        return {"radices": list(self.radices), "operation": self.operation}

    def weights(self) -> list[torch.Tensor]:
        """The parts' weights, in radix order."""
        return [table.weight for table in cast(list[nn.Embedding], list(self.tables))]

    def parameter_count(self) -> int:
        return sum(weight.numel() for weight in self.weights())

    def inference_bytes(self) -> int:
        return compositional_bytes(self.radices, self.dim, self.operation)

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"weight{j}": weight.detach() for j, weight in enumerate(self.weights())}
        tensors["radices"] = torch.tensor(self.radices, dtype=torch.int64)
        return tensors
