"""The frequency-aware hybrid scheme: its head is the most frequent training ids, its lookups are
what a plain reading of the layout gives, its bytes agree three ways, and a trained model exports
with parity and serves through the HTTP API."""

import json

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from servers import ServiceProcess, request_rows, scored_offline

from ctrserve.export.exporter import export_checkpoint
from ctrserve.export.graph import build_graph
from ctrserve.export.parity import check_parity, session_options
from ctrserve.models.budget import hybrid_tables_bytes
from ctrserve.models.checkpoint import load_checkpoint
from ctrserve.models.data import DataConfig
from ctrserve.models.dlrm import ModelConfig, build_model
from ctrserve.models.embeddings.hybrid import HybridTable, head_rows
from ctrserve.models.embeddings.scheme_settings import EmbeddingConfig, HybridSettings
from ctrserve.models.generate import CriteoLikeConfig, write_criteo_like
from ctrserve.models.schemes import TableData
from ctrserve.models.train import TrainConfig, fit
from ctrserve.models.transform import TransformConfig

SCORE = "/v1/models/ctr/score"


def naive_rows(table: HybridTable, ids: np.ndarray) -> np.ndarray:
    """The rows a plain reading of the layout gives: a head id's row is its place among the
    sorted head ids; a tail id numbered ``t`` (its place among the tail ids) multiplies
    remainder row ``t mod c`` and quotient row ``t // c``."""
    head = table.head_ids()
    tail = np.setdiff1d(np.arange(table.num_embeddings), head)
    head_weight = table.head.weight.detach().numpy()
    remainder = table.remainder.weight.detach().numpy()
    quotient = table.quotient.weight.detach().numpy()
    collisions = len(remainder)
    rows = []
    for value in ids:
        if value in set(head.tolist()):
            rows.append(head_weight[np.searchsorted(head, value)])
        else:
            number = np.searchsorted(tail, value)
            rows.append(remainder[number % collisions] * quotient[number // collisions])
    return np.stack(rows)


@pytest.mark.parametrize("rows, head, tail_rows", [(70, 5, 20), (1000, 130, 90), (4099, 1, 300)])
def test_lookups_read_the_head_row_or_the_tail_pair(rows, head, tail_rows):
    rng = np.random.default_rng(rows)
    counts = rng.zipf(1.3, size=rows)
    table = HybridTable(rows, 4, head, tail_rows,
                        head_ids=np.sort(np.argsort(-counts, kind="stable")[:head]))
    with torch.no_grad():  # rows of their own in every part, not ones
        for weight in (table.head.weight, table.remainder.weight, table.quotient.weight):
            weight.normal_()
    tail = rows - head
    assert table.collisions + -(-tail // table.collisions) <= tail_rows  # the tail fits
    assert table.collisions == 1 or (table.collisions - 1) * (
        tail_rows - table.collisions + 1) < tail  # with the fewest collisions
    ids = np.concatenate([np.arange(rows), rng.integers(0, rows, 300)])
    got = table(torch.from_numpy(ids)).detach().numpy()
    np.testing.assert_array_equal(got, naive_rows(table, ids))


def test_the_split_gives_frequent_ids_rows_and_none_to_a_flat_table():
    # A flat table: a head row takes one id out of the tail, and a row; only rounding in the
    # tail's collisions makes a few free.
    assert head_rows(np.full(1000, 7), 100) <= 5
    # Ten ids carry nearly all impressions: each gets its own row.
    counts = np.ones(1000, dtype=np.int64)
    counts[[3, 50, 77, 120, 400, 401, 402, 600, 800, 999]] = 10_000
    assert head_rows(counts, 100) >= 10
    # A Zipf curve: some head, some tail, and the split moves with the skew.
    rng = np.random.default_rng(0)
    mild, steep = (np.bincount(rng.zipf(a, 200_000) % 5000, minlength=5000) for a in (1.1, 2.0))
    split_mild, split_steep = head_rows(mild, 300), head_rows(steep, 300)
    assert 1 < split_mild < 299 and 1 <= split_steep < 299
    assert split_mild != split_steep


def test_parity_with_onnxruntime_for_scattered_heads():
    torch.manual_seed(0)
    sizes = [70, 5000, 130]
    names = ["a", "b", "c"]
    rng = np.random.default_rng(1)
    counts = {name: rng.zipf(1.4, size=n) for name, n in zip(names, sizes, strict=True)}
    config = ModelConfig(dim=8, bottom=(8,), top=(8,), embeddings=EmbeddingConfig(
        default=HybridSettings(min_rows=0, compression=3.0)))
    model = build_model(3, sizes, names, config, TableData(counts=counts)).eval()
    tables = model.embedding_tables()
    assert all(isinstance(t, HybridTable) for t in tables)
    table = tables[1]
    assert isinstance(table, HybridTable)
    assert table.head_ids().max() > 2 * table.head.num_embeddings  # not the first ids
    onnx_model, _ = build_graph(model)
    session = ort.InferenceSession(onnx_model.SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    assert check_parity(model, session).passed


@pytest.fixture(scope="module")
def hybrid_package(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("hybrid")
    generated = CriteoLikeConfig(n_rows=6000, cardinalities=(40, 3000, 900, 6), seed=3)
    write_criteo_like(generated, root / "data", progress=False)
    data = DataConfig(path=str(root / "data" / "data.parquet"), format="parquet",
                      spec_path=str(root / "data" / "spec.json"), split="random")
    model = ModelConfig(dim=8, bottom=(16,), top=(16,), embeddings=EmbeddingConfig(
        default=HybridSettings(min_rows=100, compression=8.0)))
    fit(data, model, TrainConfig(epochs=1, batch_size=256, progress=False), TransformConfig(),
        str(root / "ckpt"))
    export_checkpoint(root / "ckpt", root / "repo", "ctr", log=lambda _: None)
    return {"root": root, "data": data, "checkpoint": load_checkpoint(root / "ckpt")}


def test_the_head_is_exactly_the_most_frequent_training_ids(hybrid_package):
    checkpoint = hybrid_package["checkpoint"]
    transform = checkpoint.transform
    names = list(transform.spec.categorical_names)
    counted = [np.zeros(size, dtype=np.int64) for size in transform.table_sizes]
    for raw in hybrid_package["data"].batches("train", batch_rows=1000):
        sparse = transform.transform(raw).sparse
        for column, counts in enumerate(counted):
            counts += np.bincount(sparse[:, column], minlength=len(counts))
    hybrid = [(column, t) for column, t in enumerate(checkpoint.model.embedding_tables())
              if isinstance(t, HybridTable)]
    assert len(hybrid) == 2
    for column, table in hybrid:
        counts = counted[column]
        head = table.head_ids()
        settings = checkpoint.model.config.embeddings.for_table(names[column])
        assert isinstance(settings, HybridSettings) and settings.head == len(head)
        tail = np.setdiff1d(np.arange(len(counts)), head)
        assert counts[head].min() >= counts[tail].max()
        # Ties at the boundary go to the smaller id.
        boundary = counts[head].min()
        tied = np.flatnonzero(counts == boundary)
        assert np.array_equal(np.intersect1d(tied, head), tied[:len(np.intersect1d(tied, head))])
        assert len(head) == head_rows(counts, table.stored_rows())


def test_bytes_agree_three_ways(hybrid_package):
    checkpoint = hybrid_package["checkpoint"]
    model = checkpoint.model
    names, sizes = model.table_names, checkpoint.transform.table_sizes
    hybrid = [(name, size, t) for name, size, t in
              zip(names, sizes, model.embedding_tables(), strict=True)
              if isinstance(t, HybridTable)]
    closed_form = hybrid_tables_bytes(
        [model.config.embeddings.for_table(name) for name, _, _ in hybrid],
        [size for _, size, _ in hybrid], model.config.dim)
    reported = sum(table.inference_bytes() for _, _, table in hybrid)
    stored = {name for name, _, _ in hybrid}
    onnx_model, records = build_graph(model)
    initializers = {t.name: onnx.numpy_helper.to_array(t).nbytes
                    for t in onnx_model.graph.initializer}
    exported = sum(initializers[name] for record in records if record.name in stored
                   for name in record.initializers)
    assert closed_form == reported == exported
    summary = json.loads((hybrid_package["root"] / "ckpt" / "config.json").read_text())
    assert sum(t["bytes"] for t in summary["tables"] if t["scheme"] == "hybrid") == closed_form


def test_a_trained_hybrid_model_serves_what_it_scores_offline(hybrid_package, tmp_path):
    root, data = hybrid_package["root"], hybrid_package["data"]
    rows_file, expected = scored_offline(root / "ckpt", data.path, data.spec_path, 200, tmp_path)
    with ServiceProcess(root / "repo") as server:
        answer = httpx.post(server.url + SCORE, json={"rows": request_rows(rows_file)},
                            timeout=60)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["probabilities"], expected, atol=2e-6, rtol=0)
