"""Embedding schemes behind one interface, and the configuration that picks one per table."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .base import EmbeddingTable
from .compositional import (
    CompositionalTable,
    balanced_radices,
    quotient_remainder_radices,
)
from .full import FullTable
from .hashing import HashedTable

SCHEMES: tuple[str, ...] = ("full", "hash", "qr", "kpart")


@dataclass(frozen=True)
class SchemeConfig:
    """Which scheme a table uses and its settings.

    - ``full``: a plain table.
    - ``hash``: ``id mod ceil(rows / compression)``.
    - ``qr``: quotient-remainder, ``collisions`` ids per quotient row, combined by ``operation``.
    - ``kpart``: ``partitions`` complementary mixed-radix partitions of nearly equal size.

    Tables with fewer than ``min_rows`` rows stay full whatever the scheme.
    """

    scheme: str = "full"
    min_rows: int = 0
    compression: float = 4.0
    collisions: int = 4
    partitions: int = 3
    operation: str = "mult"

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}")

    def to_dict(self) -> dict:
        return asdict(self)


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

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingConfig:
        default = SchemeConfig(**data.get("default", {}))
        tables = {
            name: replace(default, **settings) for name, settings in data.get("tables", {}).items()
        }
        return cls(default=default, tables=tables)


def build_table(config: SchemeConfig, num_embeddings: int, dim: int) -> EmbeddingTable:
    if config.scheme == "full" or num_embeddings < config.min_rows:
        return FullTable(num_embeddings, dim)
    if config.scheme == "hash":
        return HashedTable(num_embeddings, dim, math.ceil(num_embeddings / config.compression))
    if config.scheme == "qr":
        radices = quotient_remainder_radices(num_embeddings, config.collisions)
    else:
        radices = balanced_radices(num_embeddings, config.partitions)
    return CompositionalTable(num_embeddings, dim, radices, config.operation)


__all__ = [
    "SCHEMES",
    "CompositionalTable",
    "EmbeddingConfig",
    "EmbeddingTable",
    "FullTable",
    "HashedTable",
    "SchemeConfig",
    "build_table",
]
