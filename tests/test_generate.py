"""Synthetic data: determinism, shape, signal and the files it writes."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest

from ctrserve.models.evaluation_metrics import roc_auc
from ctrserve.models.generate import (
    CHUNK_ROWS,
    CRITEO_CARDINALITIES,
    CriteoLikeConfig,
    EntityConfig,
    add_generate_arguments,
    criteo_like_spec,
    entity_joined_spec,
    iter_criteo_like,
    iter_entity_joined,
    run_generate,
    scaled_cardinalities,
    write_criteo_like,
    write_entities,
)
from ctrserve.models.schema import DatasetSpec, RawBatch

# Crosses a chunk boundary; a few columns, big and small, keep it quick.
SMALL = CriteoLikeConfig(
    n_rows=CHUNK_ROWS + 4_000, cardinalities=(1460, 10131227, 24, 3, 93145, 8351593)
)


def collect(config: CriteoLikeConfig, batch_rows: int = CHUNK_ROWS) -> tuple[RawBatch, np.ndarray]:
    """All rows as one batch (columns concatenated) and their probabilities."""
    batches, probabilities = zip(*iter_criteo_like(config, batch_rows), strict=True)
    first = batches[0]
    return RawBatch(
        labels=np.concatenate([batch.labels for batch in batches]),
        dense={name: np.concatenate([b.dense[name] for b in batches]) for name in first.dense},
        categorical={
            name: np.concatenate([b.categorical[name] for b in batches])
            for name in first.categorical
        },
    ), np.concatenate(probabilities)


def assert_same_rows(left: RawBatch, right: RawBatch) -> None:
    np.testing.assert_array_equal(left.labels, right.labels)
    assert left.dense.keys() == right.dense.keys()
    for name in left.dense:
        np.testing.assert_array_equal(left.dense[name], right.dense[name])  # NaN == NaN here
    assert left.categorical.keys() == right.categorical.keys()
    for name in left.categorical:
        np.testing.assert_array_equal(left.categorical[name], right.categorical[name])


def missing_mask(values: np.ndarray) -> np.ndarray:
    return np.equal(values, None) if values.dtype == object else np.zeros(len(values), bool)


def fit_logistic(features: np.ndarray, labels: np.ndarray, steps: int = 12) -> np.ndarray:
    """Newton's method for a lightly L2-regularised logistic regression with intercept."""
    x = np.column_stack([features, np.ones(len(features))])
    weights = np.zeros(x.shape[1])
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-x @ weights))
        gradient = x.T @ (p - labels) + 1e-3 * weights
        hessian = (x * (p * (1 - p))[:, None]).T @ x + 1e-3 * np.eye(len(weights))
        weights -= np.linalg.solve(hessian, gradient)
    return weights


@pytest.fixture(scope="module")
def sample() -> tuple[RawBatch, np.ndarray]:
    """200k rows with Criteo's real table sizes and the default signal."""
    return collect(CriteoLikeConfig(n_rows=200_000), batch_rows=200_000)


def test_same_seed_gives_same_rows() -> None:
    assert_same_rows(collect(SMALL)[0], collect(SMALL)[0])


def test_rows_do_not_depend_on_batch_size_or_row_count() -> None:
    reference, probabilities = collect(SMALL)
    for batch_rows in (997, 100_000):
        rows, other = collect(SMALL, batch_rows)
        assert_same_rows(reference, rows)
        np.testing.assert_array_equal(probabilities, other)
    assert [len(batch) for batch, _ in iter_criteo_like(SMALL, 30_000)] == [30_000, 30_000, 9_536]
    prefix, _ = collect(replace(SMALL, n_rows=1_000))
    assert_same_rows(prefix, reference.take(np.arange(1_000)))


def test_different_seed_gives_different_rows() -> None:
    one, _ = collect(replace(SMALL, n_rows=5_000))
    two, _ = collect(replace(SMALL, n_rows=5_000, seed=1))
    assert not np.array_equal(one.dense["I1"], two.dense["I1"], equal_nan=True)
    assert not np.array_equal(one.categorical["C2"], two.categorical["C2"])


def test_columns_types_and_ranges(sample: tuple[RawBatch, np.ndarray]) -> None:
    batch, probabilities = sample
    assert batch.labels.dtype == np.float32 and set(np.unique(batch.labels)) == {0.0, 1.0}
    assert probabilities.dtype == np.float64 and np.all((probabilities > 0) & (probabilities < 1))
    assert list(batch.dense) == [f"I{j}" for j in range(1, 14)]
    assert list(batch.categorical) == [f"C{c}" for c in range(1, 27)]
    for values in batch.dense.values():
        assert values.dtype == np.float64
        assert 0.005 < np.isnan(values).mean() < 0.04
        assert np.nanmin(values) >= 0 and np.all(values[~np.isnan(values)] % 1 == 0)
    for values, size in zip(batch.categorical.values(), CRITEO_CARDINALITIES, strict=True):
        assert values.dtype == object
        missing = missing_mask(values)
        assert 0.002 < missing.mean() < 0.02
        ids = values[~missing].astype(np.int64)
        assert ids.min() >= 0 and ids.max() < size

    no_missing, _ = collect(replace(SMALL, n_rows=1_000, categorical_missing_rate=0.0))
    for values, size in zip(no_missing.categorical.values(), SMALL.cardinalities, strict=True):
        assert values.dtype == np.int64 and values.min() >= 0 and values.max() < size


def test_ids_are_zipf_skewed_and_scattered(sample: tuple[RawBatch, np.ndarray]) -> None:
    batch, _ = sample
    values = batch.categorical["C3"]  # 10.1M ids
    ids = values[~missing_mask(values)].astype(np.int64)
    _, counts = np.unique(ids, return_counts=True)
    top = np.sort(counts)[::-1][: CRITEO_CARDINALITIES[2] // 100]
    assert top.sum() / len(ids) > 0.5  # top 1% of the table takes most rows
    assert counts.max() / len(ids) > 0.03  # the most popular id is very popular...
    assert np.bincount(ids, minlength=10)[:3].sum() < 0.01 * len(ids)  # ...and not id 0, 1, 2


def test_ctr_and_signal(sample: tuple[RawBatch, np.ndarray]) -> None:
    batch, probabilities = sample
    labels = batch.labels.astype(np.float64)
    assert 0.2 < labels.mean() < 0.26
    oracle = roc_auc(labels, probabilities)
    assert oracle > 0.78

    # A model of the dense columns alone falls well short of the oracle: the ids matter.
    dense = np.column_stack(
        [np.log1p(np.nan_to_num(v)) for v in batch.dense.values()]
        + [np.isnan(v) for v in batch.dense.values()]
    )
    half = len(labels) // 2
    weights = fit_logistic(dense[:half], labels[:half])
    scores = np.column_stack([dense[half:], np.ones(len(labels) - half)]) @ weights
    dense_auc = roc_auc(labels[half:], scores)
    assert 0.6 < dense_auc < oracle - 0.1

    without_ids = replace(SMALL, n_rows=100_000, categorical_effect=0, interaction_effect=0)
    rows, probabilities = collect(without_ids, batch_rows=100_000)
    assert roc_auc(rows.labels, probabilities) < oracle - 0.05


def test_scaled_cardinalities() -> None:
    assert scaled_cardinalities(1) == CRITEO_CARDINALITIES
    scaled = scaled_cardinalities(1000)
    assert len(scaled) == 26 and max(scaled) == math.ceil(10131227 / 1000)
    assert min(scaled) == 2
    assert scaled_cardinalities(1000, minimum=20)[5] == 20  # was 24
    assert scaled_cardinalities(1000, minimum=20)[8] == 3  # smaller than minimum: kept
    with pytest.raises(ValueError):
        scaled_cardinalities(0.5)


def test_written_files_match_iterator(tmp_path) -> None:
    summary = write_criteo_like(SMALL, tmp_path, progress=False)
    rows, probabilities = collect(SMALL)

    spec = DatasetSpec.load(tmp_path / "spec.json")
    assert spec == criteo_like_spec(SMALL)
    assert spec.format == "parquet" and {c.kind for c in spec.categorical} == {"int"}

    parquet = pq.ParquetFile(tmp_path / "data.parquet")
    assert parquet.metadata.num_row_groups == 2
    assert parquet.metadata.row_group(0).num_rows == CHUNK_ROWS
    table = parquet.read()
    assert table.column_names == ["label", *spec.dense, *spec.categorical_names]
    np.testing.assert_array_equal(table["label"].to_numpy(), rows.labels)
    for name in spec.dense:
        np.testing.assert_array_equal(
            table[name].to_numpy(zero_copy_only=False), rows.dense[name]
        )
    for name in spec.categorical_names:
        assert table[name].to_pylist() == rows.categorical[name].tolist()

    saved = json.loads((tmp_path / "generator.json").read_text())
    assert saved == summary
    assert saved["rows"] == SMALL.n_rows and saved["oracle_auc_rows"] == SMALL.n_rows
    assert saved["config"]["cardinalities"] == list(SMALL.cardinalities)
    assert saved["ctr"] == pytest.approx(rows.labels.mean())
    assert saved["oracle_auc"] == pytest.approx(roc_auc(rows.labels, probabilities))
    assert 0.3 < saved["oracle_logloss"] < 0.55


def test_entities_are_consistent(tmp_path) -> None:
    config = EntityConfig(n_users=500, n_items=120, n_rows=20_000, seed=3)
    summary = write_entities(config, tmp_path, progress=False)
    users = pq.read_table(tmp_path / "users.parquet").to_pydict()
    items = pq.read_table(tmp_path / "items.parquet").to_pydict()
    interactions = pq.read_table(tmp_path / "interactions.parquet").to_pydict()
    assert len(set(users["user_id"])) == config.n_users
    assert len(set(items["item_id"])) == config.n_items
    assert set(interactions["user_id"]) <= set(users["user_id"])
    assert set(interactions["item_id"]) <= set(items["item_id"])
    assert len(interactions["label"]) == config.n_rows
    assert 0.6 < summary["oracle_auc"] < 0.95 and 0.1 < summary["ctr"] < 0.3

    spec = DatasetSpec.load(tmp_path / "spec.json")
    assert spec == entity_joined_spec()
    user_row = {user: k for k, user in enumerate(users["user_id"])}
    item_row = {item: k for k, item in enumerate(items["item_id"])}
    batches = list(iter_entity_joined(config, batch_rows=7_000))
    assert [len(batch) for batch in batches] == [7_000, 7_000, 6_000]
    offset = 0
    for batch in batches:
        assert set(batch.dense) == set(spec.dense)
        assert set(batch.categorical) == set(spec.categorical_names)
        for k in range(0, len(batch), 97):
            row = offset + k
            user, item = interactions["user_id"][row], interactions["item_id"][row]
            assert batch.labels[k] == interactions["label"][row]
            assert batch.categorical["user_id"][k] == user
            assert batch.categorical["item_id"][k] == item
            assert batch.categorical["hour"][k] == interactions["hour"][row]
            assert batch.categorical["device"][k] == interactions["device"][row]
            for column in ("age_bucket", "gender", "occupation"):
                assert batch.categorical[column][k] == users[column][user_row[user]]
            for column in ("genre", "year", "price_bucket"):
                assert batch.categorical[column][k] == items[column][item_row[item]]
            assert batch.dense["price"][k] == items["price"][item_row[item]]
            assert batch.dense["tenure_days"][k] == users["tenure_days"][user_row[user]]
        offset += len(batch)


def test_cli(tmp_path, capsys) -> None:
    parser = argparse.ArgumentParser()
    add_generate_arguments(parser)
    args = parser.parse_args(
        ["criteo", "--rows", "2000", "--out", str(tmp_path), "--cardinalities", "50,7,1000"]
    )
    assert run_generate(args) == 0
    assert "2,000 rows" in capsys.readouterr().out
    assert [c.name for c in DatasetSpec.load(tmp_path / "spec.json").categorical] == [
        "C1", "C2", "C3",
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["criteo", "--out", "x", "--scale", "10", "--cardinalities", "5"])
