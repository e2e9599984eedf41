"""``ctrserve evaluate`` through the real command line on data without labels and with one class
only: predictions written, metrics that the labels leave undefined said to be undefined, exit 0."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

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
    assert text.stdout.strip() == (f"test ({rows.num_rows:,} rows): the data has no labels, so no "
                                   f"metrics; predictions written to {predictions}")
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
