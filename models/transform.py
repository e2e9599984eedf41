"""The feature transform: raw rows -> (dense float32 [N, n_dense], sparse int64 [N, n_tables]).

One implementation, used by training and by the server alike (numpy only, never torch).

Categorical columns map each value to a key (``keys.py``), then to an id:

- ``vocab``: a vocabulary fit on training data, stored as a sorted uint64 array of keys and looked
  up by binary search. Id 0 is "missing", id 1 "out of vocabulary" (unseen, or seen fewer than
  ``min_frequency`` times), ids 2.. the vocabulary in key order.
- ``hash``: a seeded hash of the key into ``buckets`` ids; id 0 is "missing", 1..buckets-1 hashed.

Dense columns: a missing value becomes ``fill``, then ``log`` applies ``sign(x) * log(1 + |x|)``
(Criteo's ``log(1 + x)``, extended to negative counts).

A fitted transform is saved as ``transform.json`` plus ``vocabulary.npz`` (plain arrays, loaded
with ``allow_pickle=False``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .keys import seeded_hash, to_keys
from .schema import CategoricalColumn, DatasetSpec, RawBatch

MISSING_ID = 0
OOV_ID = 1
RESERVED_IDS = 2
FORMAT_VERSION = 1


@dataclass
class CategoricalEncoder:
    column: CategoricalColumn
    mode: Literal["vocab", "hash"]
    #: vocab mode: sorted unique keys kept in the vocabulary.
    vocabulary: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))
    #: hash mode: size of the id space (ids 0..buckets-1).
    buckets: int = 0
    seed: int = 0

    @property
    def num_ids(self) -> int:
        """Rows the embedding table for this column needs."""
        if self.mode == "vocab":
            return RESERVED_IDS + len(self.vocabulary)
        return self.buckets

    def encode(self, raw: np.ndarray) -> np.ndarray:
        keys, missing = to_keys(self.column.name, self.column.kind, raw)
        if self.mode == "hash":
            ids = (seeded_hash(keys, self.seed) % np.uint64(self.buckets - 1)).astype(np.int64) + 1
        else:
            position = np.searchsorted(self.vocabulary, keys)
            found = position < len(self.vocabulary)
            found[found] = self.vocabulary[position[found]] == keys[found]
            ids = np.where(found, position + RESERVED_IDS, OOV_ID).astype(np.int64)
        ids[missing] = MISSING_ID
        return ids


@dataclass
class DenseEncoder:
    name: str
    fill: float = 0.0
    log: bool = True

    def encode(self, raw: np.ndarray) -> np.ndarray:
        values = np.asarray(raw, dtype=np.float64)
        values = np.where(np.isnan(values), self.fill, values)
        if self.log:
            values = np.sign(values) * np.log1p(np.abs(values))
        return values.astype(np.float32)


@dataclass
class TransformedBatch:
    dense: np.ndarray  # float32 [N, n_dense]
    sparse: np.ndarray  # int64 [N, n_tables]
    labels: np.ndarray | None  # float32 [N]

    def __len__(self) -> int:
        return len(self.sparse)

    def training_labels(self) -> np.ndarray:
        """``labels``, which training needs."""
        if self.labels is None:
            raise ValueError("training rows need labels")
        return self.labels


@dataclass
class FeatureTransform:
    spec: DatasetSpec
    dense: list[DenseEncoder]
    categorical: list[CategoricalEncoder]

    @property
    def table_sizes(self) -> list[int]:
        return [encoder.num_ids for encoder in self.categorical]

    @property
    def n_dense(self) -> int:
        return len(self.dense)

    @property
    def unseen_ids(self) -> np.ndarray:
        """The id each table gives a value absent from training: out-of-vocabulary in a
        vocabulary column; a hashed column has no such id (the value hashes like any other),
        so there it is the missing id."""
        return np.array([OOV_ID if e.mode == "vocab" else MISSING_ID for e in self.categorical],
                        dtype=np.int64)

    def unseen_counts(self, sparse: np.ndarray) -> np.ndarray:
        """How many of each row's values were absent from training (vocabulary columns)."""
        vocabulary = np.array([e.mode == "vocab" for e in self.categorical], dtype=bool)
        return (sparse[:, vocabulary] == OOV_ID).sum(axis=1)

    @cached_property
    def column_names(self) -> frozenset[str]:
        """The raw columns the transform reads, dense and categorical."""
        return frozenset([*(e.name for e in self.dense),
                          *(e.column.name for e in self.categorical)])

    def transform(self, batch: RawBatch) -> TransformedBatch:
        n = len(batch)
        dense = np.zeros((n, self.n_dense), dtype=np.float32)
        for index, encoder in enumerate(self.dense):
            if encoder.name in batch.dense:
                dense[:, index] = encoder.encode(batch.dense[encoder.name])
            else:
                dense[:, index] = encoder.encode(np.full(n, np.nan))
        sparse = np.zeros((n, len(self.categorical)), dtype=np.int64)
        for index, categorical in enumerate(self.categorical):
            raw = batch.categorical.get(categorical.column.name)
            sparse[:, index] = MISSING_ID if raw is None else categorical.encode(raw)
        return TransformedBatch(dense=dense, sparse=sparse, labels=batch.labels)

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        description = {
            "format_version": FORMAT_VERSION,
            "spec": self.spec.to_dict(),
            "dense": [{"name": e.name, "fill": e.fill, "log": e.log} for e in self.dense],
            "categorical": [
                {
                    "name": e.column.name,
                    "kind": e.column.kind,
                    "mode": e.mode,
                    "buckets": e.buckets,
                    "seed": e.seed,
                    "num_ids": e.num_ids,
                }
                for e in self.categorical
            ],
        }
        (directory / "transform.json").write_text(json.dumps(description, indent=2) + "\n")
        # Any: mypy would also match the unpacked arrays against savez's ``allow_pickle: bool``.
        vocabularies: dict[str, Any] = {
            f"c{i}": e.vocabulary for i, e in enumerate(self.categorical)}
        np.savez(directory / "vocabulary.npz", **vocabularies)

    @classmethod
    def load(cls, directory: str | Path) -> FeatureTransform:
        directory = Path(directory)
        description = json.loads((directory / "transform.json").read_text())
        if description.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{directory / 'transform.json'}: unsupported format_version "
                f"{description.get('format_version')!r} (this version reads {FORMAT_VERSION})"
            )
        with np.load(directory / "vocabulary.npz", allow_pickle=False) as arrays:
            categorical = [
                CategoricalEncoder(
                    column=CategoricalColumn(item["name"], item["kind"]),
                    mode=item["mode"],
                    vocabulary=arrays[f"c{i}"].astype(np.uint64),
                    buckets=int(item["buckets"]),
                    seed=int(item["seed"]),
                )
                for i, item in enumerate(description["categorical"])
            ]
        return cls(
            spec=DatasetSpec.from_dict(description["spec"]),
            dense=[DenseEncoder(**item) for item in description["dense"]],
            categorical=categorical,
        )


class _KeyCounter:
    """Streaming count of distinct keys: chunk-level uniques, merged when they pile up."""

    def __init__(self) -> None:
        self.keys = np.zeros(0, dtype=np.uint64)
        self.counts = np.zeros(0, dtype=np.int64)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_size = 0

    def add(self, keys: np.ndarray) -> None:
        unique, counts = np.unique(keys, return_counts=True)
        self._pending.append((unique, counts))
        self._pending_size += len(unique)
        if self._pending_size > max(len(self.keys), 1 << 20):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = np.concatenate([self.keys, *(k for k, _ in self._pending)])
        counts = np.concatenate([self.counts, *(c for _, c in self._pending)])
        self.keys, inverse = np.unique(keys, return_inverse=True)
        self.counts = np.bincount(inverse, weights=counts).astype(np.int64)
        self._pending, self._pending_size = [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge()
        return self.keys, self.counts


@dataclass
class TransformConfig:
    """How to fit a transform. ``hash_buckets`` > 0 hashes every categorical column instead of
    fitting vocabularies; ``max_vocabulary`` keeps only the most frequent values of a column."""

    min_frequency: int = 1
    max_vocabulary: int | None = None
    hash_buckets: int = 0
    hash_seed: int = 0
    dense_log: bool = True
    dense_fill: float = 0.0


#: Each categorical column's distinct keys (sorted) and how often each occurs, by column name.
KeyCounts = dict[str, tuple[np.ndarray, np.ndarray]]


def fit_transform(
    spec: DatasetSpec, batches: Iterable[RawBatch], config: TransformConfig
) -> FeatureTransform:
    """Fits vocabularies in one streaming pass over ``batches`` (not read with
    ``hash_buckets``)."""
    counts = {} if config.hash_buckets else count_keys(spec, batches)
    return transform_from_counts(spec, counts, config)


def count_keys(spec: DatasetSpec, batches: Iterable[RawBatch]) -> KeyCounts:
    """The keys of ``batches``' categorical values and how often each occurs, in one pass."""
    counters = {column.name: _KeyCounter() for column in spec.categorical}
    for batch in batches:
        for column in spec.categorical:
            keys, missing = to_keys(column.name, column.kind, batch.categorical[column.name])
            counters[column.name].add(keys[~missing])
    return {name: counter.result() for name, counter in counters.items()}


def merge_counts(parts: list[KeyCounts]) -> KeyCounts:
    """The counts of several ``count_keys`` passes added up: those of all their rows."""
    merged = {}
    for name in parts[0]:
        keys, inverse = np.unique(np.concatenate([part[name][0] for part in parts]),
                                  return_inverse=True)
        counts = np.concatenate([part[name][1] for part in parts])
        merged[name] = (keys, np.bincount(inverse, weights=counts,
                                          minlength=len(keys)).astype(np.int64))
    return merged


def transform_from_counts(spec: DatasetSpec, counts: KeyCounts,
                          config: TransformConfig) -> FeatureTransform:
    """The transform ``config`` makes of the key ``counts`` (``count_keys``; not read with
    ``hash_buckets``)."""
    dense = [DenseEncoder(name, config.dense_fill, config.dense_log) for name in spec.dense]
    if config.hash_buckets:
        if config.hash_buckets < 2:
            raise ValueError("hash_buckets must be at least 2 (id 0 is reserved for missing)")
        categorical = [
            CategoricalEncoder(column, "hash", buckets=config.hash_buckets, seed=config.hash_seed)
            for column in spec.categorical
        ]
        return FeatureTransform(spec, dense, categorical)
    categorical = []
    for column in spec.categorical:
        keys, occurrences = counts[column.name]
        keep = occurrences >= config.min_frequency
        keys, occurrences = keys[keep], occurrences[keep]
        if config.max_vocabulary is not None and len(keys) > config.max_vocabulary:
            most_frequent = np.argsort(-occurrences, kind="stable")[: config.max_vocabulary]
            keys = np.sort(keys[most_frequent])
        categorical.append(CategoricalEncoder(column, "vocab", vocabulary=keys))
    return FeatureTransform(spec, dense, categorical)
