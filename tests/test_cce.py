"""CCE (clustered compositional embeddings): re-clustering sets each id's pointer to its nearest
centroid and part 1 to the mean residual under a new hash, identically on every replica; a real
training with re-clustering is no worse than without; the export matches torch for every
pointer type; a CCE package serves through the HTTP API."""

import copy

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
from ctrserve.models.checkpoint import load_checkpoint
from ctrserve.models.data import DataConfig
from ctrserve.models.dlrm import ModelConfig, build_model
from ctrserve.models.embeddings.cce import CCETable, cce_bytes, cce_coefficients
from ctrserve.models.embeddings.scheme_settings import CCESettings, EmbeddingConfig
from ctrserve.models.embeddings.shared_memory import PRIME
from ctrserve.models.generate import CriteoLikeConfig, write_criteo_like
from ctrserve.models.schemes import why_full
from ctrserve.models.train import fit
from ctrserve.models.trainer import TrainConfig
from ctrserve.models.transform import TransformConfig

SCORE = "/v1/models/ctr/score"


def random_table(rows: int = 64, chunks: int = 2, n: int = 3000, dim: int = 8,
                 every: int = 5, reclusters: int = 1) -> CCETable:
    """A CCE table whose two parts both hold random values, as after some training."""
    torch.manual_seed(0)
    table = CCETable(n, dim, rows, chunks, seed=3, column=1, recluster_every=every,
                     reclusters=reclusters)
    with torch.no_grad():
        table.weight1.weight.normal_(0, 0.05)
    return table


def chunk_vectors(table: CCETable) -> torch.Tensor:
    """float64 [n, c, dim / c]: every id's current vector, by chunk."""
    with torch.no_grad():
        vectors = table(torch.arange(table.num_embeddings))
    return vectors.double().reshape(table.num_embeddings, table.chunks, -1)


def test_reclustering_points_each_id_at_its_nearest_centroid_and_keeps_the_residual():
    table = random_table()
    before = chunk_vectors(table)
    pointers = table.pointers.clone()
    coefficients = table.coefficients.clone()
    for _ in range(4):
        table.step_done()
    assert torch.equal(table.pointers, pointers)  # not yet on the schedule
    table.step_done()
    assert not torch.equal(table.pointers, pointers)
    assert not torch.equal(table.coefficients, coefficients)  # the hash is redrawn
    ids = torch.arange(table.num_embeddings)
    hashed = table.hashed_rows(ids, table.coefficients)
    for chunk in range(table.chunks):
        centroids = table.weight0.weight[chunk::table.chunks].detach().double()
        distances = torch.cdist(before[:, chunk], centroids)  # [n, k]
        chosen = distances.gather(1, table.pointers[:, chunk].long().unsqueeze(1))[:, 0]
        assert torch.all(chosen <= distances.min(dim=1).values + 1e-6)
        # Part 1's row r: the mean residual of the ids hashed to r (zero where none).
        residuals = before[:, chunk] - centroids[table.pointers[:, chunk].long()]
        residual_rows = table.weight1.weight[chunk::table.chunks].detach().double()
        for row in range(table.rows):
            members = hashed[:, chunk] == row
            expected = residuals[members].mean(dim=0) if members.any() else 0 * residuals[0]
            torch.testing.assert_close(residual_rows[row], expected, atol=1e-5, rtol=0)
    # At most ``reclusters`` rounds: later steps change nothing.
    after = table.pointers.clone()
    for _ in range(20):
        table.step_done()
    assert torch.equal(table.pointers, after)


def test_reclustering_brings_ids_with_alike_vectors_together():
    """Ids drawn around eight points: after one round, ids of one point share a pointer and
    their vectors are close to where they were."""
    table = random_table(rows=8, chunks=1, n=800)
    truth = torch.arange(800) % 8
    centres = torch.randn(8, 8)
    with torch.no_grad():
        table.weight0.weight.zero_()
        table.weight1.weight.zero_()
        # Pointer i reads row i, hash row 0 stays zero: vector = weight0 row, set per id below.
        table.pointers.copy_((torch.arange(800) % 8).unsqueeze(1).to(table.pointers.dtype))
        table.weight0.weight.copy_(centres)
    table.recluster()
    pointers = table.pointers[:, 0].long()
    for label in range(8):
        assert len(set(pointers[truth == label].tolist())) == 1
    assert len(set(pointers.tolist())) == 8
    with torch.no_grad():
        after = table(torch.arange(800))
    torch.testing.assert_close(after, centres[truth], atol=1e-5, rtol=0)


def test_replicas_recluster_identically():
    """Data-parallel replicas hold identical weights and must stay identical."""
    first = random_table(reclusters=2, every=1)
    second = copy.deepcopy(first)
    for _ in range(3):
        first.step_done()
        second.step_done()
    for (name, value), (_, other) in zip(first.state_dict().items(),
                                         second.state_dict().items(), strict=True):
        assert torch.equal(value, other), name
    assert first.rounds == 2


@pytest.mark.parametrize(("rows", "dtype"), [(256, torch.uint8), (257, torch.uint16),
                                             (65_536, torch.uint16), (65_537, torch.int32)])
def test_pointers_take_the_narrowest_type_and_every_stored_byte_counts(rows, dtype):
    table = CCETable(70_000, 8, rows, 2, seed=0, column=0, recluster_every=50, reclusters=0)
    assert table.pointers.dtype == dtype and int(table.pointers.long().max()) < rows
    tensors = table.inference_tensors()
    assert set(tensors) == {"pointers", "weight0", "weight1", "coefficients"}
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored == table.inference_bytes() == cce_bytes(70_000, 8, rows, 2)
    assert table.inference_bytes() == (70_000 * 2 * torch.iinfo(dtype).bits // 8
                                       + 2 * rows * 8 * 4 + 2 * 4 * 8)


def test_chunks_must_divide_the_width_and_one_row_stays_full():
    with pytest.raises(ValueError, match="dim 8 is not a multiple of chunks 3"):
        CCETable(100, 8, 10, 3, seed=0, column=0, recluster_every=50, reclusters=2)
    assert why_full(CCESettings(compression=100), 50, 8) == \
        "cce at 100x leaves one row for all 50 ids"


def test_the_hash_is_exact_for_ids_near_int_limits():
    table = CCETable(10, 8, 7, 2, seed=9, column=2, recluster_every=50, reclusters=0)
    ids = [0, 2**21 - 1, 2**31 - 1, 2**31, 2**40 - 1, 2**40 + 3, 2**62 + 5]
    got = table.hashed_rows(torch.tensor(ids), table.coefficients).tolist()
    coefficients = cce_coefficients(9, 2, 0, 2).tolist()
    expected = [[(a0 * (x % 2**21) + a1 * (x // 2**21 % 2**21) + a2 * (x // 2**42) + c)
                 % PRIME % 7 for a0, a1, a2, c in coefficients] for x in ids]
    assert got == expected


def test_export_matches_torch_for_every_pointer_type_after_reclustering():
    """Tables of 75 (uint8), 1,250 (uint16) and 70,000 (int32) rows per part, re-clustered so
    pointers and hashes are no longer the initial ones; ONNX Runtime within 1e-5."""
    torch.manual_seed(0)
    cce = CCESettings(min_rows=0, chunks=2)
    config = ModelConfig(dim=8, bottom=(8,), top=(8,), embeddings=EmbeddingConfig(
        default=cce, tables={"c": CCESettings(min_rows=0, chunks=2, compression=1.0)}))
    model = build_model(3, [300, 5000, 70_000], ["a", "b", "c"], config).eval()
    tables = model.embedding_tables()
    assert [t.pointers.dtype for t in tables] == [torch.uint8, torch.uint16, torch.int32]
    for table in tables[:2]:
        table.weight1.weight.data.normal_(0, 0.05)
        table.recluster()
    onnx_model, _ = build_graph(model)
    onnx.checker.check_model(onnx_model, full_check=True)
    session = ort.InferenceSession(onnx_model.SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    parity = check_parity(model, session)
    print(f"CCE export parity: max |torch - onnxruntime| = {parity.max_abs_diff:.2e}")
    assert parity.passed and parity.max_abs_diff <= 1e-5


# -- a real training, and serving its package ----------------------------------------------


@pytest.fixture(scope="module")
def trainings(tmp_path_factory) -> dict:
    """The same small CCE model trained for 3 epochs of 59 steps, with the default schedule
    (re-clustered at steps 50 and 100) and without re-clustering."""
    root = tmp_path_factory.mktemp("cce")
    write_criteo_like(CriteoLikeConfig(n_rows=19_000, cardinalities=(50, 400, 3000, 7, 6000),
                                       seed=5), root / "data", progress=False)
    data = DataConfig(path=str(root / "data" / "data.parquet"), format="parquet",
                      spec_path=str(root / "data" / "spec.json"), split="random")
    runs = {}
    for name, settings in (("clustered", CCESettings()), ("fixed", CCESettings(reclusters=0))):
        model = ModelConfig(dim=8, bottom=(16,), top=(16,),
                            embeddings=EmbeddingConfig(default=settings))
        runs[name] = fit(data, model, TrainConfig(epochs=3, patience=0, batch_size=256,
                                                  progress=False),
                         TransformConfig(), str(root / name))
    return {"root": root, "data": data, "runs": runs}


def test_training_with_reclustering_is_no_worse_than_without(trainings):
    runs = trainings["runs"]
    steps = -(-runs["clustered"]["history"][0]["rows"] // 256) * len(
        runs["clustered"]["history"])
    auc = {name: run["metrics"]["valid"]["auc"] for name, run in runs.items()}
    print(f"valid AUC after {steps} steps: re-clustered {auc['clustered']:.4f}, "
          f"never re-clustered {auc['fixed']:.4f}")
    assert steps >= 100  # both rounds ran
    # The trainer stepped the schedule: the saved hash is a redrawn one.
    checkpoint = load_checkpoint(trainings["root"] / "clustered").model
    cce_tables = [t for t in checkpoint.embedding_tables() if isinstance(t, CCETable)]
    assert cce_tables
    for table in cce_tables:
        initial = cce_coefficients(table.seed, table.column, 0, table.chunks)
        assert not np.array_equal(table.coefficients.numpy(), initial)
    assert auc["clustered"] >= auc["fixed"]


def test_a_cce_package_serves_through_the_http_api(trainings, tmp_path):
    root, data = trainings["root"], trainings["data"]
    repo = tmp_path / "repo"
    package = export_checkpoint(root / "clustered", repo, "ctr", log=lambda _: None)
    graph = onnx.load(str(package / "model.onnx")).graph
    assert "CCEGather" in {node.op_type for node in graph.node}
    rows_file, expected = scored_offline(root / "clustered", data.path, data.spec_path, 40,
                                         tmp_path)
    rows = request_rows(rows_file)
    with ServiceProcess(repo) as server:
        answer = httpx.post(server.url + SCORE, json={"rows": rows}, timeout=60)
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(answer.json()["probabilities"], expected, atol=2e-6, rtol=0)
