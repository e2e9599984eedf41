"""Column specs inferred from a sample: each rule on a CSV with mixed columns, the label by name
or flag, delimiters, Parquet, and the command line training on a CSV without a spec."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrserve.models.schema import DatasetSpec, LabelRule
from ctrserve.models.spec_inference import MAX_LEVELS, infer_spec, sniff_delimiter

ROWS = 600


def mixed_columns(rows: int = ROWS, seed: int = 0) -> dict[str, list]:
    """A rating-style log: ids, side columns of every kind, a row id and an empty column."""
    rng = np.random.default_rng(seed)
    return {
        "request": [f"r{k:05d}" for k in range(rows)],
        "userId": rng.integers(1, 400, rows).tolist(),
        "item": rng.integers(1, 900, rows).tolist(),
        "age": rng.choice([18, 25, 35, 45, 56], rows).tolist(),
        "minutes_watched": rng.integers(0, 5000, rows).tolist(),
        "price": np.round(rng.uniform(0, 20, rows), 2).tolist(),
        "ad": [f"{value:08x}" for value in rng.choice(2**32, 50)[rng.integers(0, 50, rows)]],
        "city": rng.choice(["paris", "lyon", "nice"], rows).tolist(),
        "gender": rng.choice(["F", "M"], rows).tolist(),
        "comment": [""] * rows,
        "click": rng.integers(0, 2, rows).tolist(),
    }


def write_csv(path: Path, columns: dict[str, list], delimiter: str = ",") -> Path:
    names = list(columns)
    lines = [delimiter.join(names)]
    lines += [delimiter.join(str(columns[name][row]) for name in names)
              for row in range(len(columns[names[0]]))]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_each_column_of_a_mixed_csv_gets_its_role(tmp_path):
    inferred = infer_spec(write_csv(tmp_path / "log.csv", mixed_columns()), "csv")
    spec = inferred.spec
    assert spec.label == LabelRule("click")
    kinds = {column.name: column.kind for column in spec.categorical}
    assert kinds == {"userId": "int", "item": "int", "age": "int", "ad": "hex",
                     "city": "string", "gender": "string"}
    assert spec.dense == ("minutes_watched", "price")
    assert spec.ignore == ("request", "comment")
    assert (spec.format, spec.delimiter, spec.header) == ("csv", ",", True)
    assert inferred.sample_rows == ROWS
    assert "named like an id" in inferred.reasons["userId"]
    assert f"≤ {MAX_LEVELS}" in inferred.reasons["age"]
    assert "names the row" in inferred.reasons["request"]
    assert "no value" in inferred.reasons["comment"]
    assert set(inferred.describe().split()) >= set(mixed_columns())
    # The proposal is a spec like any other: it round-trips through its JSON.
    assert DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_integer_columns_with_many_values_are_dense_and_few_are_categorical(tmp_path):
    columns = {"y": [0, 1] * 300, "levels": [k % MAX_LEVELS for k in range(600)],
               "counts": list(range(600))}
    spec = infer_spec(write_csv(tmp_path / "c.csv", columns), "csv").spec
    assert [c.name for c in spec.categorical] == ["levels"] and spec.dense == ("counts",)


def test_a_rating_label_needs_a_threshold_and_a_missing_label_names_the_flag(tmp_path):
    columns = mixed_columns()
    columns["rating"] = columns.pop("click")
    columns["rating"] = [1 + value * 4 for value in columns["rating"]]
    path = write_csv(tmp_path / "ratings.csv", columns)
    with pytest.raises(ValueError, match=r"no column is named like a label.*--label COLUMN"):
        infer_spec(path, "csv")
    with pytest.raises(ValueError, match=r"values other than 0/1 \(5\): pass --label-threshold"):
        infer_spec(path, "csv", label="rating")
    with pytest.raises(ValueError, match="has no column 'stars'"):
        infer_spec(path, "csv", label="stars")
    inferred = infer_spec(path, "csv", label="rating", threshold=4)
    assert inferred.spec.label == LabelRule("rating", 4)
    assert "4 and above positive" in inferred.reasons["rating"]


def test_the_delimiter_is_sniffed_and_a_file_without_header_is_refused(tmp_path):
    columns = mixed_columns()
    for delimiter in (";", "\t", "|"):
        path = write_csv(tmp_path / "log.txt", columns, delimiter)
        assert sniff_delimiter(path) == delimiter
        assert infer_spec(path, "csv").spec.delimiter == delimiter
    headless = tmp_path / "headless.csv"
    headless.write_text("1,0.5,3\n0,0.25,4\n")
    with pytest.raises(ValueError, match="needs a header line"):
        infer_spec(headless, "csv")


def test_parquet_columns_are_judged_by_their_values(tmp_path):
    columns = mixed_columns()
    del columns["comment"]
    path = tmp_path / "log.parquet"
    pq.write_table(pa.table(columns), path)
    spec = infer_spec(path, "parquet").spec
    assert spec.format == "parquet" and spec.dense == ("minutes_watched", "price")
    assert {c.name: c.kind for c in spec.categorical}["ad"] == "hex"


def ctrserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctrserve", *args], capture_output=True,
                          text=True, timeout=300)


def test_spec_infer_prints_the_spec_and_train_without_spec_infers_and_keeps_it(tmp_path):
    path = write_csv(tmp_path / "log.csv", mixed_columns(3000))
    shown = ctrserve("spec", "infer", str(path), "--out", str(tmp_path / "spec.json"))
    assert shown.returncode == 0, shown.stderr
    printed = json.loads(shown.stdout)
    assert printed == json.loads((tmp_path / "spec.json").read_text())
    assert "categorical hex" in shown.stderr and printed["label"]["column"] == "click"

    checkpoint = tmp_path / "ckpt"
    trained = ctrserve("train", "--data", str(path), "--split", "random", "--dim", "4",
                       "--bottom", "8", "--top", "8", "--epochs", "1", "--no-progress",
                       "--out", str(checkpoint))
    assert trained.returncode == 0, trained.stderr
    assert "format csv" in trained.stderr
    assert "column spec inferred from the first 3,000 rows" in trained.stdout
    assert json.loads((checkpoint / "spec.json").read_text()) == printed
    # The checkpoint reads its data again with no other file, and new data of the same columns
    # without a spec is read with the checkpoint's.
    evaluated = ctrserve("evaluate", str(checkpoint), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["rows"] == 300
    other = write_csv(tmp_path / "more.csv", mixed_columns(500, seed=1))
    again = ctrserve("evaluate", str(checkpoint), "--data", str(other), "--test-data",
                     str(other), "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["rows"] == 500
