"""Export: every scheme becomes a checked ONNX package that matches torch; damaged packages and
interrupted exports are caught."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ctrserve.export.exporter import ExportError, export_checkpoint
from ctrserve.export.functions import DOMAIN
from ctrserve.export.package import PackageError, load_package, versions
from ctrserve.export.parity import parity_batches, session_options
from ctrserve.models.checkpoint import load_checkpoint, save_checkpoint
from ctrserve.models.data import DataConfig
from ctrserve.models.dlrm import ModelConfig, build_model
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
from ctrserve.models.generate import CriteoLikeConfig, write_criteo_like
from ctrserve.models.train import fit
from ctrserve.models.trainer import TrainConfig
from ctrserve.models.transform import TransformConfig

QUICK = TrainConfig(epochs=1, batch_size=256, progress=False)
SCHEMES: dict[str, SchemeSettings] = {
    "full": FullSettings(),
    "hash": HashSettings(min_rows=100, compression=4),
    "qr-mult": QRSettings(min_rows=100, collisions=4),
    "qr-add": QRSettings(min_rows=100, collisions=4, operation="add"),
    "qr-concat": QRSettings(min_rows=100, collisions=4, operation="concat"),
    "kpart": KPartSettings(min_rows=100, partitions=3),
    "pep": PEPSettings(min_rows=100, pep_keep=0.2),
    "int8": Int8Settings(min_rows=100),
    "fp16": FP16Settings(min_rows=100),
    "lma": LMASettings(min_rows=100, compression=2),
    "robe": RobeSettings(min_rows=100, compression=8),
}
COMPRESSED_OPS = {"hash": "HashGather", "qr-mult": "QRGather", "qr-add": "QRGather",
                  "qr-concat": "QRGather", "kpart": "QRGather", "pep": "PrunedGather",
                  "int8": "QuantizedGather", "fp16": "QuantizedGather", "lma": "LMAGather",
                  "robe": "ROBEGather"}


def _data(directory: Path, n_dense: int = 13) -> DataConfig:
    config = CriteoLikeConfig(n_rows=6000, cardinalities=(50, 400, 3000, 7, 8000),
                              n_dense=n_dense, seed=3)
    write_criteo_like(config, directory, progress=False)
    return DataConfig(path=str(directory / "data.parquet"), format="parquet",
                      spec_path=str(directory / "spec.json"), split="random")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> DataConfig:
    return _data(tmp_path_factory.mktemp("data"))


def _train(data: DataConfig, out: Path, scheme: SchemeSettings, kind: str = "dlrm",
           transform: TransformConfig | None = None) -> Path:
    model = ModelConfig(kind=kind, dim=8 if kind == "dlrm" else 1, bottom=(16,), top=(16,),
                        embeddings=EmbeddingConfig(default=scheme))
    fit(data, model, QUICK, transform or TransformConfig(), out)
    return out


def _torch_and_onnx(package: Path, checkpoint: Path, batches):
    model = load_checkpoint(checkpoint).model
    session = ort.InferenceSession(str(package / "model.onnx"), session_options(),
                                   providers=["CPUExecutionProvider"])
    inputs = {i.name for i in session.get_inputs()}
    for _, dense, sparse in batches:
        with torch.no_grad():
            expected = torch.sigmoid(model(torch.from_numpy(dense), torch.from_numpy(sparse)))
        feed = {"sparse": sparse, **({"dense": dense} if "dense" in inputs else {})}
        yield expected.numpy(), session.run(None, feed)[0]


@pytest.mark.parametrize("name", list(SCHEMES))
def test_every_scheme_exports_checks_and_matches_torch(data, tmp_path, name):
    checkpoint = _train(data, tmp_path / "ckpt", SCHEMES[name])
    package = export_checkpoint(checkpoint, tmp_path / "repo", "ctr", log=lambda _: None)
    manifest = load_package(package).manifest
    model = onnx.load(str(package / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)

    # The compressed tables are single ctrserve nodes carried by function bodies.
    custom = [n for n in model.graph.node if n.domain == DOMAIN]
    functions = {(f.name, f.overload) for f in model.functions}
    if name == "full":
        assert not custom and not functions
    else:
        assert {n.op_type for n in custom} == {COMPRESSED_OPS[name]}
        assert {(n.op_type, n.overload) for n in custom} <= functions
        compressed = [t for t in manifest["tables"] if t["scheme"] != "full"]
        assert len(custom) == len(compressed) > 0

    # Parity, recorded and re-checked here with every graph optimisation on.
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] <= 1e-5
    sizes = [t["rows"] for t in manifest["tables"]]
    spread = []
    for expected, actual in _torch_and_onnx(package, checkpoint, parity_batches(sizes, 13, 7)):
        np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
        spread.append(expected.std())
    assert max(spread) > 0.005  # the model's outputs vary, so the comparison means something

    # Byte accounting: ONNX initializers = manifest = the scheme's own count.
    initializer = {t.name: t for t in model.graph.initializer}
    ckpt_tables = load_checkpoint(checkpoint).model.tables
    for record, table in zip(manifest["tables"], ckpt_tables, strict=True):
        assert record["bytes"] == table.inference_bytes()
        own = [n for n in record["initializers"] if not n.startswith("shared/")]
        stored = sum(onnx.numpy_helper.to_array(initializer[n]).nbytes for n in own)
        if table.scheme in ("lma", "robe"):
            start, stop = table.memory.span(table.slot)
            stored += (stop - start) * 4
        assert stored == record["bytes"]
    embedding_names = {n for t in manifest["tables"] for n in t["initializers"]}
    embedding_bytes = sum(onnx.numpy_helper.to_array(initializer[n]).nbytes
                          for n in embedding_names)
    assert embedding_bytes == manifest["bytes"]["embeddings"]


def test_logistic_regression_and_models_without_dense_inputs_export(tmp_path):
    data = _data(tmp_path / "data", n_dense=0)
    for kind, scheme in (("lr", SCHEMES["qr-mult"]), ("dlrm", SCHEMES["pep"])):
        checkpoint = _train(data, tmp_path / f"ckpt-{kind}", scheme, kind=kind)
        package = export_checkpoint(checkpoint, tmp_path / "repo", kind, log=lambda _: None)
        manifest = load_package(package).manifest
        assert [i["name"] for i in manifest["inputs"]] == ["sparse"]
        assert manifest["parity"]["max_abs_diff"] <= 1e-5


def test_ids_near_2_40_stay_exact_in_integer_arithmetic(data, tmp_path):
    """Hashing categorical values into 2**41 ids: only schemes with no per-id storage can hold
    such tables (k-part compositional, ROBE); their ids near 2**31 and 2**40 must pick the same
    rows as torch."""
    huge = TransformConfig(hash_buckets=2**41 + 5)
    for scheme in (KPartSettings(partitions=3), RobeSettings(compression=2**30)):
        checkpoint = _train(data, tmp_path / scheme.scheme, scheme, transform=huge)
        package = export_checkpoint(checkpoint, tmp_path / "repo", scheme.scheme,
                                    log=lambda _: None)
        sizes = [t["rows"] for t in load_package(package).manifest["tables"]]
        assert min(sizes) > 2**40
        ids = np.array([2**31 - 1, 2**31, 2**40 - 1, 2**40, 2**40 + 3, 2**41 + 4], np.int64)
        sparse = np.repeat(ids[:, None], len(sizes), axis=1)
        dense = np.ones((len(ids), 13), np.float32)
        for expected, actual in _torch_and_onnx(package, checkpoint, [("", dense, sparse)]):
            np.testing.assert_allclose(actual, expected, atol=1e-5, rtol=0)
        # Neighbouring ids get different rows (the id was not rounded on the way).
        model = load_checkpoint(checkpoint).model
        with torch.no_grad():
            rows = model.tables[0](torch.from_numpy(ids))
        assert len({tuple(r.tolist()) for r in rows}) == len(ids)


def test_versions_are_never_overwritten_unless_asked(data, tmp_path):
    checkpoint = _train(data, tmp_path / "ckpt", SCHEMES["hash"])
    repo = tmp_path / "repo"
    first = export_checkpoint(checkpoint, repo, "ctr", log=lambda _: None)
    second = export_checkpoint(checkpoint, repo, "ctr", log=lambda _: None)
    assert (first.name, second.name) == ("1", "2")
    created = load_package(first).manifest["created"]
    with pytest.raises(ExportError, match="exists"):
        export_checkpoint(checkpoint, repo, "ctr", version=1, log=lambda _: None)
    time.sleep(1.1)
    export_checkpoint(checkpoint, repo, "ctr", version=1, overwrite=True, log=lambda _: None)
    assert load_package(first).manifest["created"] != created
    assert versions(repo / "ctr") == [1, 2]
    assert sorted(p.name for p in (repo / "ctr").iterdir()) == ["1", "2"]  # nothing left over


@pytest.fixture(scope="module")
def package(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("package")
    checkpoint = _train(data, out / "ckpt", SCHEMES["qr-mult"])
    return export_checkpoint(checkpoint, out / "repo", "ctr", log=lambda _: None)


def _copy(package: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(package), str(target)], check=True)
    return target


def _inspect(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctrserve", "inspect", str(path)],
                          capture_output=True, text=True, timeout=120)


def test_inspect_describes_an_intact_package(package):
    result = _inspect(package)
    assert result.returncode == 0, result.stderr
    assert "QRGather" in result.stdout and "intact" in result.stdout
    assert "Traceback" not in result.stdout + result.stderr


@pytest.mark.parametrize("damage,message", [
    ("flip", "sha256 mismatch"),
    ("truncate", "truncated"),
    ("remove", "missing"),
    ("manifest", "not valid JSON"),
])
def test_damaged_packages_are_rejected_with_a_clear_error(package, tmp_path, damage, message):
    copy = _copy(package, tmp_path)
    model = copy / "model.onnx"
    if damage == "flip":
        content = bytearray(model.read_bytes())
        content[len(content) // 2] ^= 0xFF
        model.write_bytes(bytes(content))
    elif damage == "truncate":
        model.write_bytes(model.read_bytes()[:-100])
    elif damage == "remove":
        (copy / "transform" / "vocabulary.npz").unlink()
    else:
        (copy / "manifest.json").write_text('{"format_version": 1, "name": ')
    with pytest.raises(PackageError, match=message):
        load_package(copy)
    result = _inspect(copy)
    assert result.returncode == 1
    assert message in result.stderr and "Traceback" not in result.stderr


def test_a_crash_mid_export_leaves_no_half_package(tmp_path):
    """SIGKILL while the exporter writes a package of a 3M-row table: no version appears."""
    data = _data(tmp_path / "data")
    checkpoint = tmp_path / "big"
    loaded = load_checkpoint(_train(data, tmp_path / "small", SCHEMES["full"]))
    sizes = [*loaded.transform.table_sizes[:-1], 3_000_000]
    loaded.transform.categorical[-1].vocabulary = np.arange(sizes[-1] - 2, dtype=np.uint64)
    model = build_model(13, sizes, loaded.model.table_names, loaded.model_config)
    save_checkpoint(checkpoint, model, loaded.transform, loaded.config)

    repo = tmp_path / "repo"
    command = [sys.executable, "-m", "ctrserve", "export", str(checkpoint), "--repo", str(repo),
               "--name", "ctr"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and process.poll() is None:
            staging = list((repo / "ctr").glob(".staging-*")) if (repo / "ctr").is_dir() else []
            if staging and (staging[0] / "model.onnx").exists():
                break
            time.sleep(0.01)
        assert process.poll() is None, "the export finished before it could be interrupted"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert not (repo / "ctr" / "1").exists()
    assert versions(repo / "ctr") == []


def test_export_cli_reports_a_taken_version_without_a_traceback(package, tmp_path):
    repo = package.parent.parent
    checkpoint = package.parent.parent.parent / "ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "ctrserve", "export", str(checkpoint), "--repo", str(repo),
         "--name", "ctr", "--version", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 1
    assert "exists" in result.stderr and "Traceback" not in result.stderr
    assert json.loads((package / "manifest.json").read_text())["version"] == 1


def test_demo_runs_generate_train_export_inspect(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "ctrserve", "demo", "--workdir", str(tmp_path), "--rows", "15000",
         "--epochs", "1", "--once", "--port", "0", "--entity-rows", "5000"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "intact (sizes and sha256 match)" in result.stdout
    package = load_package(tmp_path / "repo" / "demo" / "1")
    assert package.manifest["parity"]["passed"]
    assert {t["scheme"] for t in package.manifest["tables"]} == {"full", "qr"}
    assert result.stdout.count("p(click) = ") == 5 + 3  # scored rows, ranked candidates
    assert load_package(tmp_path / "repo" / "rank" / "1").manifest["parity"]["passed"]


def test_large_models_keep_their_tensors_in_an_external_data_file(data, tmp_path, monkeypatch):
    from ctrserve.export import exporter

    monkeypatch.setattr(exporter, "EXTERNAL_DATA_THRESHOLD", 0)
    checkpoint = _train(data, tmp_path / "ckpt", SCHEMES["lma"])
    package = export_checkpoint(checkpoint, tmp_path / "repo", "ctr", log=lambda _: None)
    manifest = load_package(package).manifest
    assert manifest["onnx"]["external_data"]
    assert "model.onnx.data" in manifest["files"]
    assert (package / "model.onnx").stat().st_size < (package / "model.onnx.data").stat().st_size
    (package / "model.onnx.data").write_bytes(b"")
    with pytest.raises(PackageError, match=r"model\.onnx\.data"):
        load_package(package)


_SERVE_WITHOUT_TORCH = """
import sys, json
import numpy as np, onnxruntime as ort
from ctrserve.export.package import load_package
from ctrserve.models.readers import iter_batches, spec_for
from ctrserve.models.transform import FeatureTransform
package = load_package(sys.argv[1])
transform = FeatureTransform.load(package.transform_path)
batch = next(iter_batches(sys.argv[2], spec_for(sys.argv[2], "parquet", sys.argv[3]), 64))
features = transform.transform(batch)
session = ort.InferenceSession(str(package.model_path), providers=["CPUExecutionProvider"])
(p,) = session.run(None, {"dense": features.dense, "sparse": features.sparse})
print(json.dumps({"torch": "torch" in sys.modules, "p": p.tolist()}))
"""


def test_a_package_serves_raw_rows_with_onnxruntime_and_numpy_only(package, data):
    result = subprocess.run(
        [sys.executable, "-c", _SERVE_WITHOUT_TORCH, str(package), data.path, data.spec_path],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    served = json.loads(result.stdout)
    assert not served["torch"]
    probabilities = np.array(served["p"])
    assert probabilities.shape == (64,) and ((probabilities > 0) & (probabilities < 1)).all()


def test_a_checkpoint_written_on_cuda_exports_on_a_machine_without_one(data, tmp_path):
    """Every tensor of a checkpoint saved by training on a GPU names its device ("cuda:0");
    loading moves them to the CPU (``map_location``), so export and parity run without one."""
    trained = load_checkpoint(_train(data, tmp_path / "trained", SCHEMES["pep"]))
    on_cuda = [True]
    torch.serialization.register_package(
        0, lambda storage: "cuda:0" if on_cuda[0] else None, lambda storage, location: None)
    try:
        save_checkpoint(tmp_path / "ckpt", trained.model, trained.transform, trained.config)
    finally:
        on_cuda[0] = False
    if not torch.cuda.is_available():  # the file claims the GPU: read as is, it fails here
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(tmp_path / "ckpt" / "weights.pt", weights_only=True)
    package = export_checkpoint(tmp_path / "ckpt", tmp_path / "repo", "ctr", log=lambda _: None)
    assert load_package(package).manifest["parity"]["passed"]
