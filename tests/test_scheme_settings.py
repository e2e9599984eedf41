"""Scheme settings in JSON: per-table records override the default, unknown settings are refused
by name, and the flat records of checkpoints written before per-scheme settings still load."""

import subprocess
import sys

import pytest

from ctrserve.cli import main
from ctrserve.models.dlrm import ModelConfig, build_model
from ctrserve.models.embeddings.compositional import CompositionalTable
from ctrserve.models.embeddings.full import FullTable
from ctrserve.models.embeddings.hashing import HashedTable
from ctrserve.models.embeddings.scheme_settings import (
    SETTINGS,
    EmbeddingConfig,
    FullSettings,
    HashSettings,
    KPartSettings,
    LMASettings,
    QRSettings,
    RobeSettings,
    settings_from_dict,
)
from ctrserve.models.schemes import build_tables

#: What checkpoints written before per-scheme settings hold for each table: every setting of
#: every scheme (here a QR default and a hash override, from ``SchemeConfig.to_dict``).
FLAT_QR = {"scheme": "qr", "min_rows": 2000, "compression": 4.0, "collisions": 8,
           "partitions": 3, "operation": "add", "minhashes": 1, "sample_rows": 100000,
           "block": 4, "seed": 0, "granularity": "field_dimension",
           "threshold_init": -6.906754778648554, "pep_keep": 0.1, "drift": 0.01}
FLAT_HASH = {**FLAT_QR, "scheme": "hash", "compression": 16.0}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_settings_round_trip_through_json(name):
    settings = SETTINGS[name](min_rows=7)
    record = settings.to_dict()
    assert record["scheme"] == name and record["min_rows"] == 7
    assert settings_from_dict(record) == settings


def test_a_record_names_only_its_schemes_settings():
    assert QRSettings(collisions=8).to_dict() == {"scheme": "qr", "min_rows": None, "collisions": 8,
                                                  "operation": "mult"}
    assert FullSettings().to_dict() == {"scheme": "full", "min_rows": None}


def test_an_unknown_setting_is_an_error_naming_the_scheme_and_its_settings():
    with pytest.raises(ValueError, match=r"scheme 'qr' has no setting 'compression'; its "
                                         r"settings: min_rows, collisions, operation$"):
        settings_from_dict({"scheme": "qr", "compression": 8})
    with pytest.raises(ValueError, match="scheme 'robe' has no setting 'minhashes'"):
        EmbeddingConfig.from_dict({"default": {"scheme": "lma"},
                                   "tables": {"C1": {"scheme": "robe", "minhashes": 2}}})
    with pytest.raises(ValueError,
                       match="unknown scheme 'qrr'; choose one of full, hash, hybrid, qr"):
        settings_from_dict({"scheme": "qrr"})


def test_table_records_override_the_default():
    config = EmbeddingConfig.from_dict({
        "default": {"scheme": "qr", "collisions": 8, "operation": "concat", "min_rows": 2000},
        "tables": {"C1": {"collisions": 2}, "C2": {"scheme": "kpart"},
                   "C3": {"scheme": "hash", "min_rows": 0}},
    })
    assert config.default == QRSettings(collisions=8, operation="concat", min_rows=2000)
    assert config.for_table("C1") == QRSettings(collisions=2, operation="concat", min_rows=2000)
    # A setting of the same name carries over to another scheme; the others do not.
    assert config.for_table("C2") == KPartSettings(operation="concat", min_rows=2000)
    assert config.for_table("C3") == HashSettings(min_rows=0)
    assert config.for_table("C9") is config.default
    assert EmbeddingConfig.from_dict(config.to_dict()) == config


def test_shared_memory_settings_carry_over_between_lma_and_robe():
    config = EmbeddingConfig.from_dict({
        "default": {"scheme": "lma", "compression": 8, "seed": 3, "minhashes": 2},
        "tables": {"C1": {"scheme": "robe", "block": 2}},
    })
    assert config.for_table("C1") == RobeSettings(compression=8, seed=3, block=2)


def test_checkpoints_with_flat_records_load_as_before():
    model_record = {"kind": "dlrm", "dim": 8, "bottom": [16], "top": [16],
                    "embeddings": {"default": FLAT_QR, "tables": {"C2": FLAT_HASH}}}
    config = ModelConfig.from_dict(model_record)
    assert config.embeddings.default == QRSettings(min_rows=2000, collisions=8, operation="add")
    assert config.embeddings.for_table("C2") == HashSettings(min_rows=2000, compression=16.0)
    model = build_model(0, [100, 4000, 3000], ["C1", "C2", "C3"], config)
    full, hashed, qr = model.embedding_tables()
    assert isinstance(full, FullTable) and isinstance(hashed, HashedTable)
    assert isinstance(qr, CompositionalTable) and qr.radices == (8, 375)
    # The first flat records had only the settings of full, hash, qr and kpart.
    first = {"scheme": "hash", "min_rows": 0, "compression": 2.0, "collisions": 4,
             "partitions": 3, "operation": "mult"}
    assert settings_from_dict(first) == HashSettings(min_rows=0, compression=2.0)


def test_cli_scheme_flags_are_checked_against_the_scheme(tmp_path, capsys):
    command = ["train", "--data", str(tmp_path / "x.tsv"), "--out", str(tmp_path / "ckpt"),
               "--scheme", "hash", "--collisions", "4"]
    assert main(command) == 1
    assert "scheme 'hash' has no setting 'collisions'" in capsys.readouterr().err


def test_reading_the_settings_loads_no_torch():
    code = ("import sys; from ctrserve.models.embeddings.scheme_settings import SETTINGS; "
            "print('torch' in sys.modules, len(SETTINGS))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.split() == ["False", "11"]


def test_lma_settings_shared_by_a_memory_must_agree():
    config = EmbeddingConfig(default=LMASettings(sample_rows=500, min_rows=0),
                             tables={"b": LMASettings(sample_rows=600, min_rows=0)})
    with pytest.raises(ValueError, match="all lma tables share one memory: give them the same "
                                         "compression, seed, minhashes, sample_rows"):
        build_tables(["a", "b"], [50, 60], 4, config)
