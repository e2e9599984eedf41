"""LSH-based memory allocation (LMA; Desai et al., 2021, "Semantically Constrained Memory
Allocation for Embedding in Efficient Recommendation Systems").

Each categorical value is described by its co-occurrence set: the training rows, within a sample,
in which it occurs. Values whose sets overlap carry related information, so LMA lets them share
memory in proportion to their Jaccard similarity ``J``: a value's signature holds ``K`` minhashes
of its set (minhash ``k`` is the minimum of a seeded row hash ``h_k(r)`` over the rows ``r`` of
the set; two values have equal minhash ``k`` with probability ``J``), and coordinate ``j`` of its
embedding is ``M[((a_j * s + c_j) mod PRIME) mod |M|]`` with ``s`` its minhash ``j mod K``. So a
pair shares each coordinate with probability about ``J + (1 - J) / |M|``.

The location hash depends on the minhash value and the coordinate only, not on the table: one
feature's values never share a row (their sets are disjoint, ``J = 0``), so the semantic sharing
is between values of different features that occur together (an ad and its advertiser, say),
which therefore have to hash alike. Values whose sampled sets are equal get equal embeddings.
Within a table, values share memory only by chance, about ``1 / |M|`` per coordinate.

Signatures are inference metadata: int32 ``[n, K]`` (minhashes are 31-bit, ``[0, 2**31)``), for
all ``n`` ids of a table, since ids are dense after the vocabulary transform. An id absent from
the sample (the missing and out-of-vocabulary ids 0 and 1 included, when absent) gets a fallback
signature, a seeded hash of ``(column, id, k)``: deterministic, so any two builds agree. Serving
could recompute fallbacks instead of storing them, but storing every row keeps one lookup path,
and all of it is counted. A row's signature takes ``4 K`` bytes against ``4 D`` for a full fp32
row, so LMA can never compress more than ``D / K`` times (16x at ``D = 16, K = 1``), and less once
the memory is counted; ``lma_max_compression`` says what a configuration can reach.

The per-coordinate hash coefficients ``(a_j, c_j)`` (int64 ``[D, 2]``) come from the memory's seed
and are the same in every LMA table of a memory. Each table stores and counts its own copy
(``16 D`` bytes) so that its tensors are self-contained; storing them once would save
``16 D (T - 1)`` bytes for ``T`` tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from ..keys import seeded_hash
from .constants import FLOAT32_BYTES, INT64_BYTES
from .shared_memory import (
    PRIME,
    SharedMemory,
    SharedMemoryTable,
    max_compression,
    memory_size_for,
)

SIGNATURE_BYTES = 4
#: Distinguishes the hash streams derived from one seed.
_ROW_STREAM, _FALLBACK_STREAM, _COORDINATE_STREAM = 0, 1, 2
#: Above every 31-bit hash: marks ids not (yet) seen in the sample.
_UNSEEN = 2**31


def _stream_seed(*parts: int) -> int:
    """A 64-bit seed derived from non-negative integers (a chain of seeded hashes)."""
    state = 0
    for part in parts:
        state = int(seeded_hash(np.array([part], dtype=np.uint64), state)[0])
    return state


def _hash31(keys: np.ndarray, seed: int) -> np.ndarray:
    """The top 31 bits of a seeded 64-bit hash, as int64 in ``[0, 2**31)``."""
    return (seeded_hash(keys, seed) >> np.uint64(33)).astype(np.int64)


def fallback_signatures(column: int, ids: np.ndarray, minhashes: int, seed: int = 0) -> np.ndarray:
    """int32 ``[len(ids), minhashes]`` signatures for ids absent from the sample."""
    keys = np.asarray(ids, dtype=np.int64).astype(np.uint64)
    return np.stack(
        [_hash31(keys, _stream_seed(seed, _FALLBACK_STREAM, column, k)) for k in range(minhashes)],
        axis=1,
    ).astype(np.int32)


def _update_minima(minima: np.ndarray, ids: np.ndarray, row_hashes: np.ndarray,
                   column: int) -> None:
    """``minima[x] = min(minima[x], min of row_hashes over the rows where ids == x)``."""
    if not len(ids):
        return
    if ids.min() < 0 or ids.max() >= len(minima):
        raise ValueError(f"column {column}: ids must lie in [0, {len(minima)})")
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_ids[1:] != sorted_ids[:-1])))
    values = sorted_ids[starts]
    group_minima = np.minimum.reduceat(row_hashes[order], starts, axis=0)
    minima[values] = np.minimum(minima[values], group_minima)


def minhash_signatures(
    sparse_batches: Iterable[np.ndarray],
    table_sizes: Sequence[int],
    minhashes: int,
    sample_rows: int,
    seed: int = 0,
    columns: Sequence[int] | None = None,
) -> dict[int, np.ndarray]:
    """Signatures (int32 ``[table_sizes[c], minhashes]``) for each of ``columns`` (default all).

    ``sparse_batches``: int64 ids ``[N, n_tables]`` after the transform, e.g.
    ``(chunk.sparse for chunk in chunks)``. The sample is the first ``sample_rows`` rows, so the
    stream should be in random order; rows are numbered from 0 in stream order and the iteration
    stops once the sample is complete. Ids absent from the sample get ``fallback_signatures``.
    """
    if minhashes < 1:
        raise ValueError(f"LMA needs at least one minhash, got {minhashes}")
    if sample_rows < 0:
        raise ValueError(f"sample_rows must be non-negative, got {sample_rows}")
    columns = range(len(table_sizes)) if columns is None else columns
    minima = {c: np.full((table_sizes[c], minhashes), _UNSEEN, dtype=np.int64) for c in columns}
    row_seeds = [_stream_seed(seed, _ROW_STREAM, k) for k in range(minhashes)]
    first = 0
    for batch in sparse_batches:
        if first >= sample_rows:
            break
        sparse = np.asarray(batch)[: sample_rows - first]
        rows = np.arange(first, first + len(sparse), dtype=np.uint64)
        row_hashes = np.stack([_hash31(rows, s) for s in row_seeds], axis=1)
        for column, table_minima in minima.items():
            _update_minima(table_minima, sparse[:, column], row_hashes, column)
        first += len(sparse)
    signatures = {}
    for column, table_minima in minima.items():
        unseen = np.flatnonzero(table_minima[:, 0] == _UNSEEN)
        table_minima[unseen] = fallback_signatures(column, unseen, minhashes, seed)
        signatures[column] = table_minima.astype(np.int32)
    return signatures


def lma_coefficients(seed: int, dim: int) -> np.ndarray:
    """int64 ``[dim, 2]``: ``(a_j, c_j)`` of coordinate ``j``'s location hash, ``a_j >= 1``."""
    rng = np.random.default_rng([seed, _COORDINATE_STREAM])
    return np.stack(
        [rng.integers(1, PRIME, size=dim), rng.integers(0, PRIME, size=dim)], axis=1
    ).astype(np.int64)


def lma_metadata_bytes(num_embeddings: int, dim: int, minhashes: int) -> int:
    """Signatures plus hash coefficients of one LMA table."""
    return num_embeddings * minhashes * SIGNATURE_BYTES + dim * 2 * INT64_BYTES


def _full_and_metadata(table_sizes: Sequence[int], dim: int, minhashes: int) -> tuple[int, int]:
    full = sum(table_sizes) * dim * FLOAT32_BYTES
    return full, sum(lma_metadata_bytes(n, dim, minhashes) for n in table_sizes)


def lma_max_compression(table_sizes: Sequence[int], dim: int, minhashes: int) -> float:
    """The highest compression LMA tables of these sizes can reach (signatures bound it)."""
    return max_compression(*_full_and_metadata(table_sizes, dim, minhashes))


def lma_memory_size(table_sizes: Sequence[int], dim: int, minhashes: int,
                    compression: float) -> int:
    """``|M|`` for LMA tables of these sizes sharing one memory, ``compression`` times smaller
    than the full tables in total, signatures included; ValueError when out of reach."""
    full, metadata = _full_and_metadata(table_sizes, dim, minhashes)
    return memory_size_for(
        full, metadata, compression,
        f"the LMA signatures and hash coefficients ({minhashes} x {SIGNATURE_BYTES} bytes per "
        f"row against {dim * FLOAT32_BYTES} for a full row)",
    )


def lma_bytes(table_sizes: Sequence[int], dim: int, minhashes: int, compression: float) -> int:
    """Bytes of LMA tables of these sizes sharing one memory: the memory, and each table's
    signatures and hash coefficients (its ``inference_bytes`` hold its share of the memory)."""
    memory = lma_memory_size(table_sizes, dim, minhashes, compression)
    return (memory * FLOAT32_BYTES
            + sum(lma_metadata_bytes(rows, dim, minhashes) for rows in table_sizes))


class LMATable(SharedMemoryTable):
    """An LMA table reading ``memory``; ``signatures`` is int32 ``[num_embeddings, K]``.

    To rebuild a trained table, pass signatures of the right shape (e.g. ``fallback_signatures``)
    and load the state dict, which holds the real ones as a buffer.
    """

    scheme = "lma"
    signatures: torch.Tensor
    coefficients: torch.Tensor
    minhash_of_coordinate: torch.Tensor

    def __init__(self, num_embeddings: int, dim: int, memory: SharedMemory,
                 signatures: np.ndarray | torch.Tensor) -> None:
        signatures = torch.as_tensor(signatures)
        if (signatures.dtype != torch.int32 or signatures.ndim != 2
                or signatures.shape[0] != num_embeddings or signatures.shape[1] < 1):
            raise ValueError(
                f"signatures must be int32 [{num_embeddings}, K >= 1], got "
                f"{signatures.dtype} {list(signatures.shape)}"
            )
        if int(signatures.min()) < 0:
            raise ValueError("signatures must be non-negative 31-bit minhashes")
        super().__init__(num_embeddings, dim, memory)
        self.minhashes = int(signatures.shape[1])
        self.register_buffer("signatures", signatures.clone())
        self.register_buffer("coefficients", torch.from_numpy(lma_coefficients(memory.seed, dim)))
        self.register_buffer(
            "minhash_of_coordinate", torch.arange(dim) % self.minhashes, persistent=False
        )

    def locations(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 [N] -> int64 [N, dim] positions in ``M``."""
        minhash = self.signatures[ids].long()[:, self.minhash_of_coordinate]
        hashed = torch.remainder(minhash * self.coefficients[:, 0] + self.coefficients[:, 1], PRIME)
        return torch.remainder(hashed, self.memory.size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.memory.gather(self.locations(ids))

    def settings(self) -> dict:
        return {"memory_size": self.memory.size, "minhashes": self.minhashes,
                "seed": self.memory.seed}

    def inference_bytes(self) -> int:
        return (self.parameter_count() * FLOAT32_BYTES
                + lma_metadata_bytes(self.num_embeddings, self.dim, self.minhashes))

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "memory": self.memory_share(),
            "signatures": self.signatures,
            "coefficients": self.coefficients,
        }
