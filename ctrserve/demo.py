"""The end-to-end demo on an embedded default: generate data, train the demo model, evaluate it,
export it as a model package into ``<workdir>/repo`` and inspect the package.

The demo model is fixed (README documents it): Criteo-shaped data with Criteo Kaggle's 26 table
sizes scaled down 100x, D=16, bottom MLP 13-512-256-64-16, top MLP 512-256-1, quotient-remainder
(4 collisions, mult) on every table of 2,000 rows or more.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctrserve.models.generate import CriteoLikeConfig, scaled_cardinalities, write_criteo_like

from .report import print_metrics, print_tables

DEMO_SCALE = 100
DEMO_MODEL = {
    "kind": "dlrm",
    "dim": 16,
    "bottom": [512, 256, 64],
    "top": [512, 256],
    "embeddings": {
        "default": {"scheme": "qr", "collisions": 4, "operation": "mult", "min_rows": 2000}
    },
}


def ensure_data(directory: Path, rows: int, seed: int = 0) -> dict:
    """Writes the demo data unless the same configuration is already there."""
    config = CriteoLikeConfig(
        n_rows=rows, cardinalities=scaled_cardinalities(DEMO_SCALE), seed=seed
    )
    record = directory / "generator.json"
    if record.is_file():
        existing = json.loads(record.read_text())
        if existing.get("rows") == rows and existing.get("config", {}).get("seed") == seed:
            return existing
    return write_criteo_like(config, directory)


def run(workdir: str, rows: int, epochs: int) -> int:
    from ctrserve.export.exporter import export_checkpoint
    from ctrserve.export.inspect import describe
    from ctrserve.models.data import DataConfig
    from ctrserve.models.dlrm import ModelConfig
    from ctrserve.models.evaluate import evaluate
    from ctrserve.models.train import TrainConfig, fit
    from ctrserve.models.transform import TransformConfig

    root = Path(workdir)
    data_dir = root / "data"
    generated = ensure_data(data_dir, rows)
    print(f"data: {rows:,} generated rows in {data_dir} "
          f"(CTR {generated['ctr']:.3f}, oracle AUC {generated['oracle_auc']:.4f})")
    data = DataConfig(
        path=str(data_dir / "data.parquet"), format="parquet",
        spec_path=str(data_dir / "spec.json"), split="random", fractions=(0.8, 0.1, 0.1),
    )
    checkpoint = root / "checkpoint"
    result = fit(
        data, ModelConfig.from_dict(DEMO_MODEL), TrainConfig(epochs=epochs, batch_size=1024),
        TransformConfig(), str(checkpoint),
    )
    print_tables(result["tables"])
    print_metrics(f"valid (best epoch {result['best_epoch']})", result["metrics"]["valid"])
    test = evaluate(checkpoint, part="test")
    print_metrics(f"test, 'ctrserve evaluate {checkpoint}'", test)
    print(f"oracle AUC on the generated data: {generated['oracle_auc']:.4f}")
    package = export_checkpoint(checkpoint, root / "repo", "demo", overwrite=True,
                                version=1)
    report, intact = describe(package)
    print(f"'ctrserve inspect {package}':")
    print(report)
    return 0 if intact else 1
