"""The registry of embedding schemes: one ``Scheme`` per scheme, holding everything the training
side knows about it, and ``build_tables``, which builds a model's tables through it.

A scheme is:

- ``settings``: its settings type (``embeddings/scheme_settings.py``: a frozen dataclass with
  only its knobs; the name is the type's);
- ``build``: one of its tables (``embeddings/``); schemes whose tables share one memory (lma,
  robe) also have ``shared_memory``, which builds that memory;
- ``tables_bytes``: the closed-form inference bytes of a model's tables using it, from the same
  formulas as the tables' ``inference_bytes`` (``budget.py``);
- ``fit_budget``: its search for the settings that take the most bytes under a budget
  (``budget.py``);
- ``benchmark``: the settings ``ctrserve bench accuracy`` compares, by name.

``effective_settings`` decides which tables keep their scheme: a table under its ``min_rows``,
or, with ``min_rows`` unset, one the scheme cannot shrink (``why_full`` says why), stays full.

How a scheme's table is exported (its ONNX node and function body) needs onnx, and ``export``
imports ``models``, never the reverse: that part of each scheme is ``export/table_nodes.py``,
keyed by the names registered here. ``tests/test_schemes.py`` walks the registry and fails for a
scheme missing any part, the export's included.

Adding a scheme: its settings type (``SETTINGS``), its table, its closed form and budget search,
an entry in ``SCHEMES`` and its export.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Generic, TypeVar

import numpy as np

from .budget import (
    Fit,
    cce_tables_bytes,
    fit_cce,
    fit_fp16,
    fit_full,
    fit_hash,
    fit_hybrid,
    fit_int8,
    fit_kpart,
    fit_lma,
    fit_pep,
    fit_qr,
    fit_robe,
    fp16_tables_bytes,
    full_tables_bytes,
    hash_tables_bytes,
    hybrid_tables_bytes,
    int8_tables_bytes,
    kpart_tables_bytes,
    lma_tables_bytes,
    pep_tables_bytes,
    qr_tables_bytes,
    robe_tables_bytes,
)
from .embeddings.base import EmbeddingTable, fp32_bytes
from .embeddings.cce import CCETable
from .embeddings.compositional import (
    CompositionalTable,
    balanced_radices,
    quotient_remainder_radices,
)
from .embeddings.full import FullTable
from .embeddings.hashing import HashedTable, hash_buckets
from .embeddings.hybrid import HybridTable, head_rows, hybrid_rows, most_frequent
from .embeddings.lma import LMATable, fallback_signatures, lma_memory_size
from .embeddings.pep import PEPTable
from .embeddings.quantized import QuantizedTable
from .embeddings.robe import RobeTable, robe_memory_size
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
    QuantizedSettings,
    RobeSettings,
    SchemeSettings,
    setting_names,
)
from .embeddings.shared_memory import SharedMemory

S = TypeVar("S", bound=SchemeSettings)
S_co = TypeVar("S_co", bound=SchemeSettings, covariant=True)


@dataclass(frozen=True)
class TableSpec(Generic[S_co]):
    """One table to build: column ``column`` of a model, named ``name``, ``rows`` x ``dim``."""

    name: str
    column: int
    rows: int
    dim: int
    settings: S_co
    #: The memory the model's tables of the scheme share (lma, robe); None for other schemes.
    memory: SharedMemory | None = None
    #: LMA: the table's minhash signatures, where training computed them.
    signatures: np.ndarray | None = None
    #: Hybrid: how often each id occurs in the training split, where training counted them.
    counts: np.ndarray | None = None

    def shared_memory(self) -> SharedMemory:
        if self.memory is None:
            raise ValueError(f"{self.settings.scheme} tables share a memory: build them with "
                             "build_tables")
        return self.memory


@dataclass(frozen=True)
class Scheme(Generic[S]):
    """One embedding scheme (see the module docstring)."""

    settings: type[S]
    build: Callable[[TableSpec[S]], EmbeddingTable]
    #: ``tables_bytes(settings, sizes, dim)``: the bytes of tables of ``sizes`` rows, the one of
    #: ``sizes[i]`` rows configured by ``settings[i]``.
    tables_bytes: Callable[[Sequence[S], Sequence[int], int], int]
    #: ``fit_budget(base, names, sizes, dim, budget)``.
    fit_budget: Callable[[S, Sequence[str], Sequence[int], int, int], Fit]
    #: The settings the accuracy benchmark compares, by name (the budget chooses the rest).
    benchmark: Mapping[str, S]
    #: ``shared_memory(settings, sizes, dim)``: the memory every table of the scheme in a model
    #: shares, for schemes whose tables share one.
    shared_memory: Callable[[S, Sequence[int], int], SharedMemory] | None = None

    @property
    def name(self) -> str:
        return self.settings.scheme


def _build_full(spec: TableSpec[FullSettings]) -> EmbeddingTable:
    return FullTable(spec.rows, spec.dim)


def _build_hash(spec: TableSpec[HashSettings]) -> EmbeddingTable:
    return HashedTable(spec.rows, spec.dim, hash_buckets(spec.rows, spec.settings.compression))


def _build_hybrid(spec: TableSpec[HybridSettings]) -> EmbeddingTable:
    """The head's size is the settings' (training records it, ``with_hybrid_heads``), else
    searched on the counts; its ids are the most frequent ones. Without counts (rebuilding a
    checkpoint, whose state dict holds the map) the first ids stand in, and the search, every
    id alike to it, gives one head row where the settings name none."""
    stored = hybrid_rows(spec.rows, spec.settings.compression)
    counts = spec.counts
    head = spec.settings.head
    if head is None:
        head = head_rows(np.zeros(spec.rows) if counts is None else counts, stored)
    head_ids = None if counts is None else most_frequent(counts, head)
    return HybridTable(spec.rows, spec.dim, head, stored - head, head_ids)


def _build_qr(spec: TableSpec[QRSettings]) -> EmbeddingTable:
    radices = quotient_remainder_radices(spec.rows, spec.settings.collisions)
    return CompositionalTable(spec.rows, spec.dim, radices, spec.settings.operation)


def _build_kpart(spec: TableSpec[KPartSettings]) -> EmbeddingTable:
    radices = balanced_radices(spec.rows, spec.settings.partitions)
    return CompositionalTable(spec.rows, spec.dim, radices, spec.settings.operation)


def _build_pep(spec: TableSpec[PEPSettings]) -> EmbeddingTable:
    return PEPTable(spec.rows, spec.dim, spec.settings.granularity, spec.settings.threshold_init)


def _build_quantized(spec: TableSpec[QuantizedSettings]) -> EmbeddingTable:
    """An empty quantized table: training fills it (``models/quantize.py``), a checkpoint's
    state dict too."""
    return QuantizedTable(spec.rows, spec.dim, spec.settings.scheme)


def _build_lma(spec: TableSpec[LMASettings]) -> EmbeddingTable:
    """Without the signatures (rebuilding a checkpoint, whose state dict holds them)
    placeholders of the right shape stand in."""
    signatures = spec.signatures
    if signatures is None:
        signatures = fallback_signatures(spec.column, np.arange(spec.rows),
                                         spec.settings.minhashes, spec.settings.hash_seed)
    return LMATable(spec.rows, spec.dim, spec.shared_memory(), signatures)


def _lma_memory(settings: LMASettings, sizes: Sequence[int], dim: int) -> SharedMemory:
    size = lma_memory_size(sizes, dim, settings.minhashes, settings.compression)
    return SharedMemory(size, settings.hash_seed)


def _build_robe(spec: TableSpec[RobeSettings]) -> EmbeddingTable:
    return RobeTable(spec.rows, spec.dim, spec.shared_memory(), spec.settings.block)


def _robe_memory(settings: RobeSettings, sizes: Sequence[int], dim: int) -> SharedMemory:
    return SharedMemory(robe_memory_size(sizes, dim, settings.block, settings.compression),
                        settings.hash_seed)


def _build_cce(spec: TableSpec[CCESettings]) -> EmbeddingTable:
    settings = spec.settings
    return CCETable(spec.rows, spec.dim, hash_buckets(spec.rows, settings.compression),
                    settings.chunks, settings.hash_seed, spec.column, settings.recluster_every,
                    settings.reclusters)


#: Every scheme, by name (the names and order of ``scheme_settings.SETTINGS``).
SCHEMES: dict[str, Scheme[Any]] = {scheme.name: scheme for scheme in (
    Scheme(settings=FullSettings, build=_build_full, tables_bytes=full_tables_bytes,
           fit_budget=fit_full, benchmark={"full": FullSettings()}),
    Scheme(settings=HashSettings, build=_build_hash, tables_bytes=hash_tables_bytes,
           fit_budget=fit_hash, benchmark={"hash": HashSettings()}),
    Scheme(settings=HybridSettings, build=_build_hybrid, tables_bytes=hybrid_tables_bytes,
           fit_budget=fit_hybrid, benchmark={"hybrid": HybridSettings()}),
    Scheme(settings=QRSettings, build=_build_qr, tables_bytes=qr_tables_bytes,
           fit_budget=fit_qr, benchmark={"qr-mult": QRSettings(operation="mult"),
                                         "qr-concat": QRSettings(operation="concat")}),
    Scheme(settings=KPartSettings, build=_build_kpart, tables_bytes=kpart_tables_bytes,
           fit_budget=fit_kpart,
           benchmark={"kpart3": KPartSettings(partitions=3, operation="mult")}),
    Scheme(settings=PEPSettings, build=_build_pep, tables_bytes=pep_tables_bytes,
           fit_budget=fit_pep,
           benchmark={"pep-field-dim": PEPSettings(granularity="field_dimension"),
                      "pep-feature-dim": PEPSettings(granularity="feature_dimension")}),
    Scheme(settings=Int8Settings, build=_build_quantized, tables_bytes=int8_tables_bytes,
           fit_budget=fit_int8, benchmark={"int8": Int8Settings()}),
    Scheme(settings=FP16Settings, build=_build_quantized, tables_bytes=fp16_tables_bytes,
           fit_budget=fit_fp16, benchmark={"fp16": FP16Settings()}),
    Scheme(settings=LMASettings, build=_build_lma, tables_bytes=lma_tables_bytes,
           fit_budget=fit_lma, benchmark={"lma": LMASettings()}, shared_memory=_lma_memory),
    Scheme(settings=RobeSettings, build=_build_robe, tables_bytes=robe_tables_bytes,
           fit_budget=fit_robe, benchmark={"robe": RobeSettings()},
           shared_memory=_robe_memory),
    Scheme(settings=CCESettings, build=_build_cce, tables_bytes=cce_tables_bytes,
           fit_budget=fit_cce, benchmark={"cce": CCESettings()}),
)}


def scheme_of(settings: SchemeSettings) -> Scheme[Any]:
    return SCHEMES[settings.scheme]


def why_full(settings: SchemeSettings, rows: int, dim: int) -> str:
    """Why a table of ``rows`` x ``dim`` configured with ``settings`` stays full ('' when it
    takes its scheme): it is under ``min_rows``, or, with ``min_rows`` unset, the scheme cannot
    shrink it: hashing would leave one bucket (every value alike: the feature erased), or the
    scheme's table would take at least the full table's bytes (QR or int8 of a two-value table,
    LMA's or ROBE's hash metadata alone). Shared-memory schemes are judged on the table alone
    at their compression."""
    if isinstance(settings, FullSettings):
        return ""
    if settings.min_rows is not None:
        return f"under min_rows ({settings.min_rows:,})" if rows < settings.min_rows else ""
    if isinstance(settings, HashSettings) and hash_buckets(rows, settings.compression) < 2:
        return f"hash at {settings.compression:g}x leaves one bucket for all {rows:,} ids"
    if isinstance(settings, CCESettings) and hash_buckets(rows, settings.compression) < 2:
        return f"cce at {settings.compression:g}x leaves one row for all {rows:,} ids"
    full = fp32_bytes(rows, dim)
    try:
        stored = scheme_of(settings).tables_bytes([settings], [rows], dim)
    except ValueError:  # a shared memory whose metadata leave no room for a value
        return (f"{settings.scheme}'s metadata alone exceed the full table ({full:,} bytes) "
                "over its compression")
    if stored >= full:
        return f"{settings.scheme} takes {stored:,} bytes, the full table {full:,}"
    return ""


def effective_settings(settings: SchemeSettings, rows: int, dim: int) -> SchemeSettings:
    """The settings a table of ``rows`` x ``dim`` gets: full where ``why_full`` gives a reason."""
    return FullSettings() if why_full(settings, rows, dim) else settings


@dataclass(frozen=True)
class TableData:
    """What training learnt of the data that some schemes build their tables from, by column
    name: LMA's minhash signatures (``lma.minhash_signatures``), the hybrid's id counts."""

    signatures: Mapping[str, np.ndarray] = field(default_factory=dict)
    counts: Mapping[str, np.ndarray] = field(default_factory=dict)


def build_tables(names: list[str], sizes: list[int], dim: int, config: EmbeddingConfig,
                 data: TableData | None = None) -> list[EmbeddingTable]:
    """Every table of a model, in column order.

    The shared memories are built first, then the tables in column order: the order fixes which
    initial weights a seed gives. LMA tables need their minhash signatures and hybrid tables
    their id counts (``data``); see ``_build_lma`` and ``_build_hybrid`` for when there are
    none.
    """
    data = data or TableData()
    settings = [effective_settings(config.for_table(name), rows, dim)
                for name, rows in zip(names, sizes, strict=True)]
    memories = {}
    for scheme in SCHEMES.values():
        members = [i for i, s in enumerate(settings) if s.scheme == scheme.name]
        if scheme.shared_memory is not None and members:
            shared = _shared_settings(scheme.name, [settings[i] for i in members])
            memories[scheme.name] = scheme.shared_memory(shared, [sizes[i] for i in members], dim)
    return [
        scheme_of(table_settings).build(TableSpec(
            name, column, rows, dim, table_settings, memories.get(table_settings.scheme),
            data.signatures.get(name), data.counts.get(name)))
        for column, (name, rows, table_settings) in enumerate(zip(names, sizes, settings,
                                                                  strict=True))
    ]


def with_hybrid_heads(config: EmbeddingConfig, names: Sequence[str], sizes: Sequence[int],
                      dim: int, counts: Mapping[str, np.ndarray]) -> EmbeddingConfig:
    """``config`` with every hybrid table's head size searched on its training ``counts``
    (``hybrid.head_rows``) and named in its settings, so the checkpoint's configuration
    rebuilds the tables."""
    tables = dict(config.tables)
    for name, rows in zip(names, sizes, strict=True):
        settings = effective_settings(config.for_table(name), rows, dim)
        if isinstance(settings, HybridSettings) and settings.head is None:
            head = head_rows(counts[name], hybrid_rows(rows, settings.compression))
            tables[name] = replace(settings, head=head)
    return EmbeddingConfig(default=config.default, tables=tables)


def _shared_settings(scheme: str, group: list[SchemeSettings]) -> SchemeSettings:
    """The settings of the tables sharing one memory, which must agree (``min_rows`` aside)."""
    first = replace(group[0], min_rows=0)
    if any(replace(settings, min_rows=0) != first for settings in group):
        knobs = [name for name in setting_names(type(first)) if name != "min_rows"]
        raise ValueError(f"all {scheme} tables share one memory: give them the same "
                         f"{', '.join(knobs)}")
    return group[0]
