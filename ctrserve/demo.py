"""The end-to-end demo on an embedded default: build the demo model package if it is missing
(generate data, train, evaluate, export, inspect) and a ranking model over generated users and
items whose features the embedded store joins, then serve both.

The demo model is fixed (README documents it): Criteo-shaped data with Criteo Kaggle's 26 table
sizes scaled down 100x, D=16, bottom MLP 13-512-256-64-16, top MLP 512-256-1, quotient-remainder
(4 collisions, mult) on every table of 2,000 rows or more. With ``once``, a few rows of the test
split are scored through the HTTP API, printed, and the server stops.
"""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import socket
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq

from ctrserve.export.package import PackageError, load_package
from ctrserve.export.package_description import describe
from ctrserve.models.generate import CriteoLikeConfig, scaled_cardinalities, write_criteo_like

DEMO_SCALE = 100
DEMO_NAME = "demo"
DEMO_VERSION = 1
DEMO_MODEL = {
    "kind": "dlrm",
    "dim": 16,
    "bottom": [512, 256, 64],
    "top": [512, 256],
    "embeddings": {
        "default": {"scheme": "qr", "collisions": 4, "operation": "mult", "min_rows": 2000}
    },
}
SHOWN_ROWS = 5
RANK_NAME = "rank"
#: The ranking demo: users, items and their interactions (``ctrserve generate entity``).
RANK_MODEL = {
    "kind": "dlrm", "dim": 16, "bottom": [64], "top": [64],
    "embeddings": {"default": {"scheme": "qr", "collisions": 4, "min_rows": 200}},
}
RANK_VIEW = {
    "entities": {
        "user": {"key_column": "user_id", "source": "users.parquet",
                 "columns": ["age_bucket", "gender", "occupation", "tenure_days"]},
        "item": {"key_column": "item_id", "source": "items.parquet",
                 "columns": ["genre", "year", "price", "price_bucket"]},
    },
    "context": ["hour", "device"],
    "defaults": {"gender": "unknown"},
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


def build_package(root: Path, rows: int, epochs: int) -> Path:
    """generate -> train -> evaluate -> export; returns the package directory."""
    from ctrserve.export.exporter import export_checkpoint
    from ctrserve.models.data import DataConfig
    from ctrserve.models.dlrm import ModelConfig
    from ctrserve.models.evaluate import evaluate
    from ctrserve.models.train import TrainConfig, fit
    from ctrserve.models.transform import TransformConfig

    from .tables import print_metrics, print_tables

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
    return export_checkpoint(checkpoint, root / "repo", DEMO_NAME, version=DEMO_VERSION,
                             overwrite=True)


def build_rank_package(root: Path, rows: int, epochs: int) -> Path:
    """Users x items interactions -> a ranking model with a feature view whose embedded store
    reads the users and items tables."""
    from ctrserve.export.exporter import export_checkpoint
    from ctrserve.models.data import DataConfig
    from ctrserve.models.dlrm import ModelConfig
    from ctrserve.models.generate import EntityConfig, write_entities, write_entity_joined
    from ctrserve.models.train import TrainConfig, fit
    from ctrserve.models.transform import TransformConfig

    data_dir = root / "entity-data"
    write_entities(EntityConfig(n_users=2000, n_items=500, n_rows=rows), data_dir)
    data = DataConfig(path=str(write_entity_joined(data_dir)), format="parquet",
                      spec_path=str(data_dir / "spec.json"), split="random")
    result = fit(data, ModelConfig.from_dict(RANK_MODEL),
                 TrainConfig(epochs=epochs, batch_size=512, progress=False), TransformConfig(),
                 str(root / "rank-checkpoint"))
    print(f"ranking model: test AUC {result['metrics']['test']['auc']:.4f}")
    # The view and its tables first: a server polling the repository may load the package the
    # moment the export renames it into place.
    model_directory = root / "repo" / RANK_NAME
    model_directory.mkdir(parents=True, exist_ok=True)
    for table in ("users.parquet", "items.parquet"):
        shutil.copy(data_dir / table, model_directory / table)
    (model_directory / "feature_view.json").write_text(json.dumps(RANK_VIEW, indent=2) + "\n")
    return export_checkpoint(root / "rank-checkpoint", root / "repo", RANK_NAME,
                             version=DEMO_VERSION, overwrite=True, log=lambda _: None)


def _package_ready(package: Path) -> bool:
    try:
        load_package(package)
    except PackageError:
        return False
    return True


def free_port(host: str) -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def sample_rows(data_file: Path, count: int) -> list[dict]:
    """The first ``count`` rows of the demo data as the API takes them (labels left out)."""
    table = pq.ParquetFile(data_file).read_row_group(0).slice(0, count)
    rows = []
    for record in table.to_pylist():
        record.pop("label", None)
        rows.append({k: v for k, v in record.items()
                     if v is not None and not (isinstance(v, float) and math.isnan(v))})
    return rows


def post_json(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


RANK_CANDIDATES = [{"item": "i7"}, {"item": "i19"}, {"item": "i404"}]
RANK_EXAMPLE = {"entities": {"user": "u42"}, "context": {"hour": 20, "device": "ios"},
                "candidates": RANK_CANDIDATES}


async def _serve_once(settings, rows: list[dict]) -> tuple[dict, dict]:
    import uvicorn

    from ctrserve.service.app import create_app

    server = uvicorn.Server(uvicorn.Config(create_app(settings), host=settings.host,
                                           port=settings.port, log_level="warning"))
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(600):
            if server.started or task.done():
                break
            await asyncio.sleep(0.1)
        if not server.started:
            raise RuntimeError("the server did not start")
        base = f"http://{settings.host}:{settings.port}/v1/models"
        scored = await asyncio.to_thread(post_json, f"{base}/{DEMO_NAME}/score", {"rows": rows})
        ranked = await asyncio.to_thread(post_json, f"{base}/{RANK_NAME}/rank", RANK_EXAMPLE)
        return scored, ranked
    finally:
        server.should_exit = True
        await task


def run(workdir: str, rows: int, epochs: int, rebuild: bool = False, once: bool = False,
        host: str = "127.0.0.1", port: int = 8000, entity_rows: int = 100_000) -> int:
    from ctrserve.service.server import serve
    from ctrserve.service.settings import ServiceSettings

    root = Path(workdir)
    package = root / "repo" / DEMO_NAME / str(DEMO_VERSION)
    if rebuild or not _package_ready(package):
        package = build_package(root, rows, epochs)
    else:
        print(f"using the demo package {package} (--rebuild builds it again)")
    report, intact = describe(package)
    print(f"'ctrserve inspect {package}':\n{report}")
    if not intact:
        return 1
    rank_package = root / "repo" / RANK_NAME / str(DEMO_VERSION)
    if rebuild or not _package_ready(rank_package):
        build_rank_package(root, entity_rows, epochs)
    settings = ServiceSettings(repo=root / "repo", models=[DEMO_NAME, RANK_NAME], host=host,
                               port=port or free_port(host))
    if not once:
        print(f"serving on http://{settings.host}:{settings.port} (docs at /docs); try:\n"
              f"  curl -X POST http://{settings.host}:{settings.port}/v1/models/{DEMO_NAME}/"
              "score -d '{\"rows\": [{\"I1\": 3, \"C1\": 17}]}'\n"
              f"  curl -X POST http://{settings.host}:{settings.port}/v1/models/{RANK_NAME}/"
              f"rank -d '{json.dumps(RANK_EXAMPLE)}'")
        return serve(settings)
    shown = sample_rows(root / "data" / "data.parquet", SHOWN_ROWS)
    answer, ranked = asyncio.run(_serve_once(settings, shown))
    print(f"POST /v1/models/{DEMO_NAME}/score with {len(shown)} rows -> "
          f"model {answer['model']} version {answer['version']}")
    for row, probability in zip(shown, answer["probabilities"], strict=True):
        features = ", ".join(f"{k}={v}" for k, v in list(row.items())[:4])
        print(f"  p(click) = {probability:.4f}   ({features}, ...)")
    print(f"POST /v1/models/{RANK_NAME}/rank for user u42 (features joined from the embedded "
          "store):")
    for candidate, probability in zip(RANK_CANDIDATES, ranked["probabilities"], strict=True):
        print(f"  item {candidate['item']}: p(click) = {probability:.4f}")
    return 0
