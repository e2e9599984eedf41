"""What each scheme's package costs: bytes on disk and process memory of an ONNX Runtime session.

For every scheme a DLRM over Criteo Kaggle's 26 table sizes divided by ``--scale-down`` is built
(weights as initialised: memory does not depend on training; PEP gets a random mask keeping
``--pep-keep`` of the values, int8/fp16 are quantized), saved as a checkpoint and exported with
the usual checks. Then a fresh process per package measures its resident set size just before
and just after ``InferenceSession(...)`` with all graph optimisations on (after one warm-up run,
too), so each figure is what holding that model costs a server.

    python -m ctrserve.export.memory_bench --out docs/export
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ctrserve.models.checkpoint import save_checkpoint
from ctrserve.models.dlrm import ModelConfig, build_model
from ctrserve.models.embeddings.pep import PEPTable
from ctrserve.models.embeddings.scheme_settings import (
    EmbeddingConfig,
    FP16Settings,
    FullSettings,
    HashSettings,
    Int8Settings,
    KPartSettings,
    LMASettings,
    PEPSettings,
    QRSettings,
    RobeSettings,
    SchemeSettings,
)
from ctrserve.models.generate import CRITEO_CARDINALITIES
from ctrserve.models.quantize import quantize_model
from ctrserve.models.schema import CategoricalColumn, DatasetSpec, LabelRule
from ctrserve.models.transform import CategoricalEncoder, DenseEncoder, FeatureTransform

from .exporter import export_checkpoint

SCHEMES: dict[str, SchemeSettings] = {
    "full": FullSettings(),
    "int8": Int8Settings(min_rows=2000),
    "fp16": FP16Settings(min_rows=2000),
    "hash 4x": HashSettings(min_rows=2000, compression=4),
    "qr 4 (mult)": QRSettings(min_rows=2000, collisions=4),
    "qr 60 (mult)": QRSettings(min_rows=2000, collisions=60),
    "kpart 3": KPartSettings(min_rows=2000, partitions=3),
    "pep 10%": PEPSettings(min_rows=2000),
    "lma 8x": LMASettings(min_rows=2000, compression=8),
    "robe 16x": RobeSettings(min_rows=2000, compression=16),
}

_MEASURE = """
import json, os, sys
import numpy as np, onnxruntime as ort
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
options = ort.SessionOptions()
options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
options.intra_op_num_threads = 1
before = rss()
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
after_load = rss()
feed = {i.name: np.zeros([4, i.shape[1]], np.float32 if "float" in i.type else np.int64)
        for i in session.get_inputs()}
session.run(None, feed)
print(json.dumps({"before": before, "after_load": after_load, "after_run": rss()}))
"""


def _transform(sizes: list[int], n_dense: int) -> FeatureTransform:
    """A transform whose vocabularies give tables of exactly ``sizes`` rows."""
    columns = [CategoricalColumn(f"C{i + 1}", "int") for i in range(len(sizes))]
    spec = DatasetSpec(label=LabelRule("label"), dense=tuple(f"I{i + 1}" for i in range(n_dense)),
                       categorical=tuple(columns))
    categorical = [
        CategoricalEncoder(column, "vocab", vocabulary=np.arange(n - 2, dtype=np.uint64))
        for column, n in zip(columns, sizes, strict=True)
    ]
    return FeatureTransform(spec, [DenseEncoder(name) for name in spec.dense], categorical)


def build_checkpoint(scheme: SchemeSettings, sizes: list[int], pep_keep: float,
                     out: Path) -> None:
    torch.manual_seed(0)
    transform = _transform(sizes, 13)
    config = ModelConfig(dim=16, bottom=(512, 256, 64), top=(512, 256),
                         embeddings=EmbeddingConfig(default=scheme))
    training = replace(config, embeddings=config.embeddings.for_training())
    names = [c.name for c in transform.spec.categorical]
    model = build_model(13, sizes, names, training)
    for table in model.embedding_tables():
        if isinstance(table, PEPTable):
            table.fix_mask(torch.rand(table.num_embeddings, table.dim) < pep_keep)
    quantize_model(model, config.embeddings)
    model.config = config
    model.eval()
    save_checkpoint(out, model, transform, {"metrics": {}, "data": {"generated": "random"}})


def measure(model_path: Path) -> dict:
    result = subprocess.run([sys.executable, "-c", _MEASURE, str(model_path)],
                            capture_output=True, text=True, check=True, timeout=600)
    return json.loads(result.stdout)


def run(out: Path, scale_down: int, pep_keep: float) -> list[dict]:
    sizes = [max(3, n // scale_down) for n in CRITEO_CARDINALITIES]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ctrserve-memory-") as work:
        for label, scheme in SCHEMES.items():
            checkpoint = Path(work) / "ckpt"
            build_checkpoint(scheme, sizes, pep_keep, checkpoint)
            package = export_checkpoint(checkpoint, Path(work) / "repo", "m", log=lambda _: None)
            manifest = json.loads((package / "manifest.json").read_text())
            memory = measure(package / "model.onnx")
            rows.append({
                "scheme": label,
                "embedding_bytes": manifest["bytes"]["embeddings"],
                "full_embedding_bytes": manifest["bytes"]["full_embeddings"],
                "package_bytes": sum(f["bytes"] for f in manifest["files"].values()),
                "vocabulary_bytes": manifest["files"]["transform/vocabulary.npz"]["bytes"],
                "session_rss_delta": memory["after_load"] - memory["before"],
                "rss_after_first_run": memory["after_run"] - memory["before"],
                "parity_max_abs_diff": manifest["parity"]["max_abs_diff"],
            })
            print(json.dumps(rows[-1]), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(
        {"table_sizes": sizes, "pep_keep": pep_keep, "rows": rows}, indent=2) + "\n")
    (out / "memory.md").write_text(markdown(rows, sizes))
    return rows


def markdown(rows: list[dict], sizes: list[int]) -> str:
    full = next(r for r in rows if r["scheme"] == "full")
    mib = 1 << 20
    lines = [
        f"Tables: Criteo Kaggle's 26 sizes scaled down ({sum(sizes):,} rows, D=16); tables of "
        "2,000 rows or more use the scheme.",
        "",
        "| scheme | embedding MiB | ratio | package MiB | of which vocabulary MiB | "
        "session RSS delta MiB | after first run MiB | delta vs full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['scheme']} | {row['embedding_bytes'] / mib:.1f} | "
            f"{row['full_embedding_bytes'] / row['embedding_bytes']:.2f}x | "
            f"{row['package_bytes'] / mib:.1f} | {row['vocabulary_bytes'] / mib:.1f} | "
            f"{row['session_rss_delta'] / mib:.1f} | "
            f"{row['rss_after_first_run'] / mib:.1f} | "
            f"{row['session_rss_delta'] / full['session_rss_delta']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/export", help="where memory.md/json go")
    parser.add_argument("--scale-down", type=int, default=10,
                        help="divide Criteo Kaggle's table sizes by this")
    parser.add_argument("--pep-keep", type=float, default=0.1)
    args = parser.parse_args(argv)
    run(Path(args.out), args.scale_down, args.pep_keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
