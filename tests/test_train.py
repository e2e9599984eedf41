"""Training and evaluation end to end, on generated and (where present) real data."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from ctrserve.cli import build_parser, data_config, main
from ctrserve.models.checkpoint import load_checkpoint
from ctrserve.models.data import DataConfig
from ctrserve.models.dlrm import ModelConfig
from ctrserve.models.embeddings.scheme_settings import (
    EmbeddingConfig,
    HashSettings,
    Int8Settings,
    LMASettings,
    PEPSettings,
    QRSettings,
    RobeSettings,
)
from ctrserve.models.evaluate import evaluate
from ctrserve.models.generate import CriteoLikeConfig, write_criteo_like
from ctrserve.models.schema import DatasetSpec
from ctrserve.models.train import fit
from ctrserve.models.trainer import TrainConfig
from ctrserve.models.transform import TransformConfig

SMALL = ModelConfig(dim=8, bottom=(32,), top=(32,))
QR_SMALL = replace(SMALL, embeddings=EmbeddingConfig(default=QRSettings(collisions=4)))
HASH_SMALL = replace(SMALL, embeddings=EmbeddingConfig(default=HashSettings(compression=4)))
QUICK = TrainConfig(epochs=1, batch_size=512, progress=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> tuple[DataConfig, dict]:
    out = tmp_path_factory.mktemp("generated")
    config = CriteoLikeConfig(n_rows=20_000, cardinalities=(50, 400, 3000, 7, 20_000), seed=1)
    record = write_criteo_like(config, out, progress=False)
    data = DataConfig(path=str(out / "data.parquet"), format="parquet",
                      spec_path=str(out / "spec.json"), split="random")
    return data, record


def test_checkpoint_evaluates_to_the_metrics_training_reported(generated, tmp_path):
    data, _ = generated
    result = fit(data, SMALL, QUICK, TransformConfig(), str(tmp_path / "ckpt"))
    predictions = tmp_path / "p.txt"
    again = evaluate(tmp_path / "ckpt", part="test", predictions_path=predictions)
    assert again["auc"] == pytest.approx(result["metrics"]["test"]["auc"], abs=1e-9)
    assert again["logloss"] == pytest.approx(result["metrics"]["test"]["logloss"], abs=1e-7)
    rows = result["metrics"]["test"]["rows"]
    assert len(predictions.read_text().split()) == again["rows"] == rows
    # The weights file holds tensors only: it loads with weights_only=True.
    state = torch.load(tmp_path / "ckpt" / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"config.json", "transform",
                                                                "weights.pt", "spec.json"}
    assert DatasetSpec.load(tmp_path / "ckpt" / "spec.json") == data.spec()


def test_mixed_schemes_follow_the_size_threshold(generated, tmp_path):
    data, _ = generated
    config = ModelConfig(dim=8, bottom=(16,), top=(16,), embeddings=EmbeddingConfig(
        default=QRSettings(collisions=4, min_rows=1000),
        tables={"C5": HashSettings(compression=8)},
    ))
    result = fit(data, config, QUICK, TransformConfig(), str(tmp_path / "ckpt"))
    schemes = {t["table"]: t["scheme"] for t in result["tables"]}
    assert schemes == {"C1": "full", "C2": "full", "C3": "qr", "C4": "full", "C5": "hash"}
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert [t["scheme"] for t in loaded.model.table_summaries()] == list(schemes.values())


def test_training_approaches_the_oracle_on_generated_data(tmp_path):
    # Main effects only: the pairwise interactions need many more epochs than a test can spend
    # (README reports the longer run with them).
    config = CriteoLikeConfig(n_rows=200_000, cardinalities=(3, 10, 30, 100, 300), seed=2,
                              interaction_effect=0.0)
    record = write_criteo_like(config, tmp_path / "data", progress=False)
    data = DataConfig(path=str(tmp_path / "data" / "data.parquet"), format="parquet",
                      spec_path=str(tmp_path / "data" / "spec.json"), split="random")
    result = fit(data, SMALL, TrainConfig(epochs=2, batch_size=1024, progress=False),
                 TransformConfig(), str(tmp_path / "ckpt"))
    assert result["metrics"]["test"]["auc"] > record["oracle_auc"] - 0.02


def frappe(shared_data: Path) -> DataConfig:
    return DataConfig(path=str(shared_data / "frappe" / "frappe.validation.libfm"),
                      format="libfm", test_path=str(shared_data / "frappe" / "frappe.test.libfm"),
                      split="random", fractions=(0.9, 0.1))


@pytest.mark.slow
def test_dlrm_beats_logistic_regression_on_frappe(shared_data, tmp_path):
    data = frappe(shared_data)
    dlrm = fit(data, ModelConfig(dim=16, top=(256, 128)),
               TrainConfig(epochs=6, embedding_lr=0.05, progress=False), TransformConfig(),
               str(tmp_path / "dlrm"))
    lr = fit(data, ModelConfig(kind="lr"), TrainConfig(epochs=6, embedding_lr=0.05, lr=0.01,
                                                       progress=False),
             TransformConfig(), str(tmp_path / "lr"))
    assert dlrm["metrics"]["test"]["auc"] > lr["metrics"]["test"]["auc"] + 0.005
    assert dlrm["metrics"]["test"]["auc"] > 0.93


def test_cli_trains_and_evaluates(generated, tmp_path):
    data, _ = generated
    command = [sys.executable, "-m", "ctrserve", "train", "--data", data.path, "--spec",
               data.spec_path, "--split", "random", "--out", str(tmp_path / "ckpt"),
               "--dim", "8", "--bottom", "16", "--top", "16", "--scheme", "qr",
               "--collisions", "4", "--epochs", "1", "--no-progress"]
    trained = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "qr" in trained.stdout and "test (best epoch 1): AUC" in trained.stdout
    evaluated = subprocess.run(
        [sys.executable, "-m", "ctrserve", "evaluate", str(tmp_path / "ckpt"), "--json"],
        capture_output=True, text=True, check=True,
    )
    metrics = json.loads(evaluated.stdout)
    recorded = json.loads((tmp_path / "ckpt" / "config.json").read_text())["metrics"]["test"]
    assert metrics["auc"] == pytest.approx(recorded["auc"], abs=1e-9)


def test_cli_reports_a_malformed_line_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.tsv"
    good = "0\t" + "\t".join(["1"] * 13) + "\t" + "\t".join(["68fd1e64"] * 26)
    bad.write_text(good + "\n" + good + "\n" + "1\tnot-a-number\n")
    run = subprocess.run(
        [sys.executable, "-m", "ctrserve", "train", "--data", str(bad), "--out",
         str(tmp_path / "ckpt"), "--epochs", "1", "--no-progress"],
        capture_output=True, text=True,
    )
    assert run.returncode == 1
    assert f"{bad}, line 3" in run.stderr and "Traceback" not in run.stderr
    assert not (tmp_path / "ckpt").exists()


def test_predictions_are_probabilities(generated, tmp_path):
    data, _ = generated
    fit(data, SMALL, QUICK, TransformConfig(hash_buckets=1000), str(tmp_path / "ckpt"))
    out = tmp_path / "p.txt"
    evaluate(tmp_path / "ckpt", part="valid", predictions_path=out)
    values = np.loadtxt(out)
    assert ((values > 0) & (values < 1)).all()


def test_int8_tables_are_trained_full_then_quantized(generated, tmp_path):
    data, _ = generated
    config = ModelConfig(dim=16, bottom=(16,), top=(16,), embeddings=EmbeddingConfig(
        default=Int8Settings(min_rows=1000)))
    result = fit(data, config, QUICK, TransformConfig(), str(tmp_path / "ckpt"))
    schemes = {t["table"]: t["scheme"] for t in result["tables"]}
    assert schemes == {"C1": "full", "C2": "full", "C3": "int8", "C4": "full", "C5": "int8"}
    ratios = [t["ratio"] for t in result["tables"] if t["scheme"] == "int8"]
    assert ratios == [pytest.approx(64 / 24)] * 2
    again = evaluate(tmp_path / "ckpt", part="test")
    assert again["auc"] == pytest.approx(result["metrics"]["test"]["auc"], abs=1e-9)


@pytest.mark.parametrize("settings", [
    LMASettings(compression=8, min_rows=1000, sample_rows=5000),
    RobeSettings(compression=8, min_rows=1000),
], ids=lambda settings: settings.scheme)
def test_shared_memory_schemes_train_and_reload(generated, tmp_path, settings):
    data, _ = generated
    config = ModelConfig(dim=16, bottom=(16,), top=(16,),
                         embeddings=EmbeddingConfig(default=settings))
    result = fit(data, config, QUICK, TransformConfig(), str(tmp_path / "ckpt"))
    shared = [t for t in result["tables"] if t["scheme"] == settings.scheme]
    assert [t["table"] for t in shared] == ["C3", "C5"]
    stored = sum(t["bytes"] for t in shared)
    full = sum(t["full_bytes"] for t in shared)
    assert full / 8 - 16 <= stored <= full / 8
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.model.table_summaries() == result["tables"]
    again = evaluate(tmp_path / "ckpt", part="test")
    assert again["auc"] == pytest.approx(result["metrics"]["test"]["auc"], abs=1e-9)


def test_pep_searches_a_mask_then_retrains_with_it(generated, tmp_path):
    data, _ = generated
    config = ModelConfig(dim=16, bottom=(16,), top=(16,), embeddings=EmbeddingConfig(
        default=PEPSettings(pep_keep=0.3, drift=0.05)))
    result = fit(data, config, QUICK, TransformConfig(), str(tmp_path / "ckpt"))
    search = result["pep_search"]
    assert search["nonzeros"] <= 0.3 * search["full"] and search["steps"] > 0
    kept = sum(t["parameters"] for t in result["tables"])
    full = sum(t["rows"] * t["dim"] for t in result["tables"])
    assert kept <= 0.3 * full  # retraining kept the mask
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.model.table_summaries() == result["tables"]
    again = evaluate(tmp_path / "ckpt", part="test")
    assert again["auc"] == pytest.approx(result["metrics"]["test"]["auc"], abs=1e-9)


def test_the_split_is_the_same_whatever_the_training_seed(generated, tmp_path):
    data, _ = generated
    runs = [fit(data, SMALL, replace(QUICK, seed=seed), TransformConfig(),
                str(tmp_path / f"seed{seed}")) for seed in (0, 1)]
    np.testing.assert_array_equal(runs[0]["test_labels"], runs[1]["test_labels"])
    assert len(runs[0]["test_labels"]) == 2000  # exactly 10% of 20,000 rows
    assert runs[0]["data"] == runs[1]["data"]
    assert not np.array_equal(runs[0]["test_probabilities"], runs[1]["test_probabilities"])
    moved = replace(data, split_seed=1)
    assert [len(b) for b in moved.batches("test")] == [2000]
    assert not np.array_equal(next(moved.batches("test")).labels, runs[0]["test_labels"])
    args = build_parser("train").parse_args(
        ["train", "--data", data.path, "--out", "x", "--seed", "7", "--split", "random"])
    assert args.seed == 7 and data_config(args, infer_spec=False).split_seed == 0


def test_a_validation_file_of_its_own(generated, tmp_path):
    data, _ = generated
    other = CriteoLikeConfig(n_rows=3000, cardinalities=(50, 400, 3000, 7, 20_000), seed=9)
    write_criteo_like(other, tmp_path / "valid", progress=False)
    with_valid = replace(data, valid_path=str(tmp_path / "valid" / "data.parquet"),
                         fractions=(0.9, 0.1))
    assert with_valid.cut_parts() == ("train", "test")
    result = fit(with_valid, SMALL, QUICK, TransformConfig(), str(tmp_path / "ckpt"))
    assert result["metrics"]["valid"]["rows"] == 3000
    assert result["history"][0]["rows"] == 18_000 and len(result["test_labels"]) == 2000
    args = build_parser("train").parse_args(
        ["train", "--data", data.path, "--spec", str(data.spec_path), "--out", "x",
         "--valid-data", with_valid.valid_path])
    parsed = data_config(args)
    assert parsed.valid_path == with_valid.valid_path and parsed.fractions == (0.9, 0.1)
    both = build_parser("train").parse_args(
        ["train", "--data", data.path, "--spec", str(data.spec_path), "--out", "x",
         "--valid-data", with_valid.valid_path, "--test-data", with_valid.valid_path])
    assert data_config(both).fractions == (1.0,)


def test_training_stops_once_validation_stops_improving(generated, tmp_path):
    data, _ = generated
    patient = TrainConfig(epochs=12, patience=2, batch_size=256, embedding_lr=0.1,
                          progress=False)
    result = fit(data, SMALL, patient, TransformConfig(), str(tmp_path / "ckpt"))
    aucs = [record["valid"]["auc"] for record in result["history"]]
    assert result["stopped_early"] and len(aucs) == result["best_epoch"] + 2 < 12
    assert max(aucs[-2:]) <= aucs[result["best_epoch"] - 1] == max(aucs)
    assert result["metrics"]["valid"]["auc"] == max(aucs)


@pytest.mark.parametrize("settings", [
    LMASettings(compression=8, min_rows=1000, sample_rows=5000),
    RobeSettings(compression=8, min_rows=1000),
], ids=lambda settings: settings.scheme)
def test_shared_memory_hashes_follow_the_training_seed(generated, tmp_path, settings):
    data, _ = generated
    config = ModelConfig(dim=16, bottom=(16,), top=(16,),
                         embeddings=EmbeddingConfig(default=settings))
    coefficients = []
    for seed in (0, 1):
        result = fit(data, config, replace(QUICK, seed=seed), TransformConfig(),
                     str(tmp_path / f"seed{seed}"))
        shared = [t for t in result["tables"] if t["scheme"] == settings.scheme]
        assert {t["settings"]["seed"] for t in shared} == {seed}
        loaded = load_checkpoint(tmp_path / f"seed{seed}")
        assert loaded.model_config.embeddings.default.seed == seed
        coefficients.append(loaded.model.tables[2].coefficients)
    assert not torch.equal(*coefficients)
    # A seed set in the configuration is kept.
    fixed = replace(config, embeddings=EmbeddingConfig(default=replace(settings, seed=5)))
    result = fit(data, fixed, replace(QUICK, seed=1), TransformConfig(), str(tmp_path / "five"))
    assert {t["settings"]["seed"] for t in result["tables"] if t["scheme"] == settings.scheme} \
        == {5}


def test_compare_gives_a_paired_interval_over_seeds(generated, tmp_path, capsys):
    data, _ = generated
    paths = {}
    for name, config in (("qr", QR_SMALL), ("hash", HASH_SMALL)):
        for seed in (0, 1):
            paths[name, seed] = str(tmp_path / f"{name}{seed}")
            fit(data, config, replace(QUICK, seed=seed), TransformConfig(), paths[name, seed])
    command = ["compare", paths["qr", 0], paths["qr", 1], "--against", paths["hash", 0],
               paths["hash", 1], "--replicates", "200"]
    assert main([*command, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["rows"] == 2000 and result["seeds"] == 2
    assert result["difference"] == pytest.approx(result["auc"][0] - result["auc"][1])
    assert result["low"] <= result["difference"] <= result["high"]
    assert main(command) == 0
    assert "95% paired bootstrap over rows and seeds" in capsys.readouterr().out
    assert main([*command[:3], "--against", paths["hash", 0]]) == 1
    assert "pairs models seed by seed" in capsys.readouterr().err
