"""``ctrserve evaluate`` through the real command line on data without labels and with one class
only: predictions written, metrics that the labels leave undefined said to be undefined, exit 0;
and the rows grouped by their number of values unseen in training."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ctrserve.models.evaluation_metrics import summary


def _evaluate(trained: dict, data, spec, *flags: str) -> subprocess.CompletedProcess:
    """``ctrserve evaluate`` of the session's checkpoint with ``data`` as the test part."""
    return subprocess.run(
        [sys.executable, "-m", "ctrserve", "evaluate", str(trained["checkpoint"]),
         "--data", str(data), "--test-data", str(data), "--spec", str(spec), *flags],
        capture_output=True, text=True, timeout=300,
    )


def test_unlabeled_data_gets_predictions_and_no_metrics(trained, tmp_path):
    rows = pq.read_table(trained["rows_file"]).drop(["label"])
    data = tmp_path / "unlabeled.parquet"
    pq.write_table(rows, data)
    spec = json.loads(Path(trained["data"].spec_path).read_text())
    spec["label"] = None  # a data set without labels
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(spec))
    predictions = tmp_path / "predictions.txt"

    text = _evaluate(trained, data, spec_path, "--predictions", str(predictions))
    as_json = _evaluate(trained, data, spec_path, "--json")

    assert text.returncode == 0, text.stderr
    first, *unseen = text.stdout.strip().splitlines()
    assert first == (f"test ({rows.num_rows:,} rows): the data has no labels, so no metrics; "
                     f"predictions written to {predictions}")
    assert unseen[:2] == ["by the number of values unseen in training:",
                          "unseen fields  rows  mean prediction"]
    probabilities = np.loadtxt(predictions)
    assert probabilities.shape == (rows.num_rows,)
    assert ((probabilities > 0) & (probabilities < 1)).all()
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    assert result["labeled"] is False and result["rows"] == rows.num_rows
    assert not {"auc", "logloss", "ne", "calibration"} & result.keys()


def test_no_positive_label_leaves_auc_ne_and_calibration_undefined(trained, tmp_path):
    table = pq.read_table(trained["rows_file"])
    column = table.schema.get_field_index("label")
    negatives = table.set_column(column, "label", pa.array(np.zeros(table.num_rows, np.int8)))
    data = tmp_path / "negatives.parquet"
    pq.write_table(negatives, data)
    spec = trained["data"].spec_path

    text = _evaluate(trained, data, spec)
    as_json = _evaluate(trained, data, spec, "--json")

    assert text.returncode == 0, text.stderr
    assert "AUC undefined (no positive labels)" in text.stdout
    assert "NE undefined (no positive labels)" in text.stdout
    assert "calibration undefined (no positive labels)" in text.stdout
    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)  # strict JSON: no NaN
    assert result["labeled"] is True and result["undefined"] == "no positive labels"
    assert result["auc"] is None and result["ne"] is None and result["calibration"] is None
    assert 0 < result["logloss"] < 10 and result["ctr"] == 0


def test_one_class_metrics_are_nan_with_the_reason_and_both_classes_are_defined():
    probabilities = np.array([0.2, 0.7, 0.4, 0.9])
    positives = summary(np.ones(4), probabilities)
    assert positives["undefined"] == "no negative labels"
    assert math.isnan(positives["auc"]) and math.isnan(positives["ne"])
    assert positives["calibration"] == probabilities.mean()
    both = summary(np.array([0.0, 1.0, 0.0, 1.0]), probabilities)
    assert both["undefined"] is None and both["auc"] == 1.0 and 0 < both["ne"] < 1


def test_rows_are_grouped_by_their_number_of_unseen_values(trained, tmp_path):
    table = pq.read_table(trained["rows_file"])
    categorical = [name for name in table.column_names if name.startswith("C")]
    unseen_counts = np.arange(table.num_rows) % (len(categorical) + 1)
    for index, name in enumerate(categorical):
        values = table.column(name).to_numpy(zero_copy_only=False)
        known = np.bincount(values[values >= 0].astype(np.int64)).argmax()  # the most frequent
        column = np.where(unseen_counts > index, 10**9 + np.arange(table.num_rows), known)
        table = table.set_column(table.schema.get_field_index(name), name,
                                 pa.array(column.astype(values.dtype)))
    data = tmp_path / "rows.parquet"
    pq.write_table(table, data)
    spec = trained["data"].spec_path

    as_json = _evaluate(trained, data, spec, "--json")
    text = _evaluate(trained, data, spec)

    assert as_json.returncode == 0, as_json.stderr
    result = json.loads(as_json.stdout)
    groups = result["by_unseen_fields"]
    assert [g["unseen_fields"] for g in groups] == list(range(len(categorical) + 1))
    assert [g["rows"] for g in groups] == np.bincount(unseen_counts).tolist()
    for group in groups:
        rows = unseen_counts == group["unseen_fields"]
        labels = table.column("label").to_numpy()[rows]
        assert group["ctr"] == pytest.approx(labels.mean())
        assert 0 < group["mean_prediction"] < 1
    overall = sum(g["mean_prediction"] * g["rows"] for g in groups) / result["rows"]
    assert overall == pytest.approx(result["calibration"] * result["ctr"], rel=1e-5)
    assert text.returncode == 0, text.stderr
    assert "by the number of values unseen in training:" in text.stdout
    assert "unseen fields  rows  mean prediction     CTR  calibration     AUC" in text.stdout
