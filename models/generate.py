"""Deterministic synthetic click-through data.

Two generators:

* **Criteo-like** rows (:func:`iter_criteo_like`, :func:`write_criteo_like`): count-like dense
  columns and categorical columns whose ids follow a bounded Zipf law over tables as large as
  Criteo's. The click logit adds a linear effect of ``log1p(dense)``, optionally a hidden intent
  that the dense values partly reveal, a random effect per categorical id (larger for larger
  tables, so compressing those tables costs accuracy, as in real data) and a few pairwise id
  interactions. Per-id effects are never stored: they are a hash of (seed, column, id), so any
  chunk can be made on its own, whatever the table sizes.
* **Entity** data (:func:`write_entities`, :func:`iter_entity_joined`): user and item tables and
  interactions that reference them, for a feature store that joins features at serving time.

Rows are made in chunks of :data:`CHUNK_ROWS` from a random generator keyed by (seed, chunk
index), so row ``i`` depends only on the configuration and ``i``: neither on ``n_rows`` nor on
the batch size a caller asks for. The intercept is calibrated once, on chunk 0, to hit the
target CTR.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from pathlib import Path
from statistics import NormalDist

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from .evaluation_metrics import log_loss, roc_auc
from .keys import splitmix64
from .schema import CategoricalColumn, CategoricalKind, DatasetSpec, LabelRule, RawBatch

#: Rows per internal chunk (and per parquet row group). Fixed: changing it changes the data.
CHUNK_ROWS = 65_536
#: The oracle AUC needs all scores in memory; above this many rows it uses the first ones.
ORACLE_AUC_MAX_ROWS = 2_000_000

#: Sizes of the 26 categorical tables of the Criteo Kaggle (Display Advertising Challenge) data.
CRITEO_CARDINALITIES: tuple[int, ...] = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)

# Independent random streams derived from one seed.
_STREAM_PARAMETERS = 0
_STREAM_CRITEO_ROWS = 1
_STREAM_ENTITY_TABLES = 2
_STREAM_INTERACTIONS = 3
_STREAM_ID_HASH = 4

_INTENT_DIM = 3
_MAX_CARDINALITY = 2**31  # keeps rank * multiplier inside int64


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _hash_key(*parts: int) -> int:
    """A 64-bit key mixed from integers (seed, stream, column, ...)."""
    key = np.zeros(1, dtype=np.uint64)
    for part in parts:
        key = splitmix64(key ^ np.uint64(part % 2**64))
    return int(key[0])


@cache
def _normal_quantiles() -> np.ndarray:
    """Standard normal quantiles at the centres of 2**16 equal-probability bins."""
    normal = NormalDist()
    return np.array([normal.inv_cdf((k + 0.5) / 2**16) for k in range(2**16)])


def _hashed_normals(ids: np.ndarray, key: int, count: int) -> np.ndarray:
    """``count`` standard normals per id, a pure function of (key, id): shape [count, n].

    Each 64-bit hash has four 16-bit fields; each field picks a quantile of the normal
    distribution (an inverse-CDF draw discretised to 2**16 levels). Table look-ups are several
    times faster than Box-Muller's trigonometry here.
    """
    bits = ids.astype(np.uint64)
    table = _normal_quantiles()
    out = np.empty((count, len(ids)))
    for start in range(0, count, 4):
        hashed = splitmix64(bits ^ np.uint64(_hash_key(key, start)))
        for j in range(start, min(count, start + 4)):
            field = (hashed >> np.uint64(16 * (j - start))) & np.uint64(0xFFFF)
            out[j] = table.take(field.astype(np.intp))
    return out


def _zipf_ranks(uniform: np.ndarray, size: int, exponent: float) -> np.ndarray:
    """Ranks in [0, size) with P(rank r) roughly proportional to (r + 1) ** -exponent.

    Inverse CDF of a continuous power law on [1, size + 1), floored: O(1) per draw for any
    table size, unlike sampling from an explicit probability vector.
    """
    if abs(exponent - 1.0) < 1e-9:
        x = np.exp(uniform * math.log(size + 1.0))
    else:
        power = 1.0 - exponent
        x = (1.0 + uniform * ((size + 1.0) ** power - 1.0)) ** (1.0 / power)
    return np.minimum(x.astype(np.int64) - 1, size - 1)  # x >= 1 exactly, so ranks >= 0


def _id_bijection(size: int, key: int) -> tuple[int, int]:
    """Multiplier and offset of rank -> (rank * multiplier + offset) % size, a bijection.

    It scatters the popular ranks over the table instead of leaving them at ids 0, 1, 2...
    """
    multiplier = 1
    if size > 2:
        multiplier = 1 + key % (size - 1)
        while math.gcd(multiplier, size) != 1:
            multiplier = multiplier % (size - 1) + 1
    return multiplier, _hash_key(key, 1) % size


def _calibrate_bias(raw_logits: np.ndarray, target_ctr: float) -> float:
    """The intercept b with mean(sigmoid(b + raw_logits)) == target_ctr (bisection)."""
    low, high = -30.0, 30.0
    for _ in range(50):
        middle = (low + high) / 2
        if _sigmoid(middle + raw_logits).mean() < target_ctr:
            low = middle
        else:
            high = middle
    return (low + high) / 2


# Internal chunks are dicts of arrays whose last axis is the row axis.
_Rows = dict[str, np.ndarray]


def _row_count(rows: _Rows) -> int:
    return next(iter(rows.values())).shape[-1]


def _slice_rows(rows: _Rows, start: int, stop: int) -> _Rows:
    return {name: values[..., start:stop] for name, values in rows.items()}


def _concat_rows(parts: list[_Rows]) -> _Rows:
    if len(parts) == 1:
        return parts[0]
    return {name: np.concatenate([part[name] for part in parts], axis=-1) for name in parts[0]}


def _chunks(make_chunk: Callable[[int], _Rows], n_rows: int) -> Iterator[_Rows]:
    """Chunks 0, 1, ... covering ``n_rows`` rows; the last one cut short."""
    for index in range(-(-n_rows // CHUNK_ROWS)):
        rows = make_chunk(index)
        yield _slice_rows(rows, 0, min(CHUNK_ROWS, n_rows - index * CHUNK_ROWS))


def _rebatch(chunks: Iterator[_Rows], batch_rows: int) -> Iterator[_Rows]:
    """Regroups chunks into batches of ``batch_rows`` rows (the last may be shorter)."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    pending: list[_Rows] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += _row_count(chunk)
        if count < batch_rows:
            continue
        merged = _concat_rows(pending)
        start = 0
        while count - start >= batch_rows:
            yield _slice_rows(merged, start, start + batch_rows)
            start += batch_rows
        pending = [_slice_rows(merged, start, count)] if start < count else []
        count -= start
    if pending:
        yield _concat_rows(pending)


@dataclass
class _Oracle:
    """Running CTR and log loss of the true probabilities; AUC over the first rows."""

    rows: int = 0
    clicks: float = 0.0
    loss_sum: float = 0.0
    labels: list[np.ndarray] = field(default_factory=list)
    probabilities: list[np.ndarray] = field(default_factory=list)

    def add(self, labels: np.ndarray, probabilities: np.ndarray) -> None:
        n = len(labels)
        kept = sum(len(part) for part in self.labels)
        take = min(n, ORACLE_AUC_MAX_ROWS - kept)
        if take > 0:
            self.labels.append(labels[:take])
            self.probabilities.append(probabilities[:take])
        self.rows += n
        self.clicks += float(labels.sum())
        self.loss_sum += log_loss(labels, probabilities) * n

    def summary(self) -> dict:
        labels = np.concatenate(self.labels) if self.labels else np.zeros(0)
        probabilities = np.concatenate(self.probabilities) if self.labels else np.zeros(0)
        auc = roc_auc(labels, probabilities)  # NaN without both classes
        return {
            "rows": self.rows,
            "ctr": self.clicks / self.rows if self.rows else None,
            "oracle_auc": None if math.isnan(auc) else auc,
            "oracle_auc_rows": len(labels),
            "oracle_logloss": self.loss_sum / self.rows if self.rows else None,
        }


# --------------------------------------------------------------------------------------------
# Criteo-like rows
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CriteoLikeConfig:
    """Shape and signal of Criteo-like data. Effects are standard deviations on the logit."""

    n_rows: int = 1_000_000
    #: One table size per categorical column C1, C2, ...
    cardinalities: tuple[int, ...] = CRITEO_CARDINALITIES
    n_dense: int = 13
    zipf_exponent: float = 1.1
    seed: int = 0
    dense_missing_rate: float = 0.02
    categorical_missing_rate: float = 0.01
    target_ctr: float = 0.23
    #: Linear effect of the standardised log1p(dense) values.
    dense_effect: float = 1.0
    #: Weight of a hidden per-row intent in the logit; each dense column is correlated with the
    #: intent to a different degree. Off by default: a hidden term puts the oracle (which knows
    #: it) out of reach of any model, so the oracle AUC would no longer be an attainable target.
    intent_effect: float = 0.0
    #: Per-id effect of the largest table; a table of size c gets this times
    #: (log c / log largest) ** 2, so large tables carry most of the id signal.
    categorical_effect: float = 0.4
    #: Dot products of per-id latent vectors of ``n_interactions`` column pairs.
    interaction_effect: float = 0.4
    n_interactions: int = 4
    interaction_dim: int = 4

    def __post_init__(self) -> None:
        object.__setattr__(self, "cardinalities", tuple(int(c) for c in self.cardinalities))
        if self.n_rows < 0 or self.n_dense < 0 or self.seed < 0:
            raise ValueError("n_rows, n_dense and seed must be non-negative")
        if any(not 1 <= size <= _MAX_CARDINALITY for size in self.cardinalities):
            raise ValueError(f"cardinalities must lie in [1, {_MAX_CARDINALITY}]")
        if not (0 <= self.dense_missing_rate < 1 and 0 <= self.categorical_missing_rate < 1):
            raise ValueError("missing rates must lie in [0, 1)")
        if not 0 < self.target_ctr < 1:
            raise ValueError("target_ctr must lie in (0, 1)")
        if self.zipf_exponent <= 0 or self.interaction_dim < 1 or self.n_interactions < 0:
            raise ValueError("zipf_exponent, interaction_dim must be positive; n_interactions >= 0")


def scaled_cardinalities(scale: float, minimum: int = 2) -> tuple[int, ...]:
    """Criteo's table sizes divided by ``scale`` (rounded up), for small tests and benchmarks.

    No table goes below ``minimum``, and tables already smaller than that keep their size.
    """
    if scale < 1:
        raise ValueError(f"scale must be at least 1, got {scale}")
    return tuple(
        max(math.ceil(size / scale), min(size, minimum)) for size in CRITEO_CARDINALITIES
    )


def criteo_like_spec(config: CriteoLikeConfig) -> DatasetSpec:
    return DatasetSpec(
        label=LabelRule("label"),
        dense=tuple(f"I{j + 1}" for j in range(config.n_dense)),
        categorical=tuple(
            CategoricalColumn(f"C{c + 1}", "int") for c in range(len(config.cardinalities))
        ),
        format="parquet",
    )


@dataclass(frozen=True, eq=False)
class _CriteoModel:
    """Everything a chunk needs, derived once from the configuration."""

    config: CriteoLikeConfig
    multipliers: tuple[int, ...]
    offsets: tuple[int, ...]
    effect_keys: tuple[int, ...]
    latent_keys: tuple[int, ...]
    effect_scales: np.ndarray  # [n_categorical]
    pairs: tuple[tuple[int, int], ...]
    dense_mu: np.ndarray  # [n_dense] log-scale location
    dense_sigma: np.ndarray  # [n_dense] log-scale spread; large values give heavy tails
    dense_loadings: np.ndarray  # [n_dense, intent_dim], unit rows
    dense_rho: np.ndarray  # [n_dense] correlation of each column with the intent
    dense_weights: np.ndarray  # [n_dense]
    intent_direction: np.ndarray  # [intent_dim], unit
    bias: float = 0.0


def _criteo_model(config: CriteoLikeConfig) -> _CriteoModel:
    rng = np.random.default_rng([config.seed, _STREAM_PARAMETERS])
    n_dense = config.n_dense
    loadings = rng.standard_normal((n_dense, _INTENT_DIM))
    loadings /= np.linalg.norm(loadings, axis=1, keepdims=True)
    # About a third of the dense columns carry no direct label effect.
    weights = rng.standard_normal(n_dense) * (rng.random(n_dense) < 0.7)
    if np.any(weights):
        weights *= config.dense_effect / np.linalg.norm(weights)
    direction = rng.standard_normal(_INTENT_DIM)
    direction /= np.linalg.norm(direction)

    sizes = config.cardinalities
    largest = max(sizes, default=1)
    scales = np.array(
        [math.log(size) / math.log(largest) if largest > 1 else 0.0 for size in sizes]
    )
    keys = [_hash_key(config.seed, _STREAM_ID_HASH, column) for column in range(len(sizes))]
    bijections = [_id_bijection(size, key) for size, key in zip(sizes, keys, strict=True)]
    # Interactions pair the largest tables: 1st with 2nd, 3rd with 4th, ...
    by_size = sorted(range(len(sizes)), key=lambda column: -sizes[column])
    n_pairs = min(config.n_interactions, len(sizes) // 2)
    pairs = tuple((by_size[2 * k], by_size[2 * k + 1]) for k in range(n_pairs))

    model = _CriteoModel(
        config=config,
        multipliers=tuple(multiplier for multiplier, _ in bijections),
        offsets=tuple(offset for _, offset in bijections),
        effect_keys=tuple(_hash_key(key, 2) for key in keys),
        latent_keys=tuple(_hash_key(key, 3) for key in keys),
        effect_scales=config.categorical_effect * scales**2,
        pairs=pairs,
        dense_mu=rng.uniform(0.0, 5.0, n_dense),
        dense_sigma=rng.uniform(0.5, 2.0, n_dense),
        dense_loadings=loadings,
        dense_rho=rng.uniform(0.0, 0.9, n_dense),
        dense_weights=weights,
        intent_direction=direction,
    )
    pilot = _criteo_chunk(model, 0)
    return replace(model, bias=_calibrate_bias(pilot["logit"], config.target_ctr))


def _criteo_chunk(model: _CriteoModel, index: int) -> _Rows:
    """All CHUNK_ROWS rows of chunk ``index``: label, logit, prob, dense, ids, missing."""
    config = model.config
    rng = np.random.default_rng([config.seed, _STREAM_CRITEO_ROWS, index])
    n = CHUNK_ROWS
    n_categorical = len(config.cardinalities)

    intent = rng.standard_normal((_INTENT_DIM, n))
    rho = model.dense_rho[:, None]
    latent = rho * (model.dense_loadings @ intent)
    latent += np.sqrt(1.0 - rho**2) * rng.standard_normal((config.n_dense, n))
    log_scale = model.dense_mu[:, None] + model.dense_sigma[:, None] * latent
    dense = np.floor(np.exp(log_scale))

    uniforms = rng.random((n_categorical, n))
    ids = np.empty((n_categorical, n), dtype=np.int64)
    for column, size in enumerate(config.cardinalities):
        ranks = _zipf_ranks(uniforms[column], size, config.zipf_exponent)
        ids[column] = (ranks * model.multipliers[column] + model.offsets[column]) % size

    standardized = (np.log1p(dense) - model.dense_mu[:, None]) / model.dense_sigma[:, None]
    logit = model.bias + model.dense_weights @ standardized
    logit += config.intent_effect * (model.intent_direction @ intent)
    for column in range(n_categorical):
        if model.effect_scales[column] > 0:
            effect = _hashed_normals(ids[column], model.effect_keys[column], 1)[0]
            logit += model.effect_scales[column] * effect
    dim = config.interaction_dim
    for a, b in model.pairs:
        left = _hashed_normals(ids[a], model.latent_keys[a], dim)
        right = _hashed_normals(ids[b], model.latent_keys[b], dim)
        logit += config.interaction_effect / math.sqrt(dim) * (left * right).sum(axis=0)
    prob = _sigmoid(logit)
    label = (rng.random(n, dtype=np.float32) < prob).astype(np.float32)

    # Missing values are masked after the label is drawn: the click depends on the true values.
    dense[rng.random((config.n_dense, n), dtype=np.float32) < config.dense_missing_rate] = np.nan
    missing = rng.random((n_categorical, n), dtype=np.float32) < config.categorical_missing_rate
    return {
        "label": label, "logit": logit, "prob": prob, "dense": dense, "ids": ids,
        "missing": missing,
    }


def _criteo_batch(config: CriteoLikeConfig, rows: _Rows) -> RawBatch:
    dense = {f"I{j + 1}": rows["dense"][j] for j in range(config.n_dense)}
    categorical: dict[str, np.ndarray] = {}
    for column in range(len(config.cardinalities)):
        ids = rows["ids"][column]
        if config.categorical_missing_rate > 0:
            ids = ids.astype(object)
            ids[rows["missing"][column]] = None
        categorical[f"C{column + 1}"] = ids
    return RawBatch(labels=rows["label"], dense=dense, categorical=categorical)


def iter_criteo_like(
    config: CriteoLikeConfig, batch_rows: int = CHUNK_ROWS
) -> Iterator[tuple[RawBatch, np.ndarray]]:
    """Raw batches of Criteo-like rows and each row's true click probability (float64).

    Categorical columns are int64 arrays when ``categorical_missing_rate`` is 0, otherwise
    object arrays of ints with None for missing values (the :class:`RawBatch` contract).
    """
    model = _criteo_model(config)
    for rows in _rebatch(_chunks(partial(_criteo_chunk, model), config.n_rows), batch_rows):
        yield _criteo_batch(config, rows), rows["prob"]


def write_criteo_like(
    config: CriteoLikeConfig, out_dir: str | Path, progress: bool = True
) -> dict:
    """Writes ``data.parquet``, ``spec.json`` and ``generator.json``; returns the latter.

    The parquet file has an int8 ``label``, nullable float64 dense columns and nullable int64
    categorical columns, in row groups of :data:`CHUNK_ROWS`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = _criteo_model(config)
    spec = criteo_like_spec(config)
    schema = pa.schema(
        [("label", pa.int8())]
        + [(name, pa.float64()) for name in spec.dense]
        + [(name, pa.int64()) for name in spec.categorical_names]
    )
    oracle = _Oracle()
    with (
        pq.ParquetWriter(out / "data.parquet", schema) as writer,
        tqdm(total=config.n_rows, unit="rows", desc="criteo", disable=not progress) as bar,
    ):
        for rows in _chunks(partial(_criteo_chunk, model), config.n_rows):
            columns = [pa.array(rows["label"].astype(np.int8))]
            columns += [pa.array(values, mask=np.isnan(values)) for values in rows["dense"]]
            columns += [
                pa.array(ids, mask=missing)
                for ids, missing in zip(rows["ids"], rows["missing"], strict=True)
            ]
            writer.write_table(pa.Table.from_arrays(columns, schema=schema))
            oracle.add(rows["label"], rows["prob"])
            bar.update(_row_count(rows))
    spec.save(out / "spec.json")
    summary = {
        "mode": "criteo",
        "config": {**asdict(config), "cardinalities": list(config.cardinalities)},
        **oracle.summary(),
        "bias": model.bias,
        "files": [str(out / name) for name in ("data.parquet", "spec.json", "generator.json")],
    }
    (out / "generator.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# --------------------------------------------------------------------------------------------
# Entity mode: users, items and interactions
# --------------------------------------------------------------------------------------------

_GENRES = (
    "action", "animation", "comedy", "documentary", "drama", "family", "horror", "romance",
    "sci-fi", "thriller",
)
_GENDERS = ("female", "male", "unknown")
_DEVICES = ("mobile", "desktop", "tablet")
_AGE_BUCKET_PROBS = np.array([0.05, 0.2, 0.25, 0.2, 0.15, 0.1, 0.05])
_N_OCCUPATIONS = 21
_PRICE_EDGES = np.array([5.0, 10.0, 20.0, 50.0, 100.0])
_HOUR_WEIGHTS = 1.2 + np.sin(2 * np.pi * (np.arange(24) - 12) / 24)
_ENTITY_LATENT_DIM = 4
_ENTITY_TARGET_CTR = 0.2
_USER_ZIPF = 0.8  # activity: heavy users exist but the tail is long
_ITEM_ZIPF = 1.1  # popularity


@dataclass(frozen=True)
class EntityConfig:
    """Sizes of the user and item tables and of the interaction log."""

    n_users: int = 10_000
    n_items: int = 2_000
    n_rows: int = 200_000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_users < 1 or self.n_items < 1 or self.n_rows < 0 or self.seed < 0:
            raise ValueError("n_users and n_items must be positive, n_rows and seed >= 0")


def entity_joined_spec() -> DatasetSpec:
    """Columns of an interaction joined with its user's and item's features."""
    kinds: tuple[tuple[str, CategoricalKind], ...] = (
        ("user_id", "string"), ("age_bucket", "int"), ("gender", "string"),
        ("occupation", "int"), ("item_id", "string"), ("genre", "string"), ("year", "int"),
        ("price_bucket", "int"), ("hour", "int"), ("device", "string"),
    )
    return DatasetSpec(
        label=LabelRule("label"),
        dense=("tenure_days", "price"),
        categorical=tuple(CategoricalColumn(name, kind) for name, kind in kinds),
        format="parquet",
    )


@dataclass(frozen=True, eq=False)
class _EntityWorld:
    """Entity tables (visible) and the hidden effects that drive clicks."""

    config: EntityConfig
    user_ids: np.ndarray  # object array of "u0", "u1", ...
    age_bucket: np.ndarray
    gender: np.ndarray  # index into _GENDERS
    occupation: np.ndarray
    tenure_days: np.ndarray
    item_ids: np.ndarray
    genre: np.ndarray  # index into _GENRES
    year: np.ndarray
    price: np.ndarray
    price_bucket: np.ndarray
    user_order: np.ndarray  # activity rank -> user
    item_order: np.ndarray  # popularity rank -> item
    user_effect: np.ndarray
    item_effect: np.ndarray
    user_latent: np.ndarray
    item_latent: np.ndarray
    age_genre: np.ndarray
    gender_genre: np.ndarray
    occupation_genre: np.ndarray
    price_sensitivity: np.ndarray  # per age bucket
    hour_effect: np.ndarray
    device_effect: np.ndarray
    bias: float = 0.0


def _entity_world(config: EntityConfig) -> _EntityWorld:
    rng = np.random.default_rng([config.seed, _STREAM_ENTITY_TABLES])
    users, items, n_genres = config.n_users, config.n_items, len(_GENRES)
    price = np.floor(np.exp(rng.normal(2.8, 0.9, items))) + 0.99
    genre_weights = np.linspace(2.0, 0.5, n_genres)  # some genres are more common
    world = _EntityWorld(
        config=config,
        user_ids=np.array([f"u{k}" for k in range(users)], dtype=object),
        age_bucket=rng.choice(len(_AGE_BUCKET_PROBS), users, p=_AGE_BUCKET_PROBS),
        gender=rng.choice(len(_GENDERS), users, p=[0.47, 0.48, 0.05]),
        occupation=rng.integers(0, _N_OCCUPATIONS, users),
        tenure_days=np.round(np.exp(rng.normal(5.5, 1.2, users))).astype(np.int64),
        item_ids=np.array([f"i{k}" for k in range(items)], dtype=object),
        genre=rng.choice(n_genres, items, p=genre_weights / genre_weights.sum()),
        year=np.maximum(2024 - np.floor(rng.exponential(10.0, items)), 1950).astype(np.int64),
        price=price,
        price_bucket=np.searchsorted(_PRICE_EDGES, price).astype(np.int64),
        user_order=rng.permutation(users),
        item_order=rng.permutation(items),
        user_effect=rng.normal(0.0, 0.6, users),
        item_effect=rng.normal(0.0, 0.6, items),
        user_latent=rng.standard_normal((users, _ENTITY_LATENT_DIM)),
        item_latent=rng.standard_normal((items, _ENTITY_LATENT_DIM)),
        age_genre=rng.normal(0.0, 0.5, (len(_AGE_BUCKET_PROBS), n_genres)),
        gender_genre=rng.normal(0.0, 0.3, (len(_GENDERS), n_genres)),
        occupation_genre=rng.normal(0.0, 0.3, (_N_OCCUPATIONS, n_genres)),
        price_sensitivity=rng.normal(-0.3, 0.2, len(_AGE_BUCKET_PROBS)),
        hour_effect=rng.normal(0.0, 0.2, 24),
        device_effect=rng.normal(0.0, 0.2, len(_DEVICES)),
    )
    pilot = _entity_chunk(world, 0)
    return replace(world, bias=_calibrate_bias(pilot["logit"], _ENTITY_TARGET_CTR))


def _entity_chunk(world: _EntityWorld, index: int) -> _Rows:
    """All CHUNK_ROWS interactions of chunk ``index``: user, item, hour, device, label, prob."""
    config = world.config
    rng = np.random.default_rng([config.seed, _STREAM_INTERACTIONS, index])
    n = CHUNK_ROWS
    user = world.user_order[_zipf_ranks(rng.random(n), config.n_users, _USER_ZIPF)]
    item = world.item_order[_zipf_ranks(rng.random(n), config.n_items, _ITEM_ZIPF)]
    hour = rng.choice(24, n, p=_HOUR_WEIGHTS / _HOUR_WEIGHTS.sum())
    device = rng.choice(len(_DEVICES), n, p=[0.6, 0.3, 0.1])

    age, genre = world.age_bucket[user], world.genre[item]
    affinity = (world.user_latent[user] * world.item_latent[item]).sum(axis=1)
    logit = (
        world.bias
        + world.user_effect[user]
        + world.item_effect[item]
        + world.age_genre[age, genre]
        + world.gender_genre[world.gender[user], genre]
        + world.occupation_genre[world.occupation[user], genre]
        + 0.5 / math.sqrt(_ENTITY_LATENT_DIM) * affinity
        + world.price_sensitivity[age] * (np.log(world.price[item]) - 2.8)
        + 0.02 * (world.year[item] - 2015)
        + world.hour_effect[hour]
        + world.device_effect[device]
    )
    prob = _sigmoid(logit)
    label = (rng.random(n) < prob).astype(np.float32)
    return {
        "user": user, "item": item, "hour": hour, "device": device, "label": label,
        "logit": logit, "prob": prob,
    }


def _joined_batch(world: _EntityWorld, rows: _Rows) -> RawBatch:
    user, item = rows["user"], rows["item"]
    return RawBatch(
        labels=rows["label"],
        dense={
            "tenure_days": world.tenure_days[user].astype(np.float64),
            "price": world.price[item],
        },
        categorical={
            "user_id": world.user_ids[user],
            "age_bucket": world.age_bucket[user],
            "gender": np.array(_GENDERS, dtype=object)[world.gender[user]],
            "occupation": world.occupation[user],
            "item_id": world.item_ids[item],
            "genre": np.array(_GENRES, dtype=object)[world.genre[item]],
            "year": world.year[item],
            "price_bucket": world.price_bucket[item],
            "hour": rows["hour"],
            "device": np.array(_DEVICES, dtype=object)[rows["device"]],
        },
    )


def iter_entity_joined(config: EntityConfig, batch_rows: int = CHUNK_ROWS) -> Iterator[RawBatch]:
    """Interactions joined with their user's and item's features; see :func:`entity_joined_spec`."""
    world = _entity_world(config)
    for rows in _rebatch(_chunks(partial(_entity_chunk, world), config.n_rows), batch_rows):
        yield _joined_batch(world, rows)


def write_entities(config: EntityConfig, out_dir: str | Path, progress: bool = True) -> dict:
    """Writes ``users.parquet``, ``items.parquet``, ``interactions.parquet``, ``spec.json`` (of
    the joined rows) and ``generator.json``; returns the latter."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = _entity_world(config)
    user_ids = pa.array(world.user_ids, pa.string())
    item_ids = pa.array(world.item_ids, pa.string())
    pq.write_table(
        pa.table({
            "user_id": user_ids,
            "age_bucket": world.age_bucket.astype(np.int64),
            "gender": pa.array(np.array(_GENDERS)[world.gender]),
            "occupation": world.occupation.astype(np.int64),
            "tenure_days": world.tenure_days,
        }),
        out / "users.parquet",
    )
    pq.write_table(
        pa.table({
            "item_id": item_ids,
            "genre": pa.array(np.array(_GENRES)[world.genre]),
            "year": world.year,
            "price": world.price,
            "price_bucket": world.price_bucket,
        }),
        out / "items.parquet",
    )
    schema = pa.schema([
        ("user_id", pa.string()), ("item_id", pa.string()), ("hour", pa.int64()),
        ("device", pa.string()), ("label", pa.int8()),
    ])
    devices = pa.array(_DEVICES, pa.string())
    oracle = _Oracle()
    with (
        pq.ParquetWriter(out / "interactions.parquet", schema) as writer,
        tqdm(total=config.n_rows, unit="rows", desc="interactions", disable=not progress) as bar,
    ):
        for rows in _chunks(partial(_entity_chunk, world), config.n_rows):
            table = pa.Table.from_arrays(
                [
                    user_ids.take(pa.array(rows["user"])),
                    item_ids.take(pa.array(rows["item"])),
                    pa.array(rows["hour"].astype(np.int64)),
                    devices.take(pa.array(rows["device"])),
                    pa.array(rows["label"].astype(np.int8)),
                ],
                schema=schema,
            )
            writer.write_table(table)
            oracle.add(rows["label"], rows["prob"])
            bar.update(_row_count(rows))
    entity_joined_spec().save(out / "spec.json")
    names = (
        "users.parquet", "items.parquet", "interactions.parquet", "spec.json", "generator.json"
    )
    summary = {
        "mode": "entity",
        "config": asdict(config),
        **oracle.summary(),
        "bias": world.bias,
        "files": [str(out / name) for name in names],
    }
    (out / "generator.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def write_entity_joined(directory: str | Path) -> Path:
    """Joins ``write_entities``' interactions with their users and items into
    ``joined.parquet`` (the rows :func:`entity_joined_spec` describes); returns its path."""
    directory = Path(directory)
    joined = (pq.read_table(directory / "interactions.parquet")
              .join(pq.read_table(directory / "users.parquet"), "user_id")
              .join(pq.read_table(directory / "items.parquet"), "item_id"))
    pq.write_table(joined, directory / "joined.parquet")
    return directory / "joined.parquet"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _parse_cardinalities(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1000,50,7, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("expected at least one cardinality")
    return sizes


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """``generate criteo|entity --rows N --out DIR --seed S [...]``."""
    modes = parser.add_subparsers(dest="mode", required=True, metavar="{criteo,entity}")
    criteo = modes.add_parser("criteo", help="Criteo-shaped rows (13 dense, 26 categorical)")
    criteo.add_argument("--rows", type=int, default=1_000_000)
    criteo.add_argument("--out", type=Path, required=True, help="output directory")
    criteo.add_argument("--seed", type=int, default=0)
    sizes = criteo.add_mutually_exclusive_group()
    sizes.add_argument("--scale", type=float, help="divide Criteo's table sizes by this factor")
    sizes.add_argument(
        "--cardinalities", type=_parse_cardinalities, help="table sizes, e.g. 1000,50,7"
    )
    entity = modes.add_parser("entity", help="users, items and interactions")
    entity.add_argument("--rows", type=int, default=EntityConfig.n_rows)
    entity.add_argument("--out", type=Path, required=True, help="output directory")
    entity.add_argument("--seed", type=int, default=0)
    entity.add_argument("--users", type=int, default=EntityConfig.n_users)
    entity.add_argument("--items", type=int, default=EntityConfig.n_items)


def run_generate(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    if args.mode == "criteo":
        cardinalities = CRITEO_CARDINALITIES
        if args.scale is not None:
            cardinalities = scaled_cardinalities(args.scale)
        elif args.cardinalities is not None:
            cardinalities = args.cardinalities
        config = CriteoLikeConfig(n_rows=args.rows, cardinalities=cardinalities, seed=args.seed)
        summary = write_criteo_like(config, args.out)
    else:
        summary = write_entities(
            EntityConfig(
                n_users=args.users, n_items=args.items, n_rows=args.rows, seed=args.seed
            ),
            args.out,
        )
    seconds = time.perf_counter() - start
    ctr, auc = summary["ctr"], summary["oracle_auc"]
    print(
        f"{summary['mode']}: {summary['rows']:,} rows, "
        f"CTR {'n/a' if ctr is None else f'{ctr:.4f}'}, "
        f"oracle AUC {'n/a' if auc is None else f'{auc:.4f}'} "
        f"(over {summary['oracle_auc_rows']:,} rows), {seconds:.1f} s"
    )
    for path in summary["files"]:
        print(f"  {path}")
    return 0
