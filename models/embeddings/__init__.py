"""Embedding schemes behind one interface, and the configuration that picks one per table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import numpy as np

from .base import EmbeddingTable
from .compositional import (
    CompositionalTable,
    balanced_radices,
    quotient_remainder_radices,
)
from .full import FullTable
from .hashing import HashedTable
from .lma import LMATable, fallback_signatures, lma_memory_size
from .pep import DEFAULT_THRESHOLD_INIT, PEPTable
from .quantized import KINDS as QUANTIZED_KINDS
from .quantized import QuantizedTable
from .robe import RobeTable, robe_memory_size
from .shared_memory import SharedMemory

#: Schemes whose tables share one memory array per model.
SHARED_SCHEMES: tuple[str, ...] = ("lma", "robe")
SCHEMES: tuple[str, ...] = (
    "full", "hash", "qr", "kpart", "pep", *QUANTIZED_KINDS, *SHARED_SCHEMES
)


@dataclass(frozen=True)
class SchemeConfig:
    """Which scheme a table uses and its settings.

    - ``full``: a plain table.
    - ``hash``: ``id mod ceil(rows / compression)``.
    - ``qr``: quotient-remainder, ``collisions`` ids per quotient row, combined by ``operation``.
    - ``kpart``: ``partitions`` complementary mixed-radix partitions of nearly equal size.
    - ``int8`` / ``fp16``: trained as a full fp32 table, quantized row-wise after training.
    - ``pep``: PEP pruning: soft thresholds at ``granularity`` learnt while a search raises
      them until the PEP tables keep ``pep_keep`` of their values (``drift`` logits of pressure
      per step, see ``embeddings/pep.py``); then the model restarts from its initial weights with
      the found mask fixed.
    - ``lma``: all LMA tables share one memory array ``compression`` times smaller than their
      full tables (signatures included); ``minhashes`` minhashes per value over the co-occurrence
      sets of the first ``sample_rows`` training rows.
    - ``robe``: ROBE-Z, all ROBE tables share one memory array ``compression`` times smaller than
      their full tables; blocks of ``block`` (Z) consecutive coordinates.

    Tables with fewer than ``min_rows`` rows stay full whatever the scheme. ``seed`` seeds the
    hashes of the shared-memory schemes.
    """

    scheme: str = "full"
    min_rows: int = 0
    compression: float = 4.0
    collisions: int = 4
    partitions: int = 3
    operation: str = "mult"
    minhashes: int = 1
    sample_rows: int = 100_000
    block: int = 4
    seed: int = 0
    granularity: str = "field_dimension"
    threshold_init: float = DEFAULT_THRESHOLD_INIT
    pep_keep: float = 0.1
    drift: float = 0.01

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def quantized_after_training(self) -> bool:
        return self.scheme in QUANTIZED_KINDS


@dataclass(frozen=True)
class EmbeddingConfig:
    """A default scheme for every table, with per-table overrides by column name."""

    default: SchemeConfig = field(default_factory=SchemeConfig)
    tables: dict[str, SchemeConfig] = field(default_factory=dict)

    def for_table(self, name: str) -> SchemeConfig:
        return self.tables.get(name, self.default)

    def to_dict(self) -> dict:
        return {
            "default": self.default.to_dict(),
            "tables": {name: c.to_dict() for name, c in self.tables.items()},
        }

    def for_training(self) -> EmbeddingConfig:
        """The same configuration with tables to be quantized after training trained full."""
        def train_as(config: SchemeConfig) -> SchemeConfig:
            return replace(config, scheme="full") if config.quantized_after_training else config

        return EmbeddingConfig(
            default=train_as(self.default),
            tables={name: train_as(c) for name, c in self.tables.items()},
        )

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingConfig:
        default = SchemeConfig(**data.get("default", {}))
        tables = {
            name: replace(default, **settings) for name, settings in data.get("tables", {}).items()
        }
        return cls(default=default, tables=tables)


def effective_scheme(config: SchemeConfig, num_embeddings: int) -> str:
    """The scheme a table of this size gets: small tables stay full."""
    return "full" if num_embeddings < config.min_rows else config.scheme


def build_table(config: SchemeConfig, num_embeddings: int, dim: int) -> EmbeddingTable:
    """A table of a scheme that needs nothing beyond its own settings (not lma or robe)."""
    if effective_scheme(config, num_embeddings) == "full":
        return FullTable(num_embeddings, dim)
    if config.quantized_after_training:
        return QuantizedTable(num_embeddings, dim, config.scheme)
    if config.scheme == "pep":
        return PEPTable(num_embeddings, dim, config.granularity, config.threshold_init)
    if config.scheme == "hash":
        return HashedTable(num_embeddings, dim, math.ceil(num_embeddings / config.compression))
    if config.scheme == "qr":
        radices = quotient_remainder_radices(num_embeddings, config.collisions)
    elif config.scheme == "kpart":
        radices = balanced_radices(num_embeddings, config.partitions)
    else:
        raise ValueError(f"{config.scheme} tables share a memory: build them with build_tables")
    return CompositionalTable(num_embeddings, dim, radices, config.operation)


def _shared_memory(scheme: str, group: list[SchemeConfig], sizes: list[int],
                   dim: int) -> SharedMemory:
    """One memory for every table of ``scheme``; its settings must agree across the group."""
    first = group[0]
    if any((c.compression, c.minhashes, c.block, c.seed) !=
           (first.compression, first.minhashes, first.block, first.seed) for c in group):
        raise ValueError(f"all {scheme} tables share one memory: give them the same compression, "
                         "minhashes, block and seed")
    if scheme == "lma":
        size = lma_memory_size(sizes, dim, first.minhashes, first.compression)
    else:
        size = robe_memory_size(sizes, dim, first.block, first.compression)
    return SharedMemory(size, first.seed)


def build_tables(names: list[str], sizes: list[int], dim: int, config: EmbeddingConfig,
                 signatures: dict[str, np.ndarray] | None = None) -> list[EmbeddingTable]:
    """Every table of a model, in column order.

    LMA tables need their minhash signatures (``lma.minhash_signatures``, by column name); where
    none are given (rebuilding a checkpoint, whose state dict holds them) placeholders of the
    right shape stand in.
    """
    configs = [config.for_table(name) for name in names]
    schemes = [effective_scheme(c, n) for c, n in zip(configs, sizes, strict=True)]
    memories = {}
    for scheme in SHARED_SCHEMES:
        members = [i for i, s in enumerate(schemes) if s == scheme]
        if members:
            memories[scheme] = _shared_memory(
                scheme, [configs[i] for i in members], [sizes[i] for i in members], dim
            )
    tables: list[EmbeddingTable] = []
    for column, (name, size, scheme_config, scheme) in enumerate(
            zip(names, sizes, configs, schemes, strict=True)):
        if scheme == "lma":
            table_signatures = (signatures or {}).get(name)
            if table_signatures is None:
                table_signatures = fallback_signatures(
                    column, np.arange(size), scheme_config.minhashes, scheme_config.seed)
            tables.append(LMATable(size, dim, memories["lma"], table_signatures))
        elif scheme == "robe":
            tables.append(RobeTable(size, dim, memories["robe"], scheme_config.block))
        else:
            tables.append(build_table(scheme_config, size, dim))
    return tables


__all__ = [
    "SCHEMES",
    "CompositionalTable",
    "EmbeddingConfig",
    "EmbeddingTable",
    "FullTable",
    "HashedTable",
    "LMATable",
    "PEPTable",
    "QuantizedTable",
    "RobeTable",
    "SchemeConfig",
    "build_table",
    "build_tables",
    "effective_scheme",
]
