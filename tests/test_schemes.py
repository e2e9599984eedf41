"""The scheme registry: every registered scheme has every part (settings type, tables, closed-form
bytes, budget search, ONNX node and function), and its closed-form bytes are what its tables
report and what their exported initializers hold."""

import dataclasses
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ctrserve.export.graph import build_graph
from ctrserve.export.parity import check_parity, session_options
from ctrserve.export.table_nodes import IDS, SCHEME_EXPORTS
from ctrserve.models.budget import Fit, full_bytes
from ctrserve.models.dlrm import CTRModel, ModelConfig, build_model
from ctrserve.models.embeddings.base import EmbeddingTable
from ctrserve.models.embeddings.full import FullTable
from ctrserve.models.embeddings.pep import PEPTable
from ctrserve.models.embeddings.quantized import QuantizedTable, quantize_table
from ctrserve.models.embeddings.scheme_settings import (
    SETTINGS,
    EmbeddingConfig,
    PEPSettings,
    SchemeSettings,
    settings_from_dict,
)
from ctrserve.models.schemes import SCHEMES, build_tables

NAMES = ["a", "b", "c"]
SIZES = [300, 5000, 40]
DIM = 8


def model_of(name: str, settings: SchemeSettings | None = None) -> tuple[CTRModel, SchemeSettings]:
    """A DLRM whose every table uses the scheme's default settings (or ``settings``), holding
    values an export must carry: quantized tables filled from random full ones, PEP tables
    masked to keep exactly their ``pep_keep`` of all values."""
    torch.manual_seed(0)
    settings = settings or SETTINGS[name]()
    config = ModelConfig(dim=DIM, bottom=(8,), top=(8,),
                         embeddings=EmbeddingConfig(default=settings))
    model = build_model(3, SIZES, NAMES, config).eval()
    tables = model.embedding_tables()
    for table in tables:
        if isinstance(table, QuantizedTable):
            full = FullTable(table.num_embeddings, table.dim)
            table.load_state_dict(quantize_table(full, table.scheme).state_dict())
    pep = [table for table in tables if isinstance(table, PEPTable)]
    if pep:
        assert isinstance(settings, PEPSettings)
        values = sum(SIZES) * DIM
        kept = np.zeros(values, dtype=bool)
        chosen = math.floor(settings.pep_keep * sum(SIZES) * DIM)
        kept[np.random.default_rng(0).permutation(values)[:chosen]] = True
        for table, mask in zip(pep, np.split(kept, np.cumsum(SIZES)[:-1] * DIM), strict=True):
            table.fix_mask(torch.from_numpy(mask.reshape(-1, DIM)))
    return model, settings


def test_every_settings_type_is_registered_and_exported():
    assert list(SCHEMES) == list(SETTINGS)
    assert set(SCHEME_EXPORTS) == set(SCHEMES)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_scheme_has_its_settings_type_and_benchmark_settings(name):
    scheme = SCHEMES[name]
    assert scheme.name == name and scheme.settings is SETTINGS[name]
    assert issubclass(scheme.settings, SchemeSettings)
    assert dataclasses.is_dataclass(scheme.settings)
    assert scheme.settings.__dataclass_params__.frozen
    assert scheme.benchmark
    for settings in scheme.benchmark.values():
        assert type(settings) is scheme.settings
        assert settings_from_dict(settings.to_dict()) == settings


@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_schemes_tables_take_its_closed_form_bytes_and_export_them(name):
    model, settings = model_of(name)
    tables = model.embedding_tables()
    assert all(isinstance(t, EmbeddingTable) and t.scheme == name for t in tables)
    closed_form = SCHEMES[name].tables_bytes([settings] * len(SIZES), SIZES, DIM)
    assert sum(table.inference_bytes() for table in tables) == closed_form

    onnx_model, records = build_graph(model)
    onnx.checker.check_model(onnx_model, full_check=True)
    initializers = {t.name: onnx.numpy_helper.to_array(t).nbytes
                    for t in onnx_model.graph.initializer}
    exported = {initializer for record in records for initializer in record.initializers}
    assert sum(initializers[initializer] for initializer in exported) == closed_form

    export = SCHEME_EXPORTS[name]
    functions = {(f.name, f.overload): f for f in onnx_model.functions}
    for table in tables:
        node = export.node(table)
        assert set(node.inputs) == {IDS, *table.inference_tensors()}
        if export.function is None:
            assert not functions
        else:
            assert tuple(functions[node.function_key].input) == node.inputs
    session = ort.InferenceSession(onnx_model.SerializeToString(), session_options(),
                                   providers=["CPUExecutionProvider"])
    assert check_parity(model, session).passed


@pytest.mark.parametrize("name", list(SCHEMES))
def test_each_scheme_searches_a_budget(name):
    budget = full_bytes(SIZES, DIM) // 2
    fit = SCHEMES[name].fit_budget(SETTINGS[name](), NAMES, SIZES, DIM, budget)
    assert isinstance(fit, Fit)
    if not fit.reachable:
        assert name == "full" and fit.bytes > budget and fit.reason
        return
    assert fit.embeddings is not None and fit.bytes <= budget
    if fit.exact:
        tables = build_tables(NAMES, SIZES, DIM, fit.embeddings)
        assert sum(table.inference_bytes() for table in tables) == fit.bytes
