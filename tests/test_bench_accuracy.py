"""The accuracy benchmark: budgets fitted in closed form, and a smoke run of the command."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ctrserve.cli import main
from ctrserve.models.bench_accuracy import GOAL_AUC, VARIANTS, goal_verdict
from ctrserve.models.bootstrap import Interval
from ctrserve.models.budget import fit_pep, fit_pep_keep, full_bytes
from ctrserve.models.embeddings.scheme_settings import PEPSettings, SchemeSettings
from ctrserve.models.generate import CriteoLikeConfig, write_criteo_like
from ctrserve.models.schemes import build_tables, scheme_of

NAMES = ["a", "b", "c", "d", "e"]
SIZES = [3, 40, 700, 5000, 12]
DIM = 8


def fit_budget(base: SchemeSettings, budget: int):
    return scheme_of(base).fit_budget(base, NAMES, SIZES, DIM, budget)


@pytest.mark.parametrize("scheme", [name for name, base in VARIANTS.items()
                                    if not isinstance(base, PEPSettings)])
@pytest.mark.parametrize("fraction", [1 / 2, 1 / 4, 1 / 16, 1 / 64])
def test_fitted_bytes_are_the_built_tables_bytes_and_within_the_budget(scheme, fraction):
    budget = int(full_bytes(SIZES, DIM) * fraction)
    fitted = fit_budget(VARIANTS[scheme], budget)
    if not fitted.reachable:
        assert fitted.bytes > budget and fitted.reason
        return
    assert fitted.embeddings is not None
    tables = build_tables(NAMES, SIZES, DIM, fitted.embeddings)
    assert sum(t.inference_bytes() for t in tables) == fitted.bytes <= budget


def test_reachability_follows_each_schemes_floor():
    budget = full_bytes(SIZES, DIM) // 16
    reachable = {name: fit_budget(base, budget).reachable for name, base in VARIANTS.items()}
    # int8 stores 8 + 8 bytes of a 32-byte row, fp16 half of it; LMA's 4-byte signature per row
    # caps it under 8x at D = 8; PEP's offsets and mask bits take 5 of 32 bytes a row.
    assert reachable == {"full": False, "hash": True, "qr-mult": True, "qr-concat": True,
                         "kpart3": True, "pep-field-dim": False, "pep-feature-dim": False,
                         "lma": False, "robe": True, "int8": False, "fp16": False,
                         "hybrid": True, "cce": True}
    assert "offsets and mask bits" in fit_budget(VARIANTS["pep-field-dim"], budget).reason


@pytest.mark.parametrize("fraction", [1 / 3, 1 / 8, 1 / 50])
def test_hash_takes_the_most_bytes_under_the_budget(fraction):
    budget = int(full_bytes(SIZES, DIM) * fraction)
    best = max(
        total for cap in range(1, max(SIZES) + 1)
        if (total := sum(4 * DIM * n if n <= cap else 4 * DIM * cap + 8 for n in SIZES))
        <= budget
    )
    assert fit_budget(VARIANTS["hash"], budget).bytes == best


def test_pep_keeps_what_the_budget_leaves_after_its_index_data():
    budget = full_bytes(SIZES, DIM) // 4
    base = VARIANTS["pep-field-dim"]
    assert isinstance(base, PEPSettings)
    fitted = fit_pep(base, NAMES, SIZES, DIM, budget)
    assert fitted.embeddings is not None and not fitted.exact
    settings = fitted.embeddings.default
    assert isinstance(settings, PEPSettings)
    # One more value would not fit: 4 bytes a value.
    assert budget - 4 < fitted.bytes <= budget
    assert fit_pep_keep(base, SIZES, DIM, settings.pep_keep).bytes == fitted.bytes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    write_criteo_like(CriteoLikeConfig(n_rows=3000, cardinalities=(50, 400, 3000, 7), seed=1),
                      out, progress=False)
    return out


def bench(data: Path, out: Path, *extra: str) -> list[str]:
    return ["bench", "accuracy", "--data", str(data / "data.parquet"), "--spec",
            str(data / "spec.json"), "--split", "random", "--out", str(out), "--budgets", "1/4",
            "--seeds", "0", "--schemes", "full,hash,qr-mult,pep-field-dim,int8", "--dim", "8",
            "--bottom", "16", "--top", "16", "--epochs", "1", "--drift", "0.2", *extra]


def test_smoke_bench_writes_consistent_reports_and_reuses_its_cache(tiny, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(bench(tiny, out)) == 0
    assert "4 trainings" in capsys.readouterr().out
    assert (out / "auc_vs_bytes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads((out / "report.json").read_text())
    rows = {row["scheme"]: row for row in report["rows"]}
    assert rows["full"]["bytes"]["mean"] == report["full_bytes"]
    for scheme in ("hash", "qr-mult", "pep-field-dim"):
        row = rows[scheme]
        assert row["reachable"] and row["budget_bytes"] == report["full_bytes"] // 4
        assert row["bytes"]["max"] <= row["budget_bytes"]
        assert 0 < row["auc"]["mean"] < 1
    assert rows["pep-field-dim"]["parameters"]["max"] < report["full_bytes"] // 4 // 4
    assert not rows["int8"]["reachable"] and "50.0% of the full tables" in rows["int8"]["reason"]
    markdown = (out / "report.md").read_text()
    assert "| int8 | 1/4 | unreachable: " in markdown
    assert all(f"| {scheme} | " in markdown for scheme in rows)

    found = {(i["scheme"], i["against"]): i for i in report["intervals"]}
    assert set(found) == {("hash", "full"), ("qr-mult", "full"), ("pep-field-dim", "full"),
                          ("qr-mult", "hash"), ("pep-field-dim", "hash"),
                          ("hash", "qr-mult"), ("pep-field-dim", "qr-mult")}
    for interval in found.values():
        assert interval["low"] <= interval["difference"] <= interval["high"]
        assert interval["excludes_zero"] == (interval["low"] > 0 or interval["high"] < 0)
    qr_gap = rows["qr-mult"]["auc"]["mean"] - rows["hash"]["auc"]["mean"]
    assert found["qr-mult", "hash"]["difference"] == pytest.approx(qr_gap)
    assert found["hash", "qr-mult"]["difference"] == pytest.approx(-qr_gap)
    assert "ΔAUC against hashing at the same budget" in markdown
    assert "ΔAUC against QR (mult) at the same budget" in markdown
    assert f"within {GOAL_AUC} AUC of the full model" in markdown
    assert "95% paired bootstrap interval over test rows and seeds" in markdown

    cells = sorted((out / "cells").rglob("*.json"))
    assert len(cells) == 4
    for cell in cells:
        with np.load(cell.with_suffix(".npz")) as predictions:
            assert len(predictions["labels"]) == len(predictions["probabilities"]) == 300
    stamps = [os.stat(cell).st_mtime_ns for cell in cells]
    assert main(bench(tiny, out)) == 0
    assert "0 trainings" in capsys.readouterr().out
    assert [os.stat(cell).st_mtime_ns for cell in cells] == stamps
    assert json.loads((out / "report.json").read_text())["rows"] == report["rows"]

    assert main(bench(tiny, out, "--rerun", "hash:1/4")) == 0
    assert "1 trainings" in capsys.readouterr().out
    # A changed configuration is not served from the cache.
    assert main(bench(tiny, out, "--epochs", "2", "--schemes", "qr-mult")) == 0
    assert "1 trainings" in capsys.readouterr().out


def test_the_goal_is_met_only_where_the_whole_interval_clears_the_line():
    assert goal_verdict(Interval(-0.002, -0.0049, +0.001)) == "met"
    assert goal_verdict(Interval(-0.008, -0.012, -0.0051)) == "missed"
    assert goal_verdict(Interval(-0.004, -0.009, +0.001)) == "not shown"
    assert goal_verdict(Interval(-0.006, -0.009, -0.003)) == "not shown"
