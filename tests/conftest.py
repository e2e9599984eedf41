"""Shared pytest fixtures."""

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data samples beside the project (``../shared/data``); skips where absent."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not root.is_dir():
        pytest.skip(f"real data samples not found at {root}")
    return root


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> dict:
    """A small QR model trained on generated data and exported to ``repo/ctr/1``, with the
    checkpoint, the data config and a 300-row file of raw rows to score."""
    import pyarrow.parquet as pq

    from ctrserve.export.exporter import export_checkpoint
    from ctrserve.models.data import DataConfig
    from ctrserve.models.dlrm import ModelConfig
    from ctrserve.models.embeddings.scheme_settings import EmbeddingConfig, QRSettings
    from ctrserve.models.generate import CriteoLikeConfig, write_criteo_like
    from ctrserve.models.train import TrainConfig, fit
    from ctrserve.models.transform import TransformConfig

    root = tmp_path_factory.mktemp("service")
    config = CriteoLikeConfig(n_rows=8000, cardinalities=(50, 400, 3000, 7, 6000), seed=5)
    write_criteo_like(config, root / "data", progress=False)
    data = DataConfig(path=str(root / "data" / "data.parquet"), format="parquet",
                      spec_path=str(root / "data" / "spec.json"), split="random")
    model = ModelConfig(dim=8, bottom=(16,), top=(16,), embeddings=EmbeddingConfig(
        default=QRSettings(min_rows=100, collisions=4)))
    fit(data, model, TrainConfig(epochs=1, batch_size=256, progress=False), TransformConfig(),
        str(root / "ckpt"))
    repo = root / "repo"
    export_checkpoint(root / "ckpt", repo, "ctr", log=lambda _: None)
    rows_file = root / "rows.parquet"
    pq.write_table(pq.read_table(data.path).slice(0, 300), rows_file)
    return {"root": root, "repo": repo, "checkpoint": root / "ckpt", "data": data,
            "rows_file": rows_file}
