"""Raw data description shared by readers, the generator, the feature transform and the server.

A data set is a label, some dense (numeric) columns and some categorical columns. Readers turn
files into :class:`RawBatch` chunks; the feature transform turns raw batches into model tensors.
Nothing here imports torch: the server uses the same types.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np

#: How a categorical column's raw values become 64-bit keys (see ``transform.py``):
#: ``int`` parses integers, ``hex`` parses base-16 strings (Criteo's hashed values),
#: ``string`` hashes the text with a fixed, platform-independent hash.
CategoricalKind = Literal["int", "hex", "string"]
CATEGORICAL_KINDS: tuple[str, ...] = ("int", "hex", "string")


@dataclass(frozen=True)
class CategoricalColumn:
    name: str
    kind: CategoricalKind = "string"


@dataclass(frozen=True)
class LabelRule:
    """How a raw label value becomes 0/1.

    With ``threshold`` unset the raw value must be numeric and ``value > 0`` is a click, which
    covers 0/1 and -1/1 labels. With ``threshold`` set, ``value >= threshold`` is positive
    (e.g. a rating of 4 or more).
    """

    column: str
    threshold: float | None = None


@dataclass(frozen=True)
class DatasetSpec:
    """Columns of a data set, in the order the model sees them."""

    label: LabelRule | None
    dense: tuple[str, ...] = ()
    categorical: tuple[CategoricalColumn, ...] = ()
    #: File layout for the generic readers: ``csv`` (with ``delimiter`` and ``header``) or
    #: ``parquet``. Fixed formats (criteo, avazu, libfm) set it to their own name.
    format: str = "csv"
    delimiter: str = ","
    header: bool = True
    #: Raw columns present in the file but not used (e.g. Avazu's row ``id``).
    ignore: tuple[str, ...] = field(default=())

    @property
    def categorical_names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.categorical)

    @property
    def column_names(self) -> tuple[str, ...]:
        return self.dense + self.categorical_names

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DatasetSpec:
        label = data.get("label")
        categorical = []
        for item in data.get("categorical", ()):
            if isinstance(item, str):
                item = {"name": item}
            column = CategoricalColumn(**item)
            if column.kind not in CATEGORICAL_KINDS:
                raise ValueError(
                    f"categorical column {column.name!r}: kind {column.kind!r} is not one of "
                    f"{', '.join(CATEGORICAL_KINDS)}"
                )
            categorical.append(column)
        return cls(
            label=LabelRule(**label) if isinstance(label, dict) else (
                LabelRule(label) if label else None
            ),
            dense=tuple(data.get("dense", ())),
            categorical=tuple(categorical),
            format=data.get("format", "csv"),
            delimiter=data.get("delimiter", ","),
            header=bool(data.get("header", True)),
            ignore=tuple(data.get("ignore", ())),
        )

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> DatasetSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))


@dataclass
class RawBatch:
    """A chunk of raw rows, column by column.

    - ``labels``: float32 [n] of 0/1, or None for unlabeled data.
    - ``dense``: name -> float64 [n]; NaN marks a missing value.
    - ``categorical``: name -> an integer ndarray [n] (no missing values), an integer
      ``numpy.ma.MaskedArray`` [n] (masked values are missing), or an object ndarray [n] whose
      items are ``str``, ``int`` or ``None`` (missing).
    """

    labels: np.ndarray | None
    dense: dict[str, np.ndarray]
    categorical: dict[str, np.ndarray]

    def __len__(self) -> int:
        for column in (*self.dense.values(), *self.categorical.values()):
            return len(column)
        return 0 if self.labels is None else len(self.labels)

    def take(self, rows: np.ndarray) -> RawBatch:
        """Rows selected by a boolean mask or an index array."""
        return RawBatch(
            labels=None if self.labels is None else self.labels[rows],
            dense={name: values[rows] for name, values in self.dense.items()},
            categorical={name: values[rows] for name, values in self.categorical.items()},
        )
