"""Data-parallel training on several processes (gloo on loopback): each process's share of the
rows against one process's reading; two processes, in the environment torchrun gives its
processes, stepping as one process steps the whole global batch, then training a model of every
scheme through the command line, whose checkpoint matches one process's where it must, evaluates
to what it recorded, exports and serves."""

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.multiprocessing as mp

from ctrserve.cli import main
from ctrserve.export.exporter import export_checkpoint
from ctrserve.export.package import load_package
from ctrserve.loadtest.servers import HOST, free_port
from ctrserve.models.checkpoint import load_checkpoint
from ctrserve.models.data import PARTS, DataConfig
from ctrserve.models.distributed import TableGradients, start, stop
from ctrserve.models.dlrm import ModelConfig, build_model
from ctrserve.models.embeddings.scheme_settings import (
    CCESettings,
    EmbeddingConfig,
    FP16Settings,
    FullSettings,
    HashSettings,
    HybridSettings,
    Int8Settings,
    KPartSettings,
    LMASettings,
    PEPSettings,
    QRSettings,
    RobeSettings,
)
from ctrserve.models.evaluate import evaluate
from ctrserve.models.generate import CriteoLikeConfig, write_criteo_like
from ctrserve.models.readers import MalformedRowError, criteo_spec, iter_batches
from ctrserve.models.schema import CategoricalColumn, DatasetSpec, LabelRule, RawBatch
from ctrserve.models.shards import Part, SplitCut, index_file, share
from ctrserve.models.train import fit
from ctrserve.models.trainer import TrainConfig, Trainer
from ctrserve.models.transform import FeatureTransform, TransformConfig

ROWS = 3000


# --------------------------------------------------------------------------- shares of a part


def _table(rows: int) -> dict[str, list]:
    """Columns of a small data set; C1 holds the row's number, so every row is recognisable."""
    rng = np.random.default_rng(0)
    ints = rng.integers(0, 50, size=(rows, 13))
    return {
        "label": rng.integers(0, 2, size=rows).tolist(),
        **{f"I{i + 1}": [None if v % 7 == 0 else int(v) for v in ints[:, i]] for i in range(13)},
        "C1": [f"{row:08x}" for row in range(rows)],
        **{f"C{i}": [f"{v:08x}" for v in rng.integers(0, 300, size=rows)] for i in range(2, 27)},
    }


def _criteo_file(path: Path, rows: int, bad_line: int | None = None) -> None:
    """A Criteo TSV of ``rows`` rows and, under ``bad_line=None``, lines a reader drops: a blank
    line, one of empty fields only, one with too few fields and one with a bad number."""
    columns = _table(rows)
    names = ["label", *(f"I{i}" for i in range(1, 14)), *(f"C{i}" for i in range(1, 27))]
    lines = ["\t".join("" if columns[n][row] is None else str(columns[n][row]) for n in names)
             for row in range(rows)]
    if bad_line is None:
        lines[400:400] = ["", "\t" * 39, "1\t2\t3", "0\tnot-a-number" + "\t" * 38]
    else:
        lines[bad_line - 1] = "0\tnot-a-number" + "\t" * 38
    path.write_text("\n".join(lines) + "\n")


def _small_spec(fmt: str) -> DatasetSpec:
    return DatasetSpec(label=LabelRule("label"), dense=("I1", "I2"),
                       categorical=(CategoricalColumn("C1", "hex"),
                                    CategoricalColumn("C2", "hex")),
                       format=fmt, delimiter=",", header=True)


def _data(kind: str, split: str, tmp_path: Path) -> DataConfig:
    """``kind``: a Criteo TSV (no header), a CSV with a header, or a Parquet file of row groups of
    250 rows with a row whose label is missing; read skipping malformed rows."""
    if kind == "criteo":
        _criteo_file(tmp_path / "data.tsv", ROWS)
        return DataConfig(path=str(tmp_path / "data.tsv"), format="criteo", split=split,
                          on_error="skip")
    columns = {name: _table(ROWS)[name] for name in ("label", "I1", "I2", "C1", "C2")}
    spec_path = tmp_path / "spec.json"
    if kind == "csv":
        _small_spec("csv").save(spec_path)
        header = ",".join(columns)
        body = [",".join("" if columns[n][r] is None else str(columns[n][r]) for n in columns)
                for r in range(ROWS)]
        (tmp_path / "data.csv").write_text("\n".join([header, *body]) + "\n")
        return DataConfig(path=str(tmp_path / "data.csv"), format="csv", spec_path=str(spec_path),
                          split=split, on_error="skip")
    _small_spec("parquet").save(spec_path)
    columns["label"][1234] = None
    pq.write_table(pa.table(columns), tmp_path / "data.parquet", row_group_size=250)
    return DataConfig(path=str(tmp_path / "data.parquet"), format="parquet",
                      spec_path=str(spec_path), split=split, on_error="skip")


def _rows(batches) -> tuple[list, list]:
    """The labels and row numbers (C1) of a stream of raw batches."""
    labels, numbers = [], []
    for batch in batches:
        assert isinstance(batch, RawBatch)
        labels += batch.labels.tolist()
        numbers += [int(value, 16) if isinstance(value, str) else int(value)
                    for value in batch.categorical["C1"]]
    return labels, numbers


@pytest.mark.parametrize("split", ["position", "random"])
@pytest.mark.parametrize("kind", ["criteo", "csv", "parquet"])
def test_the_shares_of_a_part_are_its_rows_in_file_order(kind, split, tmp_path):
    data = _data(kind, split, tmp_path)
    path, spec, _ = data.part_source("train")
    index = index_file(path, spec, data.on_error, block_bytes=os.path.getsize(path) // 12)
    assert len(index.pieces) >= 10
    for part in PARTS:
        expected = _rows(data.batches(part, batch_rows=1000))
        cut_index = data.part_source(part)[2]
        assert cut_index is not None
        rows = Part(index, SplitCut(data.split, data.fractions, cut_index, data.split_seed))
        assert rows.rows == len(expected[0]) > 0
        for processes in (1, 2, 3):
            shares = [share(rows.rows, rank, processes) for rank in range(processes)]
            read = [_rows(rows.batches(low, high, 700)) for low, high in shares]
            assert ([label for r in read for label in r[0]],
                    [number for r in read for number in r[1]]) == expected
            sizes = [high - low for low, high in shares]
            assert max(sizes) - min(sizes) <= 1
            if processes > 1 and part == "train":  # a share reads only the pieces it needs
                touched = [int(((rows.before[1:] > low) & (rows.before[:-1] < high)).sum())
                           for low, high in shares]
                assert max(touched) < len(index.pieces)


def test_a_malformed_line_in_a_later_piece_is_reported_at_its_line(tmp_path):
    _criteo_file(tmp_path / "bad.tsv", ROWS, bad_line=2500)
    with pytest.raises(MalformedRowError) as whole:
        for _ in iter_batches(tmp_path / "bad.tsv", criteo_spec(), 1000):
            pass
    with pytest.raises(MalformedRowError) as pieces:
        index_file(str(tmp_path / "bad.tsv"), criteo_spec(), "raise", block_bytes=8192)
    assert pieces.value.line == whole.value.line == 2500
    assert str(pieces.value) == str(whole.value)


# --------------------------------------------------------------------------- two processes

#: A full table (its gradient gathered), a ROBE memory small enough to be all-reduced whole, a
#: PEP table (its thresholds a dense parameter), QR (two tables a column) and hashing.
_STEP_MODEL = ModelConfig(dim=8, bottom=(16,), top=(16,), embeddings=EmbeddingConfig(
    default=FullSettings(min_rows=0),
    tables={"b": RobeSettings(compression=500, min_rows=0, seed=1),
            "c": PEPSettings(min_rows=0), "d": QRSettings(min_rows=0),
            "e": HashSettings(min_rows=0)}))
_STEP_SIZES = (5000, 5000, 300, 5000, 5000)
_GLOBAL_BATCH = 64

#: One table of each scheme; C5 (PEP) is the largest, so its search can reach the model's target.
_SCHEMES = {"C1": FullSettings(min_rows=0), "C2": HashSettings(min_rows=0),
            "C3": QRSettings(min_rows=0), "C4": KPartSettings(min_rows=0),
            "C5": PEPSettings(min_rows=0, pep_keep=0.5, drift=0.2),
            "C6": Int8Settings(min_rows=0), "C7": FP16Settings(min_rows=0),
            "C8": LMASettings(min_rows=0), "C9": RobeSettings(min_rows=0),
            "C10": HybridSettings(min_rows=0), "C11": CCESettings(min_rows=0, recluster_every=5)}
_EVERY_SCHEME = ModelConfig(dim=8, bottom=(16,), top=(16,),
                            embeddings=EmbeddingConfig(default=FullSettings(), tables=_SCHEMES))


def _step_case() -> tuple[torch.nn.Module, list[tuple[np.ndarray, ...]]]:
    torch.manual_seed(0)
    model = build_model(3, list(_STEP_SIZES), list("abcde"), _STEP_MODEL)
    rng = np.random.default_rng(1)
    batches = [(rng.normal(size=(_GLOBAL_BATCH, 3)).astype(np.float32),
                np.stack([rng.integers(0, size, _GLOBAL_BATCH) for size in _STEP_SIZES], axis=1),
                rng.integers(0, 2, _GLOBAL_BATCH).astype(np.float32)) for _ in range(3)]
    return model, batches


def _step_config() -> TrainConfig:
    return TrainConfig(batch_size=_GLOBAL_BATCH, unknown_rate=0.0, device="cpu", progress=False)


def _step(rank: int, out: Path) -> None:
    """Averages two hand-made gradients, then steps ``_step_case``'s batches, half each."""
    world = start(torch.device("cpu"))
    try:
        # Rank 0 touches rows 0-4, rank 1 rows 1-5 of two width-1 tables, the first small enough
        # to be all-reduced whole, the second gathered; row 0's gradient is exactly zero.
        rows = [[0, 1, 2, 3, 4], [1, 2, 3, 4, 5]][rank]
        values = [[0.0, 1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0, 50.0]][rank]
        tables = [torch.nn.Parameter(torch.zeros(size, 1)) for size in (6, 100_000)]
        for table in tables:
            table.grad = torch.sparse_coo_tensor(torch.tensor([rows]),
                                                 torch.tensor(values)[:, None], table.shape,
                                                 check_invariants=True)
        exchange = TableGradients(2, tables, dense_bytes=0)
        exchange.average()
        means = [(table.grad.coalesce().indices()[0], table.grad.coalesce().values())
                 for table in tables]
        sent = exchange.take()["table_bytes_per_step"]
        model, batches = _step_case()
        trainer = Trainer(model, replace(_step_config(), batch_size=_GLOBAL_BATCH // 2),
                          world=world)
        half = slice(rank * _GLOBAL_BATCH // 2, (rank + 1) * _GLOBAL_BATCH // 2)
        for dense, sparse, labels in batches:
            trainer.step(dense[half], sparse[half], labels[half])
        assert trainer.table_gradients is not None
        torch.save({"state": model.state_dict(), "means": means, "sent": sent,
                    "bytes": trainer.table_gradients.take()}, out / f"steps-{rank}.pt")
    finally:
        stop()


def _two_processes(rank: int, ports: tuple[int, int], out: str, data: DataConfig) -> None:
    """One of two processes, in the environment torchrun gives the processes it starts."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR=HOST, MASTER_PORT=str(ports[0]))
    torch.set_num_threads(1)
    _step(rank, Path(out))
    os.environ["MASTER_PORT"] = str(ports[1])
    command = ["train", "--data", data.path, "--spec", str(data.spec_path), "--split", "random",
               "--config", str(Path(out) / "model.json"), "--epochs", "1", "--batch-size", "256",
               "--no-progress", "--out", str(Path(out) / "ckpt")]
    with open(Path(out) / f"train-{rank}.txt", "w") as log, contextlib.redirect_stdout(log):
        code = main(command)  # under torchrun's variables, without --distributed
    if code:
        raise RuntimeError(f"ctrserve train exited with {code} on rank {rank}")


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> DataConfig:
    """6,000 generated rows in row groups of 400 (pieces the processes share out)."""
    out = tmp_path_factory.mktemp("generated")
    sizes = (300, 300, 300, 300, 4000, 300, 300, 300, 300, 300, 300)
    write_criteo_like(CriteoLikeConfig(n_rows=6000, cardinalities=sizes, seed=3), out,
                      progress=False)
    pq.write_table(pq.read_table(out / "data.parquet"), out / "groups.parquet",
                   row_group_size=400)
    return DataConfig(path=str(out / "groups.parquet"), format="parquet",
                      spec_path=str(out / "spec.json"), split="random")


@pytest.fixture(scope="module")
def two_processes(generated, tmp_path_factory) -> Path:
    """Two processes (gloo on loopback) that step ``_step_case`` in halves, then train
    ``_EVERY_SCHEME`` through the command line; their results are in the returned directory."""
    out = tmp_path_factory.mktemp("two")
    (out / "model.json").write_text(json.dumps(_EVERY_SCHEME.to_dict()))
    ports = (free_port(), free_port())
    while ports[1] == ports[0]:
        ports = (ports[0], free_port())
    mp.spawn(_two_processes, args=(ports, str(out), generated), nprocs=2, join=True)
    return out


def test_two_processes_step_as_one_on_the_global_batch(two_processes):
    ranks = [torch.load(two_processes / f"steps-{rank}.pt", weights_only=False)
             for rank in (0, 1)]
    for indices, values in ranks[0]["means"]:
        assert indices.tolist() == [0, 1, 2, 3, 4, 5]  # the union, row 0 with its zero gradient
        assert values[:, 0].tolist() == [0.0, 5.5, 11.0, 16.5, 22.0, 25.0]
    # two counts, the small table with its marks, five (index, value) pairs of the large one
    assert ranks[0]["sent"] == 2 * 8 + 6 * 2 * 4 + 5 * (8 + 4)
    model, batches = _step_case()
    trainer = Trainer(model, _step_config())
    for batch in batches:
        trainer.step(*batch)
    for name, value in model.state_dict().items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        assert torch.allclose(ranks[0]["state"][name].double(), value.double(), atol=1e-6), name
    print(f"bytes handed to the collectives per step and process: {ranks[0]['bytes']}")
    assert ranks[0]["bytes"]["table_bytes_per_step"] > 0
    assert ranks[0]["bytes"]["dense_bytes_per_step"] > 0


def test_two_processes_train_every_scheme_like_one(two_processes, generated, tmp_path):
    two = two_processes / "ckpt"
    assert "trained by 2 processes" in (two_processes / "train-0.txt").read_text()
    assert (two_processes / "train-1.txt").read_text() == ""  # rank 0 reports
    one = fit(generated, _EVERY_SCHEME, TrainConfig(epochs=1, batch_size=256, progress=False),
              TransformConfig(), str(tmp_path / "one"))

    record = json.loads((two / "config.json").read_text())
    assert record["distributed"]["processes"] == 2
    assert record["distributed"]["replica_difference"] == 0.0
    epoch = record["history"][0]
    assert epoch["rows"] == one["history"][0]["rows"] // 2 * 2
    assert epoch["table_bytes_per_step"] > 0 and epoch["dense_bytes_per_step"] > 0
    assert [t["scheme"] for t in record["tables"]] == [s.scheme for s in _SCHEMES.values()]
    assert record["pep_search"] is not None and one["pep_search"] is not None

    # The vocabulary counted by both processes, and the LMA signatures rank 0 took from the
    # first training rows, are those of one process.
    vocabularies = [FeatureTransform.load(path / "transform").categorical
                    for path in (two, tmp_path / "one")]
    for mine, reference in zip(*vocabularies, strict=True):
        assert np.array_equal(mine.vocabulary, reference.vocabulary)
    states = [load_checkpoint(path).model.state_dict() for path in (two, tmp_path / "one")]
    signatures = [name for name in states[0] if "signatures" in name]
    assert signatures
    for name in signatures:
        assert torch.equal(states[0][name], states[1][name])
    # The hybrid's head, from the counts every process added up, is one process's.
    heads = [name for name in states[0] if "head_bits" in name]
    assert heads
    for name in heads:
        assert torch.equal(states[0][name], states[1][name])

    # The test predictions rank 0 gathered are every test row's, in order.
    again = evaluate(two, part="test")
    assert again["rows"] == record["metrics"]["test"]["rows"] == one["metrics"]["test"]["rows"]
    assert again["auc"] == pytest.approx(record["metrics"]["test"]["auc"], abs=1e-9)
    print(f"test AUC: 2 processes {record['metrics']['test']['auc']:.4f}, one process "
          f"{one['metrics']['test']['auc']:.4f}")

    # It exports and serves like any checkpoint.
    package = export_checkpoint(two, tmp_path / "repo", "ctr", log=lambda _: None)
    assert load_package(package).manifest["parity"]["passed"]
    checkpoint = load_checkpoint(two)
    raw = next(generated.batches("test", batch_rows=64))
    features = checkpoint.transform.transform(raw)
    session = ort.InferenceSession(str(load_package(package).model_path),
                                   providers=["CPUExecutionProvider"])
    (served,) = session.run(None, {"dense": features.dense, "sparse": features.sparse})
    with torch.no_grad():
        expected = torch.sigmoid(checkpoint.model(torch.from_numpy(features.dense),
                                                  torch.from_numpy(features.sparse))).numpy()
    assert np.abs(served - expected).max() <= 1e-5


def test_distributed_training_outside_torchrun_names_it(generated, tmp_path, capsys):
    code = main(["train", "--distributed", "--data", generated.path, "--spec",
                 str(generated.spec_path), "--out", str(tmp_path / "ckpt"), "--no-progress"])
    assert code == 1
    assert "torchrun --nproc-per-node N -m ctrserve train" in capsys.readouterr().err
    assert not (tmp_path / "ckpt").exists()
