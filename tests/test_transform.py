import subprocess
import sys

import numpy as np
import pytest

from ctrserve.models.keys import InvalidValueError, seeded_hash, string_hash, to_keys
from ctrserve.models.schema import CategoricalColumn, DatasetSpec, LabelRule, RawBatch
from ctrserve.models.transform import (
    MISSING_ID,
    OOV_ID,
    FeatureTransform,
    TransformConfig,
    fit_transform,
)

SPEC = DatasetSpec(
    label=LabelRule("label"),
    dense=("I1", "I2"),
    categorical=(CategoricalColumn("C1", "hex"), CategoricalColumn("C2", "string"),
                 CategoricalColumn("C3", "int")),
)


def batch(rows: int, seed: int) -> RawBatch:
    rng = np.random.default_rng(seed)
    hexes = np.array([f"{v:08x}" for v in rng.integers(0, 50, rows)], dtype=object)
    hexes[rng.random(rows) < 0.1] = None
    words = np.array([f"w{v}" for v in rng.integers(0, 30, rows)], dtype=object)
    words[rng.random(rows) < 0.1] = ""
    dense = rng.integers(-5, 1000, (2, rows)).astype(np.float64)
    dense[0, rng.random(rows) < 0.2] = np.nan
    return RawBatch(
        labels=(rng.random(rows) < 0.3).astype(np.float32),
        dense={"I1": dense[0], "I2": dense[1]},
        categorical={"C1": hexes, "C2": words, "C3": rng.integers(-10, 10, rows)},
    )


def test_vocabulary_ids_missing_and_oov():
    transform = fit_transform(SPEC, [batch(500, 0), batch(500, 1)], TransformConfig())
    sizes = transform.table_sizes
    assert sizes[0] == 2 + 50 and sizes[1] == 2 + 30 and sizes[2] == 2 + 20
    raw = RawBatch(
        labels=None,
        dense={"I1": np.array([np.nan, 3.0, -3.0])},
        categorical={"C1": np.array([None, "00000001", "ffffffff"], dtype=object),
                     "C2": np.array(["w1", "", "never-seen"], dtype=object),
                     "C3": np.array([0, 9, 123])},
    )
    out = transform.transform(raw)
    assert out.sparse[0, 0] == MISSING_ID and out.sparse[2, 0] == OOV_ID and out.sparse[1, 0] >= 2
    assert out.sparse[1, 1] == MISSING_ID and out.sparse[2, 1] == OOV_ID
    assert out.sparse[2, 2] == OOV_ID and out.sparse[0, 2] >= 2
    # I2 absent from the request: filled as missing, like I1's NaN.
    np.testing.assert_allclose(out.dense[:, 0], [0.0, np.log1p(3), -np.log1p(3)], rtol=1e-6)
    np.testing.assert_array_equal(out.dense[:, 1], 0.0)


def test_unseen_values_are_counted_per_row_and_have_an_id_per_table():
    transform = fit_transform(SPEC, [batch(500, 0)], TransformConfig())
    assert transform.unseen_ids.tolist() == [OOV_ID] * 3
    raw = RawBatch(
        labels=None, dense={},
        categorical={"C1": np.array(["00000001", "ffffffff", None, "eeeeeeee"], dtype=object),
                     "C2": np.array(["w1", "w2", "never", "never"], dtype=object),
                     "C3": np.array([1, 2, 3, 555])},
    )
    sparse = transform.transform(raw).sparse
    # Missing is not unseen: row 2 has one unseen value (C2), row 3 three.
    assert transform.unseen_counts(sparse).tolist() == [0, 1, 1, 3]
    hashed = fit_transform(SPEC, [], TransformConfig(hash_buckets=97))
    assert hashed.unseen_ids.tolist() == [MISSING_ID] * 3
    assert hashed.unseen_counts(hashed.transform(raw).sparse).tolist() == [0, 0, 0, 0]


def test_min_frequency_and_max_vocabulary():
    data = [batch(2000, 0)]
    full = fit_transform(SPEC, data, TransformConfig())
    rare_cut = fit_transform(SPEC, data, TransformConfig(min_frequency=60))
    top = fit_transform(SPEC, data, TransformConfig(max_vocabulary=5))
    assert rare_cut.table_sizes[0] < full.table_sizes[0]
    assert top.table_sizes == [7, 7, 7]


def test_save_load_round_trip_gives_identical_ids(tmp_path):
    transform = fit_transform(SPEC, [batch(1000, 0)], TransformConfig())
    transform.save(tmp_path / "t")
    loaded = FeatureTransform.load(tmp_path / "t")
    for seed in (5, 6):
        raw = batch(300, seed)
        a, b = transform.transform(raw), loaded.transform(raw)
        np.testing.assert_array_equal(a.sparse, b.sparse)
        np.testing.assert_array_equal(a.dense, b.dense)
    assert loaded.table_sizes == transform.table_sizes
    assert {p.name for p in (tmp_path / "t").iterdir()} == {"transform.json", "vocabulary.npz"}


def test_hash_mode_is_seeded_and_in_range():
    config = TransformConfig(hash_buckets=97, hash_seed=3)
    transform = fit_transform(SPEC, [], config)
    out = transform.transform(batch(1000, 0)).sparse
    assert out.min() >= 0 and out.max() < 97
    other = fit_transform(SPEC, [], TransformConfig(hash_buckets=97, hash_seed=4))
    assert (other.transform(batch(1000, 0)).sparse != out).any()


def test_keys_are_stable_across_processes():
    values = np.array(["a", "héllo", "68fd1e64", "x" * 40], dtype=object)
    here = string_hash(values.astype(str)).tolist()
    code = ("import numpy as np; from ctrserve.models.keys import string_hash; "
            "print(string_hash(np.array(['a','héllo','68fd1e64','x'*40])).tolist())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env={"PYTHONHASHSEED": "123"})
    assert str(here) == other.stdout.strip()
    assert len(set(here)) == 4


def test_same_value_as_int_or_text_gets_the_same_key():
    as_text, _ = to_keys("c", "string", np.array(["42", "7"], dtype=object))
    as_int, _ = to_keys("c", "string", np.array([42, 7]))
    assert as_text.tolist() == as_int.tolist()
    hex_text, _ = to_keys("c", "hex", np.array(["ff", "FF", "00ff"], dtype=object))
    assert hex_text.tolist() == [255, 255, 255]
    ints, _ = to_keys("c", "int", np.array(["-1", 5, "5"], dtype=object))
    assert ints.tolist() == [2**64 - 1, 5, 5]


@pytest.mark.parametrize(
    ("kind", "values", "row"),
    [("hex", ["ab", None, "xyz"], 2), ("hex", ["1" * 17], 0), ("int", ["3", "3.5"], 1),
     ("int", [1, True], 1), ("string", ["a", 1.5], 1), ("int", ["99999999999999999999"], 0)],
)
def test_bad_values_name_column_and_row(kind, values, row):
    with pytest.raises(InvalidValueError, match=f"column 'c', row {row}:") as error:
        to_keys("c", kind, np.array(values, dtype=object))
    assert error.value.row == row


def test_seeded_hash_depends_on_seed():
    keys = np.arange(1000, dtype=np.uint64)
    assert (seeded_hash(keys, 1) != seeded_hash(keys, 2)).all()
    assert len(np.unique(seeded_hash(keys, 1))) == 1000
