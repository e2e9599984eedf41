"""Frequency-aware hybrid tables: the most frequent ids keep rows of their own, the rest share a
quotient-remainder table.

CTR data is heavy-tailed: in a table of ``n`` ids a few hundred or thousand carry most of the
impressions. A hybrid table of ``m`` rows gives the ``H`` ids counted most often on the training
split (the head) each a full row, and the ``T = n - H`` others (the tail) a compositional
embedding in the remaining ``R = m - H`` rows: tail id number ``t`` (its place among the tail
ids) reads ``remainder[t mod c] * quotient[t // c]`` (the quotient-remainder trick, ``mult``;
``compositional.py``), every tail id a vector of its own, with the fewest collisions ``c`` for
which ``c`` remainder rows and ``ceil(T / c)`` quotient rows fit in ``R`` (``tail_collisions``;
the quotient table takes all ``R - c`` rows, so the bytes are exactly ``m`` rows). Compressing
alone would make the frequent ids share their factors with rare ones; here the rows go where
the impressions are. (A hashed tail, tried first, lost to plain QR on Frappe at 1/2 and 1/4 of
the bytes: the tail ids there are too many and too often seen to share whole rows.)

The head's id map, and what it costs
------------------------------------
Ids are vocabulary positions, not ranks by frequency, so serving must tell a head id from a tail
id and find its row. That map is stored and counted:

- ``head_bits`` uint8 ``[ceil(n / 8)]``: bit ``id % 8`` of byte ``id // 8`` is set for head ids;
- ``head_rank`` int32 ``[ceil(n / 64)]`` (int64 for tables of 2**31 ids or more): the number of
  head ids below ``64 b``, for each block ``b`` of 64 ids.

An id's rank (head ids below it) is its block's count plus the set bits before it in its block
(eight bytes unpacked, an exclusive prefix count). A head id's row is its rank; a tail id's
number is ``t = id - rank``, its place among the tail ids, so the tail ids are numbered densely
before they are split into quotient and remainder. The map costs ``n / 8 + n / 16`` bytes
(0.19 bytes an id), against ``4 D`` for one full row (64 bytes at ``D = 16``): 4.7% of a 1/16
budget at ``D = 16``. A sorted list of head ids would cost ``8 H`` bytes and a binary search
that ONNX has no op for; a per-id slot array would cost ``4 n`` bytes, the whole of a 1/16
budget at ``D = 16``.

The split between head and tail
-------------------------------
``fit_hybrid`` (``budget.py``) decides ``m`` per table from the byte budget. How many of the
``m`` rows go to the head is searched on the training counts (``head_rows``): the ``H`` that
minimises ``F_T * (c - 1)``, where ``F_T`` is the tail's share of the table's training
impressions and ``c`` the tail's collisions: the impression-weighted number of other ids an
id shares its quotient row with. Each head row takes a frequent id out of the tail but also a
row from it, raising ``c`` for the rest: the minimum balances the two for the table's own
frequency curve.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .base import Count, EmbeddingTable, sparse_table
from .constants import FLOAT32_BYTES, INT32_BYTES, index_bytes

#: Ids per block of ``head_rank``.
RANK_BLOCK = 64


#: The fewest rows a hybrid table has: a head row, a remainder row and a quotient row.
MIN_ROWS = 3


def hybrid_rows(rows: int, compression: float) -> int:
    """Rows (head and tail together) of a table of ``rows`` ids ``compression`` times smaller,
    but never fewer than ``fewest_rows``: a table made hybrid whatever its size (``min_rows``
    0) may then be less compressed than asked, or larger than its full table."""
    return max(min(math.ceil(rows / compression), rows), fewest_rows(rows))


def fewest_rows(rows: int) -> int:
    """The fewest rows a hybrid table of ``rows`` ids can have: a head row and the smallest
    tail, ``R`` rows holding at most ``floor(R / 2) * ceil(R / 2)`` tail ids (about
    ``2 sqrt(n)``)."""
    tail = max(2, math.ceil(2 * math.sqrt(max(rows - 1, 1))) - 2)
    while (tail // 2) * (tail - tail // 2) < rows - 1:
        tail += 1
    return max(1 + tail, MIN_ROWS)


def tail_collisions(tail_ids: int | np.ndarray, tail_rows: int | np.ndarray) -> np.ndarray:
    """The fewest collisions ``c`` with ``c + ceil(T / c) <= R`` (``T`` tail ids in ``R``
    rows), elementwise; 0 where none fits (``R**2 < 4 T``). ``c + ceil(T / c) <= R`` is
    ``T <= c (R - c)``: the smaller root of ``c**2 - R c + T``, rounded up, then checked."""
    tail_ids = np.asarray(tail_ids, dtype=np.int64)
    tail_rows = np.asarray(tail_rows, dtype=np.int64)
    discriminant = tail_rows.astype(np.float64) ** 2 - 4.0 * tail_ids
    root = np.sqrt(np.maximum(discriminant, 0.0))
    guess = np.maximum(np.ceil((tail_rows - root) / 2.0).astype(np.int64) - 1, 1)
    for _ in range(3):  # the float root is off by at most one either way
        short = guess * (tail_rows - guess) < tail_ids
        guess = np.where(short, guess + 1, guess)
    fits = (discriminant >= 0) & (guess * (tail_rows - guess) >= tail_ids) & (guess >= 1)
    return np.where(fits, guess, 0)


def hybrid_bytes(rows: int, stored_rows: Count, dim: int) -> Count:
    """Bytes of a hybrid table of ``rows`` ids and ``stored_rows`` head and tail rows: the fp32
    rows, the head bits and the block ranks. ``stored_rows`` may be an array (the budget search
    evaluates many at once)."""
    index = math.ceil(rows / 8) + math.ceil(rows / RANK_BLOCK) * index_bytes(rows)
    return stored_rows * dim * FLOAT32_BYTES + index


def head_rows(counts: np.ndarray, stored_rows: int) -> int:
    """How many of ``stored_rows`` rows go to the head, from the training ``counts`` of the
    table's ids (see the module docstring): at least 1, leaving the tail room for a
    quotient-remainder table."""
    rows = len(counts)
    heads = np.arange(1, stored_rows - 1)  # H = 1 .. m - 2
    collisions = tail_collisions(rows - heads, stored_rows - heads)
    if stored_rows < MIN_ROWS or not collisions.any():
        raise ValueError(f"{stored_rows} rows cannot hold a head and a quotient-remainder tail "
                         f"for {rows:,} ids")
    shares = np.sort(counts.astype(np.float64))[::-1] / max(float(counts.sum()), 1.0)
    tail_mass = np.maximum(1.0 - np.cumsum(shares)[heads - 1], 0.0)
    cost = np.where(collisions > 0, tail_mass * (collisions - 1), np.inf)
    return int(heads[np.argmin(cost)])


def most_frequent(counts: np.ndarray, head: int) -> np.ndarray:
    """The ``head`` ids counted most often, ties going to the smaller id; sorted."""
    order = np.argsort(-counts, kind="stable")
    return np.sort(order[:head])


def head_map(rows: int, head_ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``head_bits`` and ``head_rank`` (see the module docstring) for the ``head_ids``."""
    member = np.zeros(rows, dtype=bool)
    member[head_ids] = True
    bits = np.packbits(member, bitorder="little")
    below = np.concatenate([[0], np.cumsum(member)])[::RANK_BLOCK][:math.ceil(rows / RANK_BLOCK)]
    dtype = np.int32 if index_bytes(rows) == INT32_BYTES else np.int64
    return torch.from_numpy(bits), torch.from_numpy(below.astype(dtype))


def rank_and_membership(ids: torch.Tensor, bits: torch.Tensor,
                        block_ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 [N] -> (head ids below each id, whether each id is a head id). Read as the ONNX
    body reads it: the eight bytes of the id's block unpacked, an exclusive prefix count."""
    block = ids // RANK_BLOCK
    position = torch.remainder(ids, RANK_BLOCK)
    bytes_of_block = block[:, None] * 8 + torch.arange(8, device=ids.device)
    # The last block may be short: its missing bytes repeat the last one, past every id.
    gathered = bits[bytes_of_block.clamp(max=bits.numel() - 1)].to(torch.int64)
    places = 2 ** torch.arange(8, device=ids.device)
    flags = torch.remainder(gathered[:, :, None] // places, 2).reshape(len(ids), RANK_BLOCK)
    before = torch.cumsum(flags, dim=1) - flags
    below = before.gather(1, position[:, None])[:, 0]
    member = flags.gather(1, position[:, None])[:, 0].bool()
    return block_ranks[block].to(torch.int64) + below, member


class HybridTable(EmbeddingTable):
    """``head`` full rows for the head ids and a quotient-remainder table of ``tail_rows`` rows
    for the others (see the module docstring). Without ``head_ids`` (a checkpoint being
    rebuilt, whose state dict holds the map) the first ``head`` ids stand in."""

    scheme = "hybrid"
    head_bits: torch.Tensor
    head_rank: torch.Tensor

    def __init__(self, num_embeddings: int, dim: int, head: int, tail_rows: int,
                 head_ids: np.ndarray | None = None) -> None:
        super().__init__(num_embeddings, dim)
        collisions = int(tail_collisions(num_embeddings - head, tail_rows)) if head >= 1 else 0
        if collisions < 1:
            raise ValueError(f"a hybrid table of {num_embeddings:,} ids needs a head row and a "
                             f"quotient-remainder tail; {head} head and {tail_rows} tail rows "
                             "cannot hold them")
        if head_ids is None:
            head_ids = np.arange(head)
        if len(head_ids) != head:
            raise ValueError(f"{len(head_ids)} head ids for {head} head rows")
        self.head = sparse_table(head, dim)
        # As in ``CompositionalTable`` (mult): the larger part at the scale of a plain table,
        # the remainder at one, so a tail vector starts as an ordinary row.
        self.remainder = sparse_table(collisions, dim)
        nn.init.ones_(self.remainder.weight)
        self.quotient = sparse_table(tail_rows - collisions, dim)
        bits, ranks = head_map(num_embeddings, np.asarray(head_ids, dtype=np.int64))
        self.register_buffer("head_bits", bits)
        self.register_buffer("head_rank", ranks)

    @property
    def collisions(self) -> int:
        return self.remainder.num_embeddings

    def tail(self, numbers: torch.Tensor) -> torch.Tensor:
        """The vectors of tail ids numbered ``numbers`` (their places among the tail ids)."""
        quotient = torch.clamp(numbers // self.collisions, max=self.quotient.num_embeddings - 1)
        return self.remainder(torch.remainder(numbers, self.collisions)) * self.quotient(quotient)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rank, member = rank_and_membership(ids, self.head_bits, self.head_rank)
        heads = torch.nonzero(member)[:, 0]
        tails = torch.nonzero(~member)[:, 0]
        rows = torch.cat([self.head(rank[heads]), self.tail(ids[tails] - rank[tails])])
        # Each id reads only its own rows, so the rows of the other part get no update.
        return torch.empty_like(rows).index_copy(0, torch.cat([heads, tails]), rows)

    def head_ids(self) -> np.ndarray:
        """The head ids, sorted."""
        member = np.unpackbits(self.head_bits.cpu().numpy(), bitorder="little")
        return np.flatnonzero(member[:self.num_embeddings])

    def stored_rows(self) -> int:
        return self.head.num_embeddings + self.collisions + self.quotient.num_embeddings

    def settings(self) -> dict:
        return {"head": self.head.num_embeddings, "collisions": self.collisions,
                "quotient": self.quotient.num_embeddings}

    def parameter_count(self) -> int:
        return self.stored_rows() * self.dim

    def inference_bytes(self) -> int:
        return hybrid_bytes(self.num_embeddings, self.stored_rows(), self.dim)

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        return {"head_weight": self.head.weight.detach(),
                "remainder": self.remainder.weight.detach(),
                "quotient": self.quotient.weight.detach(),
                "head_bits": self.head_bits, "head_rank": self.head_rank}
