import copy
import io

import pytest
import torch

from ctrserve.models.dlrm import CTRModel, ModelConfig, build_model
from ctrserve.models.embeddings.full import FullTable
from ctrserve.models.embeddings.quantized import QuantizedTable, quantize_table
from ctrserve.models.embeddings.scheme_settings import (
    SETTINGS,
    EmbeddingConfig,
    Int8Settings,
    QRSettings,
)
from ctrserve.models.quantize import quantize_model
from ctrserve.models.schemes import build_tables

FP32_EPS = torch.finfo(torch.float32).eps
FP16_UNIT_ROUNDOFF = 2.0**-11
FP16_SUBNORMAL_HALF_SPACING = 2.0**-25


def trained_like_table(n: int = 400, dim: int = 16, seed: int = 0) -> FullTable:
    """A full table whose rows span many magnitudes, with constant rows and an outlier row."""
    torch.manual_seed(seed)
    table = FullTable(n, dim)
    with torch.no_grad():
        weight = table.table.weight
        weight.mul_(torch.logspace(-4, 2, n)[torch.randperm(n)].unsqueeze(1))
        weight[0] = 0.0
        weight[1] = -0.37
        weight[2] = 1e-3
        weight[3, 5] = 50.0
    return table


def int8_bound(rows: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Per-element int8 bound: half a step, plus a few fp32 ulps of the row's magnitude."""
    magnitude = rows.abs().max(dim=1).values
    return (scale / 2 + 8 * FP32_EPS * magnitude).unsqueeze(1)


def test_int8_rows_within_half_a_step():
    table = trained_like_table()
    rows = table.table.weight.detach().clone()
    quantized = quantize_table(table, "int8")
    ids = torch.arange(table.num_embeddings)
    got = quantized(ids)
    assert got.dtype == torch.float32 and got.shape == rows.shape
    error = (got - rows).abs()
    assert (error <= int8_bound(rows, quantized.scale)).all()
    # The bound is met by rounding, not by storing the values: errors reach near half a step.
    varying = quantized.scale > 0
    relative = error[varying] / (quantized.scale[varying] / 2).unsqueeze(1)
    assert relative.max() > 0.9
    assert quantized.codes.dtype == torch.uint8
    assert torch.equal(quantized.scale, (rows.max(1).values - rows.min(1).values) / 255)
    assert (quantized.codes[varying].min(dim=1).values == 0).all()
    assert (quantized.codes[varying].max(dim=1).values == 255).all()


def test_int8_constant_rows_come_back_exactly():
    table = trained_like_table()
    quantized = quantize_table(table, "int8")
    got = quantized(torch.tensor([0, 1, 2]))
    assert torch.isfinite(got).all()
    assert torch.equal(got, table.table.weight.detach()[:3])
    assert torch.equal(quantized.scale[:3], torch.zeros(3))
    assert torch.equal(quantized.codes[:3], torch.zeros(3, table.dim, dtype=torch.uint8))


def test_fp16_within_half_precision_rounding():
    table = trained_like_table()
    rows = table.table.weight.detach().clone()
    quantized = quantize_table(table, "fp16")
    got = quantized(torch.arange(table.num_embeddings))
    assert got.dtype == torch.float32
    assert quantized.weight.dtype == torch.float16
    bound = FP16_UNIT_ROUNDOFF * rows.abs() + FP16_SUBNORMAL_HALF_SPACING
    assert ((got - rows).abs() <= bound).all()
    assert not torch.equal(got, rows)


@pytest.mark.parametrize("kind", ["int8", "fp16"])
@pytest.mark.parametrize(("n", "dim"), [(1, 1), (37, 16), (1000, 64)])
def test_bytes_agree_three_ways(kind, n, dim):
    quantized = quantize_table(FullTable(n, dim), kind)
    closed_form = n * dim + n * 2 * 4 if kind == "int8" else n * dim * 2
    stored = sum(t.numel() * t.element_size() for t in quantized.inference_tensors().values())
    assert quantized.inference_bytes() == stored == closed_form
    summary = quantized.summary()
    assert summary["scheme"] == kind
    assert summary["bytes"] == closed_form
    assert summary["ratio"] == pytest.approx(n * dim * 4 / closed_form)


@pytest.mark.parametrize("kind", ["int8", "fp16"])
def test_state_dict_round_trip_into_empty_table(kind):
    quantized = quantize_table(trained_like_table(), kind)
    assert list(quantized.parameters()) == []
    buffer = io.BytesIO()
    torch.save(quantized.state_dict(), buffer)
    buffer.seek(0)
    empty = QuantizedTable(quantized.num_embeddings, quantized.dim, kind)
    ids = torch.randint(0, quantized.num_embeddings, (256,))
    assert not torch.equal(empty(ids), quantized(ids))
    empty.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(empty(ids), quantized(ids))


def test_rejects_what_it_cannot_quantize():
    with pytest.raises(ValueError, match="kind"):
        QuantizedTable(10, 4, "int4")
    with pytest.raises(TypeError, match="full"):
        qr_table = build_tables(["t"], [100], 4, EmbeddingConfig(default=QRSettings()))[0]
        quantize_table(qr_table, "int8")
    table = FullTable(10, 4)
    with torch.no_grad():
        table.table.weight[3, 1] = 1e5
    with pytest.raises(ValueError, match="float16"):
        quantize_table(table, "fp16")
    with torch.no_grad():
        table.table.weight[3, 1] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        quantize_table(table, "int8")


SIZES = [1000, 300, 20]
NAMES = ["a", "b", "c"]
N_DENSE = 4


def small_dlrm(embeddings: EmbeddingConfig | None = None) -> CTRModel:
    torch.manual_seed(0)
    config = ModelConfig(dim=16, bottom=(32,), top=(32,),
                         embeddings=embeddings or EmbeddingConfig())
    return build_model(N_DENSE, SIZES, NAMES, config).eval()


def probabilities(model: CTRModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    dense = torch.randn(512, N_DENSE, generator=generator)
    sparse = torch.stack(
        [torch.randint(0, size, (512,), generator=generator) for size in SIZES], dim=1
    )
    with torch.no_grad():
        return torch.sigmoid(model(dense, sparse))


def total_bytes(model: CTRModel) -> tuple[int, int]:
    summaries = model.table_summaries()
    return sum(s["bytes"] for s in summaries), sum(s["full_bytes"] for s in summaries)


@pytest.mark.parametrize(("kind", "bytes_per_row"), [("int8", 16 + 8), ("fp16", 32)])
def test_quantize_model_keeps_predictions_and_shrinks_bytes(kind, bytes_per_row):
    model = small_dlrm()
    quantized = copy.deepcopy(model)
    assert quantize_model(quantized, EmbeddingConfig(default=SETTINGS[kind]())) == NAMES
    assert all(isinstance(table, QuantizedTable) for table in quantized.tables)
    reference, got = probabilities(model), probabilities(quantized)
    assert not torch.equal(got, reference)
    assert (got - reference).abs().max() < 1e-2
    stored, full = total_bytes(quantized)
    assert stored == sum(SIZES) * bytes_per_row
    assert full / stored == pytest.approx(64 / bytes_per_row)
    assert total_bytes(model) == (full, full)

    # What a checkpoint does: build the tables empty, then load the state dict.
    rebuilt = small_dlrm()
    for index, table in enumerate(rebuilt.tables):
        rebuilt.tables[index] = QuantizedTable(table.num_embeddings, table.dim, kind)
    rebuilt.load_state_dict(quantized.state_dict())
    assert torch.equal(probabilities(rebuilt), got)


def test_quantize_model_skips_small_and_compressed_tables():
    model = small_dlrm(EmbeddingConfig(default=QRSettings(min_rows=500)))
    qr_table, small_table = model.tables[0], model.tables[2]
    assert quantize_model(model, EmbeddingConfig(default=Int8Settings(min_rows=100))) == ["b"]
    assert model.tables[0] is qr_table and model.tables[2] is small_table
    assert isinstance(model.tables[1], QuantizedTable)
