"""Random offset block embeddings (ROBE-Z; Desai et al., MLSys 2022).

Coordinates come in blocks of ``Z``: block ``b = j // Z`` of id ``x`` in a table starts at a
hashed location ``L = h_{table, b}(x) mod |M|`` of the shared array ``M`` and its coordinates are
``M[(L + j mod Z) mod |M|]``, wrapping around the end of ``M``. There is no per-value metadata,
only the hash coefficients.

The hash is a universal (Carter-Wegman dot-product) hash over the field of integers mod
``PRIME = 2**31 - 1``: the id is split into 21-bit digits ``x = d0 + d1 2**21 + d2 2**42`` (which
covers every non-negative int64) and ``h(x) = (a0 d0 + a1 d1 + a2 d2 + c) mod PRIME``. Each
(table, block) pair has its own independently drawn ``(a0, a1, a2, c)``, so the table and the
block select the function: distinct (table, id, block) triples collide with probability about
``1 / |M|``, independently across blocks. (One function with the block as a further digit would
make collisions of a pair in one block imply collisions in the others, since the block's term
would shift both hashes alike.) Every product is below ``2**31 * 2**21 = 2**52``, so the sums are
exact in int64, and only ``+ * // %`` are used (ONNX Add/Mul/Div/Mod).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from .constants import FLOAT32_BYTES, INT64_BYTES
from .shared_memory import (
    PRIME,
    SharedMemory,
    SharedMemoryTable,
    max_compression,
    memory_size_for,
)

#: Ids are hashed as three digits in this base.
DIGIT_BASE = 2**21
#: Coefficients per (table, block): one per digit and the constant.
COEFFICIENTS = 4
_ROBE_STREAM = 3


def robe_coefficients(seed: int, slot: int, blocks: int) -> np.ndarray:
    """int64 ``[blocks, 4]``: ``(a0, a1, a2, c)`` per block for the table in ``slot``."""
    rng = np.random.default_rng([seed, _ROBE_STREAM, slot])
    return np.concatenate(
        [rng.integers(1, PRIME, size=(blocks, COEFFICIENTS - 1)),
         rng.integers(0, PRIME, size=(blocks, 1))],
        axis=1,
    ).astype(np.int64)


def id_digits(ids: torch.Tensor) -> torch.Tensor:
    """int64 [N] (non-negative) -> [N, 4]: the three base-2**21 digits and a 1 for the constant."""
    return torch.stack(
        [torch.remainder(ids, DIGIT_BASE),
         torch.remainder(ids // DIGIT_BASE, DIGIT_BASE),
         ids // (DIGIT_BASE * DIGIT_BASE),
         torch.ones_like(ids)],
        dim=1,
    )


def block_hashes(ids: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
    """int64 [N] -> [N, blocks] hashes in ``[0, PRIME)``."""
    return torch.remainder((id_digits(ids)[:, None, :] * coefficients).sum(dim=2), PRIME)


def robe_metadata_bytes(dim: int, block: int) -> int:
    """Hash coefficients plus the block size of one ROBE table."""
    return math.ceil(dim / block) * COEFFICIENTS * INT64_BYTES + INT64_BYTES


def robe_max_compression(table_sizes: Sequence[int], dim: int, block: int) -> float:
    """The highest compression ROBE tables of these sizes can reach (a one-value memory)."""
    full = sum(table_sizes) * dim * FLOAT32_BYTES
    return max_compression(full, len(table_sizes) * robe_metadata_bytes(dim, block))


def robe_memory_size(table_sizes: Sequence[int], dim: int, block: int,
                     compression: float) -> int:
    """``|M|`` for ROBE tables of these sizes sharing one memory, ``compression`` times smaller
    than the full tables in total, hash coefficients included."""
    full = sum(table_sizes) * dim * FLOAT32_BYTES
    metadata = len(table_sizes) * robe_metadata_bytes(dim, block)
    return memory_size_for(full, metadata, compression, "the ROBE hash coefficients")


def robe_bytes(table_sizes: Sequence[int], dim: int, block: int, compression: float) -> int:
    """Bytes of ROBE tables of these sizes sharing one memory: the memory, and each table's hash
    coefficients and block size (its ``inference_bytes`` hold its share of the memory)."""
    memory = robe_memory_size(table_sizes, dim, block, compression)
    return memory * FLOAT32_BYTES + len(table_sizes) * robe_metadata_bytes(dim, block)


class RobeTable(SharedMemoryTable):
    """A ROBE-Z table reading ``memory`` in blocks of ``block`` (Z) consecutive values."""

    scheme = "robe"
    coefficients: torch.Tensor
    block_of_coordinate: torch.Tensor
    offset_of_coordinate: torch.Tensor

    def __init__(self, num_embeddings: int, dim: int, memory: SharedMemory, block: int) -> None:
        if block < 1:
            raise ValueError(f"ROBE blocks need at least one value, got Z = {block}")
        super().__init__(num_embeddings, dim, memory)
        self.block = block
        blocks = math.ceil(dim / block)
        self.register_buffer(
            "coefficients", torch.from_numpy(robe_coefficients(memory.seed, self.slot, blocks))
        )
        coordinates = torch.arange(dim)
        self.register_buffer("block_of_coordinate", coordinates // block, persistent=False)
        self.register_buffer("offset_of_coordinate", coordinates % block, persistent=False)

    def locations(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N] -> int64 [N, dim] positions in ``M``."""
        starts = torch.remainder(block_hashes(ids, self.coefficients), self.memory.size)
        return torch.remainder(
            starts[:, self.block_of_coordinate] + self.offset_of_coordinate, self.memory.size
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.memory.gather(self.locations(ids))

    def settings(self) -> dict:
        return {"memory_size": self.memory.size, "block": self.block, "seed": self.memory.seed}

    def inference_bytes(self) -> int:
        return (self.parameter_count() * FLOAT32_BYTES
                + robe_metadata_bytes(self.dim, self.block))

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "memory": self.memory_share(),
            "coefficients": self.coefficients,
            "block": torch.tensor([self.block], dtype=torch.int64),
        }
