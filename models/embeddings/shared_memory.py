"""One fp32 memory array shared by several embedding tables, and the byte budget arithmetic.

The shared-memory schemes (``lma``, ``robe``) give no table rows of its own: every coordinate of
every embedding is one value ``M[location]`` of a flat array ``M`` that all tables of a model
using the scheme share, so the budget is ``|M|`` values whatever the tables' sizes.

``M`` is held by a ``SharedMemory`` module that every sharing table (a ``SharedMemoryTable``)
registers as a submodule: PyTorch deduplicates shared submodules in ``parameters()``,
``modules()`` and ``.to()``, so the array is trained and moved once. (``state_dict`` lists it
under each table; the entries are the same tensor, ``torch.save`` stores it once and loading
writes the same values into it.) ``M`` is an ``nn.Embedding(|M|, 1, sparse=True)``, so lookups
give sparse gradients, ``torch.optim.SparseAdam`` updates only touched values, and the trainer's
optimiser split picks it up like any sparse table.

Byte accounting: ``inference_bytes`` of each table must add up to the model's exact total, and
``inference_tensors`` of each table must hold exactly the bytes it claims. So ``M`` is split
into consecutive slices, one per table in the order the tables attached: table ``i`` is
attributed ``floor(|M| * full_i / sum(full))`` values, where ``full`` is the bytes of the
uncompressed fp32 table, and the first table also takes the integer remainder. A table reports
its slice (a view of ``M``) as its ``memory`` tensor; concatenated in attach order the slices are
``M``. The slices are an accounting device only: a table's lookups read all of ``M``.

Locations come from hashes mod the prime ``PRIME = 2**31 - 1`` and then mod ``|M|``, all in exact
int64 arithmetic (every product of a hash coefficient, below ``2**31``, and a hashed digit, below
``2**31``, stays below ``2**62``), with only integer ``+ * // %`` so that export can use ONNX's
Add/Mul/Div/Mod. ``|M|`` may be at most ``PRIME`` (8 GiB of fp32).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

from .base import EmbeddingTable, sparse_table
from .constants import FLOAT32_BYTES, INIT_STD

#: The modulus of every location hash: a prime below 2**31.
PRIME = 2**31 - 1


class SharedMemory(nn.Module):
    """The flat fp32 array ``M`` of ``size`` values, and the record of which tables share it.

    ``seed`` seeds the tables' location hashes. Values start at ``INIT_STD``, so an embedding
    (one value of ``M`` per coordinate) starts at the scale of a plain table's row.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        super().__init__()
        if not 1 <= size <= PRIME:
            raise ValueError(f"a shared memory needs 1 to {PRIME} values, got {size}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.size = size
        self.seed = seed
        self.values = sparse_table(size, 1, INIT_STD)
        self.claims: list[int] = []

    def attach(self, full_bytes: int) -> int:
        """Registers a table whose uncompressed size is ``full_bytes``; returns its slot."""
        self.claims.append(full_bytes)
        return len(self.claims) - 1

    def shares(self) -> list[int]:
        """Values of ``M`` attributed to each attached table, in slot order; they sum to |M|."""
        total = sum(self.claims)
        shares = [self.size * claim // total for claim in self.claims]
        shares[0] += self.size - sum(shares)
        return shares

    def span(self, slot: int) -> tuple[int, int]:
        """The ``[start, stop)`` range of ``M`` attributed to the table in ``slot``."""
        shares = self.shares()
        start = sum(shares[:slot])
        return start, start + shares[slot]

    def gather(self, locations: torch.Tensor) -> torch.Tensor:
        """int64 locations [N, D] in ``[0, |M|)`` -> float32 values [N, D]."""
        return self.values(locations).squeeze(-1)

    def weight(self) -> torch.Tensor:
        """``M`` as a flat fp32 tensor (detached)."""
        return self.values.weight.detach().view(-1)


class SharedMemoryTable(EmbeddingTable):
    """A table whose every value is one of ``memory``'s. It is attributed the slice of ``M`` in
    its slot, which it counts as its parameters and reports as its ``memory`` tensor."""

    def __init__(self, num_embeddings: int, dim: int, memory: SharedMemory) -> None:
        super().__init__(num_embeddings, dim)
        self.memory = memory
        self.slot = memory.attach(self.full_bytes())

    def parameter_count(self) -> int:
        start, stop = self.memory.span(self.slot)
        return stop - start

    def memory_share(self) -> torch.Tensor:
        """This table's slice of ``M`` (a view)."""
        start, stop = self.memory.span(self.slot)
        return self.memory.weight()[start:stop]


def max_compression(full_bytes: int, metadata_bytes: int) -> float:
    """The highest ratio ``full_bytes / stored`` reachable: metadata plus a one-value memory.

    A target ``compression`` is reachable exactly when it is at most this value.
    """
    return full_bytes / (metadata_bytes + FLOAT32_BYTES)


def memory_size_for(full_bytes: int, metadata_bytes: int, compression: float,
                    metadata: str) -> int:
    """The largest ``|M|`` with ``|M| * 4 + metadata_bytes <= full_bytes / compression``.

    The budget includes the metadata, so the stored total never exceeds it and falls short by
    less than one value. ``metadata`` names what the metadata is, for the error raised when it
    alone leaves no room for even one value.
    """
    if compression <= 0:
        raise ValueError(f"compression must be positive, got {compression}")
    budget = math.floor(Fraction(full_bytes) / Fraction(compression))
    size = (budget - metadata_bytes) // FLOAT32_BYTES
    if size < 1:
        raise ValueError(
            f"a {compression}x compression of {full_bytes:,} bytes leaves a budget of "
            f"{budget:,} bytes, but {metadata} alone take {metadata_bytes:,} bytes; "
            f"the most this configuration reaches is "
            f"{max_compression(full_bytes, metadata_bytes):.4g}x"
        )
    return size
