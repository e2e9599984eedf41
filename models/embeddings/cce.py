"""Clustered compositional embeddings (CCE; Tsang and Ahle, "Clustering the Sketch: Dynamic
Compression for Embedding Tables", arXiv 2210.05974).

An id's vector is cut into ``c`` chunks of ``dim / c`` values, and chunk ``i`` is the sum of two
rows of ``k``-row tables:

- part 0, ``weight0[pointers[id, i]]``: a *learned pointer* per id and chunk, drawn at random
  when the table is built and then set by clustering;
- part 1, ``weight1[h_i(id)]``: a hash of the id, the universal hash of ROBE
  (``robe.block_hashes``: a dot product of the id's base-2**21 digits with coefficients drawn
  per chunk, mod ``PRIME``, exact in int64 for every id), then ``mod k``.

Row ``r`` of chunk ``i`` lies at index ``r * c + i`` of ``weight0`` and ``weight1`` (fp32
``[k * c, dim / c]``), so each part is one gather. Part 0 starts at the scale of a full table's
row (``INIT_STD``) and part 1 at zero: an id's vector then starts at a full row's scale, and the
hashed part learns a correction (a random part 1 would only add noise shared by the ids hashed
together, and raise the starting scale by sqrt(2)).

Re-clustering (``step_done``, which the trainer calls after every optimizer step): every
``recluster_every`` steps, at most ``reclusters`` times, each chunk is clustered anew. K-means
(Lloyd, ``LLOYD_ITERATIONS``) runs over the current chunk vectors (part 0 + part 1) of a sample
of the ids (``SAMPLES_PER_ROW`` per row, as the reference implementation does; all ids when
there are fewer), starting from ``k`` of them chosen by k-means++; an empty cluster keeps its
centroid. Then every id, in batches, takes its nearest centroid as its pointer, the centroids
become ``weight0``'s rows, the hash is redrawn (new coefficients), and ``weight1``'s rows become
the mean residual (vector minus its centroid) of the ids now hashed to each row (zero where
none). So ids whose vectors training has pulled together share a row of part 0, and part 1
keeps, hashed, part of what the centroid misses. The optimizer's moments of the rewritten rows
are left as they are (the trainer owns them). A round costs about ``n * k * dim``
multiply-adds for the assignment of the ``n`` ids, plus ``samples * k * dim`` for k-means++ and
for each Lloyd iteration: it suits the high compressions CCE is meant for, and is slow for
tables of millions of rows kept only a few times smaller.

Everything a round does is determined by the weights, the seed, the table's column and the
round (the sample and the hash coefficients are drawn from those; sums are taken on the CPU,
whose ``index_add_`` adds in a fixed order), so the replicas of distributed training, which hold
identical weights, cluster identically.

Stored at inference, and counted (``cce_bytes``): ``pointers`` ``[n, c]`` in the narrowest
integer type that holds ``k - 1`` (uint8 up to 256 rows, uint16 up to 65,536, then int32: types
ONNX Runtime's CUDA ``Gather`` and ``Cast`` take); ``weight0`` and ``weight1``; and the hash
``coefficients`` int64 ``[c, 4]``. The pointers are per-id storage like a full table's rows,
only ``c`` narrow integers instead of ``dim`` floats: leaving them out would hide the part of
the bytes that grows with the vocabulary. ``k`` and ``c`` come from the shapes.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .base import Count, EmbeddingTable, sparse_table
from .constants import FLOAT32_BYTES, INT64_BYTES
from .robe import COEFFICIENTS, block_hashes
from .shared_memory import PRIME

#: K-means samples per row (cluster) of a chunk, at most all ids.
SAMPLES_PER_ROW = 256
#: Lloyd iterations per chunk and round.
LLOYD_ITERATIONS = 10
#: Distances computed at a time (ids x rows) when assigning ids to their nearest centroid.
_DISTANCE_BLOCK = 1 << 22
#: Ids whose vectors are read at a time when every id is assigned.
_ID_BATCH = 1 << 16
#: Pointer types, narrowest first, with how many rows each can address.
POINTER_TYPES = ((256, torch.uint8), (1 << 16, torch.uint16), (1 << 31, torch.int32))
_HASH_STREAM = 5
_POINTER_STREAM = 6
_SAMPLE_STREAM = 7


def pointer_type(rows: int) -> torch.dtype:
    """The narrowest integer type of ``POINTER_TYPES`` that holds every row index."""
    for limit, dtype in POINTER_TYPES:
        if rows <= limit:
            return dtype
    raise ValueError(f"CCE pointers address at most {POINTER_TYPES[-1][0]:,} rows, got {rows:,}")


def pointer_bytes(rows: Count) -> Count:
    """Bytes of one pointer into ``rows`` rows (``pointer_type``'s width: 1, 2 or 4); ``rows``
    may be an array (the budget search)."""
    return 1 + (rows > POINTER_TYPES[0][0]) + 2 * (rows > POINTER_TYPES[1][0])


def cce_bytes(num_embeddings: int, dim: int, rows: Count, chunks: int) -> Count:
    """Bytes of a CCE table: its pointers, both fp32 tables and the hash coefficients."""
    return (num_embeddings * chunks * pointer_bytes(rows) + 2 * rows * dim * FLOAT32_BYTES
            + chunks * COEFFICIENTS * INT64_BYTES)


def cce_coefficients(seed: int, column: int, round_: int, chunks: int) -> np.ndarray:
    """int64 ``[chunks, 4]``: ``(a0, a1, a2, c)`` per chunk of part 1's hash, for the table in
    ``column`` after ``round_`` re-clusterings."""
    rng = np.random.default_rng([seed, _HASH_STREAM, column, round_])
    return np.concatenate(
        [rng.integers(1, PRIME, size=(chunks, COEFFICIENTS - 1)),
         rng.integers(0, PRIME, size=(chunks, 1))],
        axis=1,
    ).astype(np.int64)


def nearest(vectors: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """int64 [m]: the index of each vector's nearest centroid (Euclidean), computed in blocks of
    ``_DISTANCE_BLOCK`` distances."""
    squared = (centroids * centroids).sum(dim=1)
    block = max(1, _DISTANCE_BLOCK // len(centroids))
    return torch.cat([
        # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every centroid.
        (squared - 2 * part @ centroids.T).argmin(dim=1)
        for part in vectors.split(block)
    ])


def seed_centroids(vectors: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """``count`` of the rows of ``vectors`` [m, w], chosen by k-means++: the first at random,
    each next one with a chance proportional to its squared distance to the nearest chosen so
    far, so clusters start spread over the data (and, where the vectors form fewer distinct
    points than ``count``, on each of them)."""
    vectors = vectors.astype(np.float64)
    chosen = [int(rng.integers(len(vectors)))]
    squared = ((vectors - vectors[chosen[0]]) ** 2).sum(axis=1)
    for _ in range(count - 1):
        total = squared.sum()
        pick = (int(rng.choice(len(vectors), p=squared / total)) if total > 0
                else int(rng.integers(len(vectors))))
        chosen.append(pick)
        squared = np.minimum(squared, ((vectors - vectors[pick]) ** 2).sum(axis=1))
    return vectors[chosen].astype(np.float32)


def cluster_means(vectors: torch.Tensor, labels: torch.Tensor, count: int,
                  empty: torch.Tensor) -> torch.Tensor:
    """The mean of the vectors of each label in ``[0, count)``, on the CPU (whose sums add in a
    fixed order); ``empty``'s row where a label has no vector."""
    labels = labels.cpu()
    sums = torch.zeros(count, vectors.shape[1]).index_add_(0, labels, vectors.cpu())
    sizes = torch.bincount(labels, minlength=count).unsqueeze(1)
    return torch.where(sizes > 0, sums / sizes.clamp(min=1), empty.cpu())


class CCETable(EmbeddingTable):
    """A CCE table of ``rows`` (k) rows per part, ``chunks`` (c) chunks per vector; ``seed`` and
    ``column`` draw its pointers, hashes and k-means samples; re-clustered every
    ``recluster_every`` optimizer steps, at most ``reclusters`` times."""

    scheme = "cce"
    pointers: torch.Tensor
    coefficients: torch.Tensor
    chunk_index: torch.Tensor

    def __init__(self, num_embeddings: int, dim: int, rows: int, chunks: int, seed: int,
                 column: int, recluster_every: int, reclusters: int) -> None:
        super().__init__(num_embeddings, dim)
        if chunks < 1 or dim % chunks:
            raise ValueError(f"CCE cuts each vector into chunks of equal width: dim {dim} is "
                             f"not a multiple of chunks {chunks}")
        if not 1 <= rows <= num_embeddings:
            raise ValueError(f"CCE needs 1 to {num_embeddings:,} rows, got {rows:,}")
        if recluster_every < 1 or reclusters < 0:
            raise ValueError(f"recluster_every must be positive and reclusters non-negative, "
                             f"got {recluster_every} and {reclusters}")
        self.rows = rows
        self.chunks = chunks
        self.seed = seed
        self.column = column
        self.recluster_every = recluster_every
        self.reclusters = reclusters
        self.steps = 0
        self.rounds = 0
        width = dim // chunks
        self.weight0 = sparse_table(rows * chunks, width)
        self.weight1 = sparse_table(rows * chunks, width)
        nn.init.zeros_(self.weight1.weight)
        pointers = np.random.default_rng([seed, _POINTER_STREAM, column]).integers(
            0, rows, size=(num_embeddings, chunks))
        self.register_buffer("pointers", torch.from_numpy(pointers).to(pointer_type(rows)))
        self.register_buffer(
            "coefficients", torch.from_numpy(cce_coefficients(seed, column, 0, chunks)))
        self.register_buffer("chunk_index", torch.arange(chunks), persistent=False)

    def hashed_rows(self, ids: torch.Tensor, coefficients: torch.Tensor) -> torch.Tensor:
        """int64 [N] -> [N, c]: part 1's row of each chunk, ``(h_i(id) mod PRIME) mod k``."""
        return torch.remainder(block_hashes(ids, coefficients), self.rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows0 = self.pointers[ids].long() * self.chunks + self.chunk_index
        rows1 = self.hashed_rows(ids, self.coefficients) * self.chunks + self.chunk_index
        return (self.weight0(rows0) + self.weight1(rows1)).flatten(1)

    def step_done(self) -> None:
        """Counts an optimizer step; re-clusters when the schedule says so."""
        self.steps += 1
        if self.rounds < self.reclusters and self.steps % self.recluster_every == 0:
            self.recluster()

    @torch.no_grad()
    def recluster(self) -> None:
        """One round of re-clustering, every chunk (see the module docstring)."""
        self.rounds += 1
        old = self.coefficients.clone()
        new = torch.from_numpy(
            cce_coefficients(self.seed, self.column, self.rounds, self.chunks)
        ).to(old.device)
        for chunk in range(self.chunks):
            self._recluster_chunk(chunk, old[chunk:chunk + 1], new[chunk:chunk + 1])
        self.coefficients.copy_(new)

    def _chunk_vectors(self, ids: torch.Tensor, chunk: int,
                       coefficients: torch.Tensor) -> torch.Tensor:
        """float32 [m, dim / c]: chunk ``chunk`` of the ids' vectors, part 1 hashed with
        ``coefficients`` ([1, 4])."""
        rows0 = self.pointers[ids, chunk].long() * self.chunks + chunk
        rows1 = self.hashed_rows(ids, coefficients)[:, 0] * self.chunks + chunk
        return self.weight0.weight[rows0] + self.weight1.weight[rows1]

    def _recluster_chunk(self, chunk: int, old: torch.Tensor, new: torch.Tensor) -> None:
        device = self.pointers.device
        rng = np.random.default_rng([self.seed, _SAMPLE_STREAM, self.column, self.rounds, chunk])
        samples = min(self.num_embeddings, SAMPLES_PER_ROW * self.rows)
        sample = torch.from_numpy(rng.choice(self.num_embeddings, samples, replace=False))
        sampled = self._chunk_vectors(sample.to(device), chunk, old)
        centroids = torch.from_numpy(
            seed_centroids(sampled.cpu().numpy(), self.rows, rng)).to(device)
        for _ in range(LLOYD_ITERATIONS):
            labels = nearest(sampled, centroids)
            centroids = cluster_means(sampled, labels, self.rows, centroids).to(device)
        pointers = torch.empty(self.num_embeddings, dtype=torch.int64, device=device)
        residual_sums = torch.zeros(self.rows, self.dim // self.chunks)
        hashed_counts = torch.zeros(self.rows, dtype=torch.int64)
        for ids in torch.arange(self.num_embeddings, device=device).split(_ID_BATCH):
            vectors = self._chunk_vectors(ids, chunk, old)
            pointers[ids] = nearest(vectors, centroids)
            rows = self.hashed_rows(ids, new)[:, 0].cpu()
            residual_sums.index_add_(0, rows, (vectors - centroids[pointers[ids]]).cpu())
            hashed_counts += torch.bincount(rows, minlength=self.rows)
        residuals = residual_sums / hashed_counts.clamp(min=1).unsqueeze(1)
        self.pointers[:, chunk] = pointers.to(self.pointers.dtype)
        self.weight0.weight[chunk::self.chunks] = centroids
        self.weight1.weight[chunk::self.chunks] = residuals.to(device)

    def settings(self) -> dict:
        return {"rows": self.rows, "chunks": self.chunks, "seed": self.seed,
                "column": self.column, "recluster_every": self.recluster_every,
                "reclusters": self.reclusters}

    def parameter_count(self) -> int:
        return 2 * self.rows * self.dim

    def inference_bytes(self) -> int:
        return cce_bytes(self.num_embeddings, self.dim, self.rows, self.chunks)

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "pointers": self.pointers,
            "weight0": self.weight0.weight.detach(),
            "weight1": self.weight1.weight.detach(),
            "coefficients": self.coefficients,
        }
