"""Fitting an embedding scheme to a byte budget, in closed form.

A budget is a number of bytes for all of a model's embedding tables at inference, everything
counted: each table's ``inference_bytes`` (weights, indices, masks, scales, hash metadata),
including the tables a scheme leaves full. ``fit_budget`` finds the settings of one scheme whose
tables take the most bytes not above the budget, by searching the scheme's knob:

- ``hash``: a row cap ``m``; a table of more than ``m`` rows is hashed into ``m`` buckets.
- ``qr``: the same cap on the quotient table: a table of ``n > m`` rows gets ``ceil(n / m)``
  collisions, but never more than the count that minimises its bytes (about ``sqrt(n)``; past it
  the remainder table grows faster than the quotient table shrinks). A table that QR cannot
  shrink stays full.
- ``kpart``, ``int8``, ``fp16`` (a fixed ratio per table): how many tables, the largest first.
- ``lma``, ``robe``: every table in one shared memory, ``full bytes / budget`` times smaller.
- ``pep``: every table pruned; the fraction of values the search keeps is what the budget leaves
  after PEP's per-row offsets and mask bits. The mask is found while training, so the bytes are
  only known afterwards, but never exceed the budget: the search stops at or under its target.

Where even the most aggressive setting exceeds the budget the fit is unreachable, with the reason
and the fewest bytes the scheme can reach. Nothing is built to be counted (a 10M-row full table
would take 640 MB just to report its size); ``tests/test_bench_accuracy.py`` checks these closed
forms against the tables' own ``inference_bytes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .embeddings import EmbeddingConfig, SchemeConfig, effective_scheme
from .embeddings.base import FLOAT32_BYTES, INT64_BYTES
from .embeddings.compositional import (
    balanced_radices,
    part_widths,
    quotient_remainder_radices,
)
from .embeddings.lma import lma_max_compression, lma_memory_size, lma_metadata_bytes
from .embeddings.pep import packed_bytes
from .embeddings.quantized import FLOAT16_BYTES, INT8_ROW_METADATA_BYTES, UINT8_BYTES
from .embeddings.robe import robe_max_compression, robe_memory_size, robe_metadata_bytes

#: Row caps evaluated at a time by the cap search (bounds its memory on 10M-row tables).
_CAP_BLOCK = 1 << 20


@dataclass(frozen=True)
class Fit:
    """Settings fitted to a budget, or why none fit.

    ``bytes``: the closed-form total of the fitted tables (for PEP the most its mask may take);
    when unreachable, the fewest bytes the scheme can reach at all.
    """

    embeddings: EmbeddingConfig | None
    bytes: int
    settings: str
    reason: str = ""

    @property
    def reachable(self) -> bool:
        return self.embeddings is not None


def full_bytes(sizes: Sequence[int], dim: int) -> int:
    """Bytes of the uncompressed fp32 tables."""
    return sum(sizes) * dim * FLOAT32_BYTES


def compositional_bytes(radices: Sequence[int], dim: int, operation: str) -> int:
    widths = part_widths(dim, len(radices), operation)
    weights = sum(r * w for r, w in zip(radices, widths, strict=True)) * FLOAT32_BYTES
    return weights + len(radices) * INT64_BYTES


def table_bytes(config: SchemeConfig, rows: int, dim: int) -> int:
    """``inference_bytes`` of one table of a scheme that needs only its own settings."""
    scheme = effective_scheme(config, rows)
    if scheme == "full":
        return rows * dim * FLOAT32_BYTES
    if scheme == "hash":
        buckets = min(math.ceil(rows / config.compression), rows)
        return buckets * dim * FLOAT32_BYTES + INT64_BYTES
    if scheme == "qr":
        return compositional_bytes(
            quotient_remainder_radices(rows, config.collisions), dim, config.operation)
    if scheme == "kpart":
        return compositional_bytes(balanced_radices(rows, config.partitions), dim,
                                   config.operation)
    if scheme == "int8":
        return rows * dim * UINT8_BYTES + rows * INT8_ROW_METADATA_BYTES
    if scheme == "fp16":
        return rows * dim * FLOAT16_BYTES
    raise ValueError(f"{scheme} bytes are not a function of one table's settings")


def embedding_bytes(names: Sequence[str], sizes: Sequence[int], dim: int,
                    config: EmbeddingConfig) -> int:
    """``inference_bytes`` summed over every table of a model (not for PEP, whose bytes depend
    on the mask its training finds)."""
    shared: dict[str, list[int]] = {"lma": [], "robe": []}
    total = 0
    for name, rows in zip(names, sizes, strict=True):
        scheme_config = config.for_table(name)
        scheme = effective_scheme(scheme_config, rows)
        if scheme in shared:
            shared[scheme].append(rows)
        else:
            total += table_bytes(scheme_config, rows, dim)
    if shared["lma"]:
        total += _lma_bytes(shared["lma"], dim, config.default)
    if shared["robe"]:
        total += _robe_bytes(shared["robe"], dim, config.default)
    return total


def _lma_bytes(sizes: Sequence[int], dim: int, config: SchemeConfig) -> int:
    memory = lma_memory_size(sizes, dim, config.minhashes, config.compression)
    return (memory * FLOAT32_BYTES
            + sum(lma_metadata_bytes(rows, dim, config.minhashes) for rows in sizes))


def _robe_bytes(sizes: Sequence[int], dim: int, config: SchemeConfig) -> int:
    memory = robe_memory_size(sizes, dim, config.block, config.compression)
    return memory * FLOAT32_BYTES + len(sizes) * robe_metadata_bytes(dim, config.block)


def fit_budget(base: SchemeConfig, names: Sequence[str], sizes: Sequence[int], dim: int,
               budget: int) -> Fit:
    """The settings of ``base.scheme`` (other settings as in ``base``) taking the most bytes
    not above ``budget``."""
    scheme = base.scheme
    if scheme == "full":
        total = full_bytes(sizes, dim)
        if total > budget:
            return Fit(None, total, "fp32", "the full tables exceed the budget")
        return Fit(EmbeddingConfig(default=base), total, "fp32")
    if scheme in ("hash", "qr"):
        return _fit_cap(base, names, sizes, dim, budget)
    if scheme in ("kpart", "int8", "fp16"):
        return _fit_largest_tables(base, names, sizes, dim, budget)
    if scheme in ("lma", "robe"):
        return _fit_shared(base, names, sizes, dim, budget)
    if scheme == "pep":
        index = _pep_index_bytes(sizes, dim)
        values = (budget - index) // FLOAT32_BYTES
        if values < 1:
            return Fit(None, index, "", (
                f"PEP's per-row offsets and mask bits alone take {index:,} bytes "
                f"({index / full_bytes(sizes, dim):.1%} of the full tables)"))
        total_values = sum(sizes) * dim
        return fit_pep_keep(base, sizes, dim, min(values, total_values - 1) / total_values)
    raise ValueError(f"no budget search for scheme {scheme!r}")


def _pep_index_bytes(sizes: Sequence[int], dim: int) -> int:
    """PEP's serving layout without any value: offsets (int32), mask bits, widths."""
    return sum(packed_bytes(rows, dim, 0) for rows in sizes)


def fit_pep_keep(base: SchemeConfig, sizes: Sequence[int], dim: int, keep: float) -> Fit:
    """PEP keeping ``keep`` of all values; ``bytes`` is the most that mask may take."""
    if not 0 < keep < 1:
        raise ValueError(f"PEP keeps a fraction of the values in (0, 1), got {keep}")
    values = math.floor(keep * sum(sizes) * dim)
    config = replace(base, scheme="pep", min_rows=0, pep_keep=keep)
    return Fit(EmbeddingConfig(default=config),
               _pep_index_bytes(sizes, dim) + values * FLOAT32_BYTES,
               f"keep {keep:.3g} of values, {base.granularity}")


def _best_collisions(rows: int, dim: int, operation: str) -> int:
    """The collision count with the fewest QR bytes for a table (the smallest such count)."""
    counts = range(1, math.isqrt(rows) + 2)
    return min(counts, key=lambda c: compositional_bytes(
        quotient_remainder_radices(rows, c), dim, operation))


def _cap_table_bytes(base: SchemeConfig, rows: int, dim: int, caps: np.ndarray,
                     best: int) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of one table under each row cap, and its collisions (hash: buckets) per cap."""
    full = rows * dim * FLOAT32_BYTES
    if base.scheme == "hash":
        knob = np.minimum(caps, rows)
        stored = knob * dim * FLOAT32_BYTES + INT64_BYTES
    else:
        knob = np.minimum(-(-rows // caps), best)
        widths = part_widths(dim, 2, base.operation)
        stored = (knob * widths[0] + -(-rows // knob) * widths[1]) * FLOAT32_BYTES \
            + 2 * INT64_BYTES
    shrunk = (caps < rows) & (stored < full)
    return np.where(shrunk, stored, full), np.where(shrunk, knob, 0)


def _cap_config(base: SchemeConfig, names: Sequence[str], sizes: Sequence[int], dim: int,
                cap: int, bests: Sequence[int]) -> tuple[EmbeddingConfig, list[int]]:
    """Per-table overrides for one row cap; returns them and the knob of each shrunk table."""
    tables, knobs = {}, []
    for name, rows, best in zip(names, sizes, bests, strict=True):
        _, knob = _cap_table_bytes(base, rows, dim, np.array([cap]), best)
        if knob[0]:
            k = int(knob[0])
            if base.scheme == "hash":
                # ceil(rows / (rows / (k - 0.5))) is k whatever the float rounding.
                tables[name] = replace(base, compression=rows / (k - 0.5))
            else:
                tables[name] = replace(base, collisions=k)
            knobs.append(k)
    return EmbeddingConfig(default=replace(base, scheme="full"), tables=tables), knobs


def _fit_cap(base: SchemeConfig, names: Sequence[str], sizes: Sequence[int], dim: int,
             budget: int) -> Fit:
    bests = [_best_collisions(rows, dim, base.operation) if base.scheme == "qr" else 0
             for rows in sizes]
    best_cap, best_total, fewest = 0, -1, None
    largest = max(sizes)
    for start in range(1, largest, _CAP_BLOCK):
        caps = np.arange(start, min(start + _CAP_BLOCK, largest), dtype=np.int64)
        totals = sum(_cap_table_bytes(base, rows, dim, caps, best)[0]
                     for rows, best in zip(sizes, bests, strict=True))
        fewest = int(totals.min()) if fewest is None else min(fewest, int(totals.min()))
        within = np.flatnonzero(totals <= budget)
        if len(within):
            # The most bytes within the budget; among equals, the largest cap.
            top = int(totals[within].max())
            if top >= best_total:
                best_total = top
                best_cap = int(caps[within[totals[within] == top][-1]])
    if best_total < 0:
        what = ("one bucket per table" if base.scheme == "hash"
                else "QR at its fewest bytes in every table (about 2 sqrt(n) rows)")
        share = (fewest or 0) / full_bytes(sizes, dim)
        return Fit(None, fewest or 0, "", f"{what} still takes {share:.1%} of the full tables")
    config, knobs = _cap_config(base, names, sizes, dim, best_cap, bests)
    total = embedding_bytes(names, sizes, dim, config)
    assert total == best_total, (total, best_total)
    if base.scheme == "hash":
        settings = f"≤ {best_cap:,} rows per table ({len(knobs)} of {len(sizes)} hashed)"
    else:
        settings = (f"quotient ≤ {best_cap:,} rows, {min(knobs)}–{max(knobs)} collisions "
                    f"({len(knobs)} of {len(sizes)} tables)")
    return Fit(config, total, settings)


def _fit_largest_tables(base: SchemeConfig, names: Sequence[str], sizes: Sequence[int],
                        dim: int, budget: int) -> Fit:
    """Shrinks the largest tables first, as few as the budget allows (the most bytes)."""
    full = [rows * dim * FLOAT32_BYTES for rows in sizes]
    shrunk = [table_bytes(base, rows, dim) for rows in sizes]
    shrinkable = [i for i in range(len(sizes)) if shrunk[i] < full[i]]
    order = sorted(shrinkable, key=lambda i: -sizes[i])
    fewest = sum(full) - sum(full[i] - shrunk[i] for i in shrinkable)
    for threshold in sorted({sizes[i] for i in shrinkable}, reverse=True):
        chosen = [i for i in order if sizes[i] >= threshold]
        total = sum(full) - sum(full[i] - shrunk[i] for i in chosen)
        if total <= budget:
            config = EmbeddingConfig(default=replace(base, scheme="full"),
                                     tables={names[i]: base for i in chosen})
            assert embedding_bytes(names, sizes, dim, config) == total
            return Fit(config, total, f"{len(chosen)} of {len(sizes)} tables "
                                      f"(≥ {threshold:,} rows)")
    what = {"kpart": f"{base.partitions} partitions",
            "int8": f"row-wise int8 ({dim} + {INT8_ROW_METADATA_BYTES} bytes a row)",
            "fp16": "fp16"}[base.scheme]
    return Fit(None, fewest, "", f"{what} on every table it shrinks still takes "
                                 f"{fewest / sum(full):.1%} of the full tables")


def _fit_shared(base: SchemeConfig, names: Sequence[str], sizes: Sequence[int], dim: int,
                budget: int) -> Fit:
    """One shared memory for every table, compressed by ``full bytes / budget``."""
    full = full_bytes(sizes, dim)
    compression = full / budget if budget > 0 else math.inf
    try:
        if base.scheme == "lma":
            memory = lma_memory_size(sizes, dim, base.minhashes, compression)
            settings = f"|M| = {memory:,} values, {base.minhashes} minhash"
        else:
            memory = robe_memory_size(sizes, dim, base.block, compression)
            settings = f"|M| = {memory:,} values, Z = {base.block}"
    except ValueError:
        if base.scheme == "lma":
            reach = lma_max_compression(sizes, dim, base.minhashes)
            why = (f"its minhash signatures ({base.minhashes} x 4 bytes a row against "
                   f"{dim * FLOAT32_BYTES} for a full row) cap LMA at {reach:.3g}x")
        else:
            reach = robe_max_compression(sizes, dim, base.block)
            why = f"its hash coefficients cap ROBE at {reach:.3g}x"
        return Fit(None, math.ceil(full / reach), "", why)
    config = EmbeddingConfig(default=replace(base, min_rows=0, compression=compression))
    return Fit(config, embedding_bytes(names, sizes, dim, config), settings)
