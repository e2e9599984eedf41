"""Each embedding scheme's settings, one small frozen dataclass per scheme, and the configuration
that picks a scheme per table (``EmbeddingConfig``).

Every settings type has ``min_rows`` (which tables stay full, whatever the scheme) and only its
own scheme's knobs; ``SETTINGS`` lists them by scheme name. What a scheme does with its settings
(its tables, bytes and budget search, and which tables it cannot shrink) is in
``models/schemes.py``; this module imports no torch, so the CLI can offer the scheme names to
every command, the server's included.

In JSON a table's settings are one record, ``{"scheme": "qr", "collisions": 4, "min_rows":
2000}``, and a model's embeddings are ``{"default": record, "tables": {"C5": record, ...}}``. A
table's record overrides the default's: the scheme and every setting it does not name come from
the default, where its scheme has a setting of that name. A setting the scheme does not have is
a ValueError naming the scheme and its settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, ClassVar

from .constants import INIT_STD

#: PEP's ``s0`` with ``sigmoid(s0) = INIT_STD / 100``: a threshold far under the values' scale
#: (see ``embeddings/pep.py``).
DEFAULT_THRESHOLD_INIT = math.log((INIT_STD / 100) / (1 - INIT_STD / 100))


@dataclass(frozen=True, kw_only=True)
class SchemeSettings:
    """What every scheme has: which tables stay full.

    ``min_rows`` None (the default): a table stays full when the scheme cannot shrink it (a
    two-value table hashed into one bucket, a QR table larger than the full one;
    ``schemes.why_full``). A number: tables with fewer rows stay full and every other table
    takes the scheme (0: every table, even one the scheme makes larger).
    """

    scheme: ClassVar[str]
    min_rows: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"scheme": self.scheme, **asdict(self)}


@dataclass(frozen=True, kw_only=True)
class FullSettings(SchemeSettings):
    """A plain fp32 table."""

    scheme: ClassVar[str] = "full"


@dataclass(frozen=True, kw_only=True)
class HashSettings(SchemeSettings):
    """The hashing trick: ``id mod ceil(rows / compression)``."""

    scheme: ClassVar[str] = "hash"
    compression: float = 4.0


@dataclass(frozen=True, kw_only=True)
class HybridSettings(SchemeSettings):
    """Frequency-aware hybrid: ``ceil(rows / compression)`` rows, of which ``head`` are full
    rows for the ids counted most often in training and the rest a quotient-remainder table for
    the other ids (``embeddings/hybrid.py``). ``head`` None (the default): training searches the
    split on the training counts and records it here, so a checkpoint rebuilds its tables. A
    table never gets fewer rows than a head row and the smallest tail (about ``2 sqrt(n)``)."""

    scheme: ClassVar[str] = "hybrid"
    compression: float = 4.0
    head: int | None = None


@dataclass(frozen=True, kw_only=True)
class QRSettings(SchemeSettings):
    """Quotient-remainder: ``collisions`` ids per quotient row, the two rows combined by
    ``operation`` (``mult``, ``add`` or ``concat``)."""

    scheme: ClassVar[str] = "qr"
    collisions: int = 4
    operation: str = "mult"


@dataclass(frozen=True, kw_only=True)
class KPartSettings(SchemeSettings):
    """``partitions`` complementary mixed-radix partitions of nearly equal size, combined by
    ``operation``."""

    scheme: ClassVar[str] = "kpart"
    partitions: int = 3
    operation: str = "mult"


@dataclass(frozen=True, kw_only=True)
class PEPSettings(SchemeSettings):
    """PEP pruning: soft thresholds at ``granularity``, starting at logit ``threshold_init``,
    learnt while a search raises them (``drift`` logits of pressure per step) until the model's
    tables keep ``pep_keep`` of their values; then the model restarts from its initial weights
    with the found mask fixed (``embeddings/pep.py``, ``models/pep_search.py``)."""

    scheme: ClassVar[str] = "pep"
    granularity: str = "field_dimension"
    threshold_init: float = DEFAULT_THRESHOLD_INIT
    pep_keep: float = 0.1
    drift: float = 0.01


@dataclass(frozen=True, kw_only=True)
class QuantizedSettings(SchemeSettings):
    """Trained as a full fp32 table and quantized row-wise after training
    (``embeddings/quantized.py``)."""


@dataclass(frozen=True, kw_only=True)
class Int8Settings(QuantizedSettings):
    """Row-wise asymmetric uint8 codes with an fp32 scale and offset per row."""

    scheme: ClassVar[str] = "int8"


@dataclass(frozen=True, kw_only=True)
class FP16Settings(QuantizedSettings):
    """The weights stored as float16."""

    scheme: ClassVar[str] = "fp16"


@dataclass(frozen=True, kw_only=True)
class SharedMemorySettings(SchemeSettings):
    """All the model's tables of the scheme share one memory array ``compression`` times
    smaller than their full tables (metadata included); ``seed`` seeds the location hashes.
    The settings of every table sharing the memory must agree.

    ``seed`` None (the default) takes the training seed (``EmbeddingConfig.with_seed``), so
    trainings with different seeds hash differently and their spread shows the hashes' share;
    tables built outside training with no seed use 0 (``hash_seed``).
    """

    compression: float = 4.0
    seed: int | None = None

    @property
    def hash_seed(self) -> int:
        return 0 if self.seed is None else self.seed


@dataclass(frozen=True, kw_only=True)
class LMASettings(SharedMemorySettings):
    """LMA: ``minhashes`` minhashes per value over the co-occurrence sets of the first
    ``sample_rows`` training rows."""

    scheme: ClassVar[str] = "lma"
    minhashes: int = 1
    sample_rows: int = 100_000


@dataclass(frozen=True, kw_only=True)
class RobeSettings(SharedMemorySettings):
    """ROBE-Z: blocks of ``block`` (Z) consecutive coordinates."""

    scheme: ClassVar[str] = "robe"
    block: int = 4


@dataclass(frozen=True, kw_only=True)
class CCESettings(SchemeSettings):
    """Clustered compositional embeddings (``embeddings/cce.py``): ``ceil(rows / compression)``
    rows (k) in each of two parts, each vector in ``chunks`` chunks (the width must be a
    multiple), re-clustered every ``recluster_every`` optimizer steps, at most ``reclusters``
    times; ``seed`` seeds the pointers, hashes and k-means samples (None: the training seed,
    as ``SharedMemorySettings.seed``).

    The schedule suits trainings of 140 to 500 steps: the first round at step 50, when training
    has moved the vectors away from their random start, so clusters group ids that behave
    alike; the second at step 100, on vectors trained from the first clustering; and at least
    40 steps after the last round for part 1 (restarted from the residuals under a new hash) to
    settle. More rounds would leave the shortest trainings no steps to settle.
    """

    scheme: ClassVar[str] = "cce"
    compression: float = 4.0
    chunks: int = 1
    recluster_every: int = 50
    reclusters: int = 2
    seed: int | None = None

    @property
    def hash_seed(self) -> int:
        return 0 if self.seed is None else self.seed


#: Every scheme's settings type, by scheme name.
SETTINGS: dict[str, type[SchemeSettings]] = {
    settings.scheme: settings
    for settings in (FullSettings, HashSettings, HybridSettings, QRSettings, KPartSettings,
                     PEPSettings, Int8Settings, FP16Settings, LMASettings, RobeSettings,
                     CCESettings)
}

#: Checkpoints written before the settings were split by scheme hold one flat record per table
#: naming every setting of every scheme (at least these, the first ones there were); only the
#: record's own scheme's settings are read from such a record.
FLAT_RECORD_FIELDS = frozenset(
    {"scheme", "min_rows", "compression", "collisions", "partitions", "operation"})


def setting_names(settings: type[SchemeSettings]) -> list[str]:
    """The settings of a scheme, ``min_rows`` first."""
    return [f.name for f in fields(settings)]


def settings_from_dict(record: Mapping[str, Any],
                       inherit: SchemeSettings | None = None) -> SchemeSettings:
    """The settings a JSON record names (``{"scheme": name, **settings}``). With ``inherit`` (the
    default, for a table's record) the scheme and every setting the record does not name come
    from ``inherit``, where the record's scheme has a setting of that name."""
    values = dict(record)
    name = values.pop("scheme", inherit.scheme if inherit else FullSettings.scheme)
    if name not in SETTINGS:
        raise ValueError(f"unknown scheme {name!r}; choose one of {', '.join(SETTINGS)}")
    settings_type = SETTINGS[name]
    known = setting_names(settings_type)
    if record.keys() >= FLAT_RECORD_FIELDS:
        values = {key: value for key, value in values.items() if key in known}
    unknown = [key for key in values if key not in known]
    if unknown:
        raise ValueError(f"scheme {name!r} has no setting {', '.join(map(repr, unknown))}; "
                         f"its settings: {', '.join(known)}")
    inherited = {}
    if inherit is not None:
        inherited = {key: value for key, value in asdict(inherit).items() if key in known}
    return settings_type(**{**inherited, **values})


@dataclass(frozen=True)
class EmbeddingConfig:
    """A default scheme for every table, with per-table overrides by column name."""

    default: SchemeSettings = field(default_factory=FullSettings)
    tables: Mapping[str, SchemeSettings] = field(default_factory=dict)

    def for_table(self, name: str) -> SchemeSettings:
        return self.tables.get(name, self.default)

    def to_dict(self) -> dict:
        return {
            "default": self.default.to_dict(),
            "tables": {name: settings.to_dict() for name, settings in self.tables.items()},
        }

    def with_seed(self, seed: int) -> EmbeddingConfig:
        """The same configuration with shared-memory and CCE hashes left unseeded seeded by
        ``seed``."""
        def seeded(settings: SchemeSettings) -> SchemeSettings:
            if isinstance(settings, SharedMemorySettings | CCESettings) and settings.seed is None:
                return replace(settings, seed=seed)
            return settings

        return EmbeddingConfig(default=seeded(self.default),
                               tables={name: seeded(s) for name, s in self.tables.items()})

    def for_training(self) -> EmbeddingConfig:
        """The same configuration with tables to be quantized after training trained full."""
        def train_as(settings: SchemeSettings) -> SchemeSettings:
            if isinstance(settings, QuantizedSettings):
                return FullSettings(min_rows=settings.min_rows)
            return settings

        return EmbeddingConfig(
            default=train_as(self.default),
            tables={name: train_as(settings) for name, settings in self.tables.items()},
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EmbeddingConfig:
        default = settings_from_dict(data.get("default", {}))
        tables = {name: settings_from_dict(record, inherit=default)
                  for name, record in data.get("tables", {}).items()}
        return cls(default=default, tables=tables)
