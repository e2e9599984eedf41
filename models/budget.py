"""What each scheme's tables take at inference, in closed form, and each scheme's search for the
settings that fit a byte budget. The registry (``models/schemes.py``) holds both per scheme.

Closed forms: ``<scheme>_tables_bytes(settings, sizes, dim)`` is the bytes of the tables of
``sizes`` rows using the scheme (``settings[i]`` for the table of ``sizes[i]``; the tables of a
shared memory share one setting): the tables' own byte formulas (``hashed_bytes``,
``compositional_bytes``, ``packed_bytes``, ...: what their ``inference_bytes`` return) applied to
the sizes the settings give. Nothing is built to be counted (a 10M-row full table would take
640 MB just to report its size); ``tests/test_schemes.py`` checks each closed form against the
built tables and their exported initializers.

A budget is a number of bytes for all of a model's embedding tables at inference, everything
counted, including the tables a scheme leaves full. ``fit_<scheme>(base, names, sizes, dim,
budget)`` finds the settings of ``base``'s scheme (its other settings as in ``base``) whose tables
take the most bytes not above the budget, by searching the scheme's knob:

- ``hash``: a row cap ``m``; a table of more than ``m`` rows is hashed into ``m`` buckets.
- ``hybrid``: the same cap on a table's rows, head and quotient-remainder tail together (the
  split is searched in training, on the training counts: ``embeddings/hybrid.py``), the head
  map counted; a table never goes under its fewest rows (a head row and the smallest tail,
  about ``2 sqrt(n)``), as ``qr`` never passes its fewest bytes.
- ``qr``: the same cap on the quotient table: a table of ``n > m`` rows gets ``ceil(n / m)``
  collisions, but never more than the count that minimises its bytes (about ``sqrt(n)``; past it
  the remainder table grows faster than the quotient table shrinks). A table that QR cannot
  shrink stays full.
- ``kpart``, ``int8``, ``fp16`` (a fixed ratio per table): how many tables, the largest first.
- ``lma``, ``robe``: every table in one shared memory, ``full bytes / budget`` times smaller.
- ``cce``: the row cap of ``hash`` on each of its two parts; a table's pointers (one narrow
  integer per id and chunk) are counted, so a table CCE cannot shrink stays full.
- ``pep``: every table pruned; the fraction of values the search keeps is what the budget leaves
  after PEP's per-row offsets and mask bits. The mask is found while training, so the bytes are
  only known afterwards, but never exceed the budget: the search stops at or under its target.
- ``full``: the full tables, when they fit.

Where even the most aggressive setting exceeds the budget the fit is unreachable, with the reason
and the fewest bytes the scheme can reach. The fitted settings have ``min_rows`` 0: the search has
chosen the tables each scheme takes, so none is left full behind its back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from .embeddings.base import fp32_bytes
from .embeddings.cce import cce_bytes
from .embeddings.compositional import (
    balanced_radices,
    compositional_bytes,
    quotient_remainder_radices,
)
from .embeddings.constants import FLOAT32_BYTES
from .embeddings.hashing import hash_buckets, hashed_bytes
from .embeddings.hybrid import fewest_rows, hybrid_bytes, hybrid_rows
from .embeddings.lma import lma_bytes, lma_max_compression, lma_memory_size
from .embeddings.pep import packed_bytes
from .embeddings.quantized import INT8_ROW_METADATA_BYTES, fp16_bytes, int8_bytes
from .embeddings.robe import robe_bytes, robe_max_compression, robe_memory_size
from .embeddings.scheme_settings import (
    CCESettings,
    EmbeddingConfig,
    FP16Settings,
    FullSettings,
    HashSettings,
    HybridSettings,
    Int8Settings,
    KPartSettings,
    LMASettings,
    PEPSettings,
    QRSettings,
    RobeSettings,
    SchemeSettings,
)

#: Row caps evaluated at a time by the cap search (bounds its memory on 10M-row tables).
_CAP_BLOCK = 1 << 20

S = TypeVar("S", bound=SchemeSettings)


@dataclass(frozen=True)
class Fit:
    """Settings fitted to a budget, or why none fit.

    ``bytes``: the closed-form total of the fitted tables; when unreachable, the fewest bytes the
    scheme can reach at all. ``exact``: whether the trained tables take exactly ``bytes`` (PEP's
    take at most that: its mask is found while training).
    """

    embeddings: EmbeddingConfig | None
    bytes: int
    settings: str
    reason: str = ""
    exact: bool = True

    @property
    def reachable(self) -> bool:
        return self.embeddings is not None


def full_bytes(sizes: Sequence[int], dim: int) -> int:
    """Bytes of the uncompressed fp32 tables."""
    return fp32_bytes(sum(sizes), dim)


# ------------------------------------------------------------------------------------------
# Closed-form bytes, per scheme
# ------------------------------------------------------------------------------------------


def full_tables_bytes(settings: Sequence[FullSettings], sizes: Sequence[int], dim: int) -> int:
    return full_bytes(sizes, dim)


def hash_tables_bytes(settings: Sequence[HashSettings], sizes: Sequence[int], dim: int) -> int:
    return sum(hashed_bytes(hash_buckets(rows, s.compression), dim)
               for s, rows in zip(settings, sizes, strict=True))


def hybrid_tables_bytes(settings: Sequence[HybridSettings], sizes: Sequence[int],
                        dim: int) -> int:
    return sum(hybrid_bytes(rows, hybrid_rows(rows, s.compression), dim)
               for s, rows in zip(settings, sizes, strict=True))


def qr_tables_bytes(settings: Sequence[QRSettings], sizes: Sequence[int], dim: int) -> int:
    return sum(compositional_bytes(quotient_remainder_radices(rows, s.collisions), dim,
                                   s.operation)
               for s, rows in zip(settings, sizes, strict=True))


def kpart_tables_bytes(settings: Sequence[KPartSettings], sizes: Sequence[int], dim: int) -> int:
    return sum(compositional_bytes(balanced_radices(rows, s.partitions), dim, s.operation)
               for s, rows in zip(settings, sizes, strict=True))


def pep_tables_bytes(settings: Sequence[PEPSettings], sizes: Sequence[int], dim: int) -> int:
    """The most bytes PEP tables take once the search has kept ``pep_keep`` (the first table's,
    which the search uses) of the values of every table of the model, all of them PEP: the
    values it may keep, and every row's offsets and mask bits."""
    kept = math.floor(settings[0].pep_keep * sum(sizes) * dim)
    return _pep_index_bytes(sizes, dim) + kept * FLOAT32_BYTES


def _pep_index_bytes(sizes: Sequence[int], dim: int) -> int:
    """PEP's serving layout without any value: offsets (int32), mask bits, widths."""
    return sum(packed_bytes(rows, dim, 0) for rows in sizes)


def int8_tables_bytes(settings: Sequence[Int8Settings], sizes: Sequence[int], dim: int) -> int:
    return sum(int8_bytes(rows, dim) for rows in sizes)


def fp16_tables_bytes(settings: Sequence[FP16Settings], sizes: Sequence[int], dim: int) -> int:
    return sum(fp16_bytes(rows, dim) for rows in sizes)


def lma_tables_bytes(settings: Sequence[LMASettings], sizes: Sequence[int], dim: int) -> int:
    return lma_bytes(sizes, dim, settings[0].minhashes, settings[0].compression)


def robe_tables_bytes(settings: Sequence[RobeSettings], sizes: Sequence[int], dim: int) -> int:
    return robe_bytes(sizes, dim, settings[0].block, settings[0].compression)


def cce_tables_bytes(settings: Sequence[CCESettings], sizes: Sequence[int], dim: int) -> int:
    return sum(cce_bytes(rows, dim, hash_buckets(rows, s.compression), s.chunks)
               for s, rows in zip(settings, sizes, strict=True))


# ------------------------------------------------------------------------------------------
# Budget searches, per scheme
# ------------------------------------------------------------------------------------------


def fit_full(base: FullSettings, names: Sequence[str], sizes: Sequence[int], dim: int,
             budget: int) -> Fit:
    total = full_bytes(sizes, dim)
    if total > budget:
        return Fit(None, total, "fp32", "the full tables exceed the budget")
    return Fit(EmbeddingConfig(default=base), total, "fp32")


def fit_hash(base: HashSettings, names: Sequence[str], sizes: Sequence[int], dim: int,
             budget: int) -> Fit:
    cap, total, fewest = _best_cap(sizes, budget,
                                   lambda rows, caps: _hash_at_caps(rows, dim, caps)[0])
    if total < 0:
        return Fit(None, fewest, "", f"one bucket per table still takes "
                                     f"{fewest / full_bytes(sizes, dim):.1%} of the full tables")
    tables = {}
    for name, rows in zip(names, sizes, strict=True):
        buckets = int(_hash_at_caps(rows, dim, np.array([cap]))[1][0])
        if buckets:
            # ceil(rows / (rows / (k - 0.5))) is k whatever the float rounding.
            tables[name] = replace(base, min_rows=0, compression=rows / (buckets - 0.5))
    return Fit(EmbeddingConfig(default=FullSettings(), tables=tables), total,
               f"≤ {cap:,} rows per table ({len(tables)} of {len(sizes)} hashed)")


def fit_hybrid(base: HybridSettings, names: Sequence[str], sizes: Sequence[int], dim: int,
               budget: int) -> Fit:
    """The row cap of ``fit_hash``, a table's ``m`` rows shared by its head and tail (how is
    searched in training, ``hybrid.head_rows``), its head map counted."""
    cap, total, fewest = _best_cap(sizes, budget,
                                   lambda rows, caps: _hybrid_at_caps(rows, dim, caps)[0])
    if total < 0:
        return Fit(None, fewest, "", f"a head row and the smallest quotient-remainder tail (about "
                                     f"2 sqrt(n) rows) per table still take "
                                     f"{fewest / full_bytes(sizes, dim):.1%} of the full tables")
    tables = {}
    for name, rows in zip(names, sizes, strict=True):
        stored = int(_hybrid_at_caps(rows, dim, np.array([cap]))[1][0])
        if stored:
            tables[name] = replace(base, min_rows=0, compression=rows / (stored - 0.5))
    return Fit(EmbeddingConfig(default=FullSettings(), tables=tables), total,
               f"≤ {cap:,} rows per table ({len(tables)} of {len(sizes)} hybrid)")


def fit_qr(base: QRSettings, names: Sequence[str], sizes: Sequence[int], dim: int,
           budget: int) -> Fit:
    best = {rows: _best_collisions(rows, dim, base.operation) for rows in set(sizes)}
    cap, total, fewest = _best_cap(
        sizes, budget,
        lambda rows, caps: _qr_at_caps(rows, dim, base.operation, best[rows], caps)[0])
    if total < 0:
        return Fit(None, fewest, "", f"QR at its fewest bytes in every table (about 2 sqrt(n) "
                                     f"rows) still takes {fewest / full_bytes(sizes, dim):.1%} "
                                     "of the full tables")
    tables = {}
    for name, rows in zip(names, sizes, strict=True):
        collisions = int(_qr_at_caps(rows, dim, base.operation, best[rows], np.array([cap]))[1][0])
        if collisions:
            tables[name] = replace(base, min_rows=0, collisions=collisions)
    counts = [settings.collisions for settings in tables.values()]
    return Fit(EmbeddingConfig(default=FullSettings(), tables=tables), total,
               f"quotient ≤ {cap:,} rows, {min(counts)}–{max(counts)} collisions "
               f"({len(tables)} of {len(sizes)} tables)")


def fit_kpart(base: KPartSettings, names: Sequence[str], sizes: Sequence[int], dim: int,
              budget: int) -> Fit:
    return _fit_largest_tables(base, names, sizes, dim, budget, kpart_tables_bytes,
                               f"{base.partitions} partitions")


def fit_int8(base: Int8Settings, names: Sequence[str], sizes: Sequence[int], dim: int,
             budget: int) -> Fit:
    return _fit_largest_tables(base, names, sizes, dim, budget, int8_tables_bytes,
                               f"row-wise int8 ({dim} + {INT8_ROW_METADATA_BYTES} bytes a row)")


def fit_fp16(base: FP16Settings, names: Sequence[str], sizes: Sequence[int], dim: int,
             budget: int) -> Fit:
    return _fit_largest_tables(base, names, sizes, dim, budget, fp16_tables_bytes, "fp16")


def fit_pep(base: PEPSettings, names: Sequence[str], sizes: Sequence[int], dim: int,
            budget: int) -> Fit:
    index = _pep_index_bytes(sizes, dim)
    values = (budget - index) // FLOAT32_BYTES
    if values < 1:
        return Fit(None, index, "", (
            f"PEP's per-row offsets and mask bits alone take {index:,} bytes "
            f"({index / full_bytes(sizes, dim):.1%} of the full tables)"))
    total_values = sum(sizes) * dim
    return fit_pep_keep(base, sizes, dim, min(values, total_values - 1) / total_values)


def fit_pep_keep(base: PEPSettings, sizes: Sequence[int], dim: int, keep: float) -> Fit:
    """PEP keeping ``keep`` of all values; ``bytes`` is the most that mask may take."""
    if not 0 < keep < 1:
        raise ValueError(f"PEP keeps a fraction of the values in (0, 1), got {keep}")
    settings = replace(base, min_rows=0, pep_keep=keep)
    return Fit(EmbeddingConfig(default=settings),
               pep_tables_bytes([settings] * len(sizes), sizes, dim),
               f"keep {keep:.3g} of values, {base.granularity}", exact=False)


def fit_lma(base: LMASettings, names: Sequence[str], sizes: Sequence[int], dim: int,
            budget: int) -> Fit:
    compression = _shared_compression(sizes, dim, budget)
    try:
        memory = lma_memory_size(sizes, dim, base.minhashes, compression)
    except ValueError:
        reach = lma_max_compression(sizes, dim, base.minhashes)
        return Fit(None, math.ceil(full_bytes(sizes, dim) / reach), "",
                   f"its minhash signatures ({base.minhashes} x 4 bytes a row against "
                   f"{dim * FLOAT32_BYTES} for a full row) cap LMA at {reach:.3g}x")
    return Fit(EmbeddingConfig(default=replace(base, min_rows=0, compression=compression)),
               lma_bytes(sizes, dim, base.minhashes, compression),
               f"|M| = {memory:,} values, {base.minhashes} minhash")


def fit_robe(base: RobeSettings, names: Sequence[str], sizes: Sequence[int], dim: int,
             budget: int) -> Fit:
    compression = _shared_compression(sizes, dim, budget)
    try:
        memory = robe_memory_size(sizes, dim, base.block, compression)
    except ValueError:
        reach = robe_max_compression(sizes, dim, base.block)
        return Fit(None, math.ceil(full_bytes(sizes, dim) / reach), "",
                   f"its hash coefficients cap ROBE at {reach:.3g}x")
    return Fit(EmbeddingConfig(default=replace(base, min_rows=0, compression=compression)),
               robe_bytes(sizes, dim, base.block, compression),
               f"|M| = {memory:,} values, Z = {base.block}")


def fit_cce(base: CCESettings, names: Sequence[str], sizes: Sequence[int], dim: int,
            budget: int) -> Fit:
    """The row cap of ``fit_hash`` on each part's rows (k), the pointers counted."""
    cap, total, fewest = _best_cap(
        sizes, budget, lambda rows, caps: _cce_at_caps(rows, dim, base.chunks, caps)[0])
    if total < 0:
        return Fit(None, fewest, "", f"one row per part and the pointers still take "
                                     f"{fewest / full_bytes(sizes, dim):.1%} of the full tables")
    tables = {}
    for name, rows in zip(names, sizes, strict=True):
        k = int(_cce_at_caps(rows, dim, base.chunks, np.array([cap]))[1][0])
        if k:
            tables[name] = replace(base, min_rows=0, compression=rows / (k - 0.5))
    return Fit(EmbeddingConfig(default=FullSettings(), tables=tables), total,
               f"≤ {cap:,} rows per part, {base.chunks} chunks "
               f"({len(tables)} of {len(sizes)} tables)")


def _shared_compression(sizes: Sequence[int], dim: int, budget: int) -> float:
    """The compression of one memory for every table that takes ``budget`` bytes."""
    return full_bytes(sizes, dim) / budget if budget > 0 else math.inf


def _best_collisions(rows: int, dim: int, operation: str) -> int:
    """The collision count with the fewest QR bytes for a table (the smallest such count)."""
    counts = range(1, math.isqrt(rows) + 2)
    return min(counts, key=lambda c: compositional_bytes(
        quotient_remainder_radices(rows, c), dim, operation))


def _shrunk_or_full(rows: int, dim: int, caps: np.ndarray, stored: np.ndarray,
                    knob: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One table's bytes under each row cap, and its knob (0 where it stays full: the cap does
    not cut it, or cutting it would not save bytes)."""
    full = fp32_bytes(rows, dim)
    shrunk = (caps < rows) & (stored < full)
    return np.where(shrunk, stored, full), np.where(shrunk, knob, 0)


def _hash_at_caps(rows: int, dim: int, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of a hashed table under each row cap, and its buckets."""
    buckets = np.minimum(caps, rows)
    return _shrunk_or_full(rows, dim, caps, hashed_bytes(buckets, dim), buckets)


def _hybrid_at_caps(rows: int, dim: int, caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of a hybrid table of at most ``cap`` rows, never under its fewest (a head row and
    the smallest quotient-remainder tail, as ``qr`` stops at its fewest bytes), and its rows."""
    stored = np.maximum(np.minimum(caps, rows), fewest_rows(rows))
    return _shrunk_or_full(rows, dim, caps, hybrid_bytes(rows, stored, dim), stored)


def _qr_at_caps(rows: int, dim: int, operation: str, best: int,
                caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of a QR table whose quotient table has at most ``cap`` rows, and its collisions."""
    collisions = np.minimum(-(-rows // caps), best)
    stored = compositional_bytes((collisions, -(-rows // collisions)), dim, operation)
    return _shrunk_or_full(rows, dim, caps, stored, collisions)


def _cce_at_caps(rows: int, dim: int, chunks: int,
                 caps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of a CCE table of at most ``cap`` rows per part, and its rows per part."""
    k = np.minimum(caps, rows)
    return _shrunk_or_full(rows, dim, caps, cce_bytes(rows, dim, k, chunks), k)


def _best_cap(sizes: Sequence[int], budget: int,
              table_bytes: Callable[[int, np.ndarray], np.ndarray]) -> tuple[int, int, int]:
    """Tries every row cap below the largest table; ``table_bytes(rows, caps)`` is a table's
    bytes under each cap. Returns the cap whose tables take the most bytes within the budget
    (among equals the largest cap) and that total, ``(0, -1)`` when no cap fits; and the fewest
    bytes any cap gives."""
    best_cap, best_total, fewest = 0, -1, None
    largest = max(sizes)
    for start in range(1, largest, _CAP_BLOCK):
        caps = np.arange(start, min(start + _CAP_BLOCK, largest), dtype=np.int64)
        totals = np.zeros(len(caps), dtype=np.int64)
        for rows in sizes:
            totals += table_bytes(rows, caps)
        fewest = int(totals.min()) if fewest is None else min(fewest, int(totals.min()))
        within = np.flatnonzero(totals <= budget)
        if len(within):
            top = int(totals[within].max())
            if top >= best_total:
                best_total = top
                best_cap = int(caps[within[totals[within] == top][-1]])
    return best_cap, best_total, fewest or 0


def _fit_largest_tables(
        base: S, names: Sequence[str], sizes: Sequence[int], dim: int, budget: int,
        tables_bytes: Callable[[Sequence[S], Sequence[int], int], int], what: str) -> Fit:
    """Puts the largest tables under ``base`` first, as few as the budget allows (the most
    bytes); ``tables_bytes`` is the scheme's closed form, ``what`` names its setting."""
    full = [fp32_bytes(rows, dim) for rows in sizes]
    shrunk = [tables_bytes([base], [rows], dim) for rows in sizes]
    shrinkable = [i for i in range(len(sizes)) if shrunk[i] < full[i]]
    order = sorted(shrinkable, key=lambda i: -sizes[i])
    fewest = sum(full) - sum(full[i] - shrunk[i] for i in shrinkable)
    for threshold in sorted({sizes[i] for i in shrinkable}, reverse=True):
        chosen = [i for i in order if sizes[i] >= threshold]
        total = sum(full) - sum(full[i] - shrunk[i] for i in chosen)
        if total <= budget:
            config = EmbeddingConfig(default=FullSettings(),
                                     tables={names[i]: replace(base, min_rows=0) for i in chosen})
            return Fit(config, total, f"{len(chosen)} of {len(sizes)} tables "
                                      f"(≥ {threshold:,} rows)")
    return Fit(None, fewest, "", f"{what} on every table it shrinks still takes "
                                 f"{fewest / sum(full):.1%} of the full tables")
