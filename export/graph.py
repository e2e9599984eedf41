"""A trained CTR model as one ONNX graph.

Inputs: ``dense`` float32 [N, n_dense] (absent when the model has no dense columns) and ``sparse``
int64 [N, n_tables] (ids after the feature transform). Output: ``probability`` float32 [N].

Every table's stored tensors (``EmbeddingTable.inference_tensors``) become initializers named
``<table>/<tensor>``, in their stored dtypes; the memory shared by LMA (or ROBE) tables is one
initializer ``shared/<scheme>/memory`` fed to all of them. A table becomes its scheme's node
(``table_nodes.py``): a standard ``Gather`` for a full table, named ``<table>/lookup`` like the
gathers of the function bodies (the server checks those run on the GPU), one ``ctrserve`` node
calling a model-local function (``functions.py``) for every compressed table. The MLPs and
DLRM's pairwise interaction are standard ops with initializers under ``dense/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ctrserve.models.dlrm import DLRM, CTRModel, LogisticRegression
from ctrserve.models.embeddings.base import EmbeddingTable
from ctrserve.models.embeddings.constants import FLOAT32_BYTES
from ctrserve.models.embeddings.shared_memory import SharedMemoryTable

from .functions import DOMAIN, DOMAIN_VERSION, OPSET
from .package import LOOKUP_NODE
from .table_nodes import IDS, TableNode, scheme_export

#: IR version 10 is the first with function overloads.
IR_VERSION = 10
DENSE_INPUT, SPARSE_INPUT, OUTPUT = "dense", "sparse", "probability"


@dataclass
class TableExport:
    """One table in the graph: its node and what it stores."""

    name: str
    scheme: str
    op_type: str
    #: Every initializer the node reads, a shared memory included.
    initializers: list[str]
    #: The shared memory the table reads (LMA, ROBE), and the bytes of it attributed to it.
    shared_memory: str | None = None
    memory_share_bytes: int = 0


class GraphBuilder:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, onnx.TensorProto] = {}
        self._count = 0

    def initializer(self, name: str, value: np.ndarray | torch.Tensor) -> str:
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        self.initializers[name] = numpy_helper.from_array(np.ascontiguousarray(value), name)
        return name

    def op(self, op_type: str, *inputs: str, output: str | None = None, domain: str = "",
           overload: str = "", **attributes) -> str:
        self._count += 1
        name = output or f"{op_type.lower()}_{self._count}"
        node = helper.make_node(op_type, list(inputs), [name], name=f"{op_type}_{self._count}",
                                domain=domain, **attributes)
        if overload:
            node.overload = overload
        self.nodes.append(node)
        return name


def _table_node(graph: GraphBuilder, name: str, table: EmbeddingTable, ids: str,
                shared: dict[str, str]) -> tuple[str, TableExport, TableNode]:
    """Adds ``table``'s node reading ``ids``; returns the embedding's name, the table's record
    and its node."""
    node = scheme_export(table).node(table)
    tensors = table.inference_tensors()
    inputs = {IDS: ids}
    memory, share = None, 0
    if isinstance(table, SharedMemoryTable):
        memory = inputs["memory"] = shared[table.scheme]
        share = int(tensors["memory"].numel()) * FLOAT32_BYTES
    for key in node.inputs:
        if key not in inputs:
            inputs[key] = graph.initializer(f"{name}/{key}", tensors[key])
    output = graph.op(node.op_type, *(inputs[key] for key in node.inputs),
                      output=f"{name}/embedding", domain=node.domain, overload=node.overload,
                      **node.attributes)
    if not node.overload:  # a standard op reading the table's rows itself: the lookup
        graph.nodes[-1].name = f"{name}/{LOOKUP_NODE}"
    stored = [inputs[key] for key in node.inputs if key != IDS]
    return output, TableExport(name, table.scheme, node.op_type, stored, memory, share), node


def _shared_memories(graph: GraphBuilder, tables: list[EmbeddingTable]) -> dict[str, str]:
    """One initializer per shared memory, ``shared/<scheme>/memory``, by scheme."""
    memories: dict[str, str] = {}
    for table in tables:
        if isinstance(table, SharedMemoryTable) and table.scheme not in memories:
            values = table.memory.weight()
            memories[table.scheme] = graph.initializer(f"shared/{table.scheme}/memory", values)
    return memories


def _mlp(graph: GraphBuilder, layers: nn.Sequential, x: str, prefix: str) -> str:
    for index, layer in enumerate(layers):
        if isinstance(layer, nn.Linear):
            weight = graph.initializer(f"dense/{prefix}.{index}.weight", layer.weight)
            bias = graph.initializer(f"dense/{prefix}.{index}.bias", layer.bias)
            x = graph.op("Gemm", x, weight, bias, transB=1)
        elif isinstance(layer, nn.ReLU):
            x = graph.op("Relu", x)
        else:
            raise ValueError(f"no ONNX export for layer {type(layer).__name__}")
    return x


def _dlrm_logit(graph: GraphBuilder, model: DLRM, embedded: list[str]) -> str:
    if model.n_dense:
        x = _mlp(graph, model.bottom, DENSE_INPUT, "bottom")
    else:
        constant = graph.initializer("dense/constant", model.constant.detach().reshape(1, -1))
        rows = graph.op("Shape", SPARSE_INPUT, start=0, end=1)
        width = graph.initializer("dense/width", np.array([model.config.dim], dtype=np.int64))
        x = graph.op("Expand", constant, graph.op("Concat", rows, width, axis=0))
    axis = graph.initializer("dense/axis1", np.array([1], dtype=np.int64))
    vectors = graph.op("Concat", *(graph.op("Unsqueeze", v, axis) for v in [x, *embedded]),
                       axis=1)  # [N, T + 1, D]
    dots = graph.op("MatMul", vectors, graph.op("Transpose", vectors, perm=[0, 2, 1]))
    flat_shape = graph.initializer("dense/flat_shape", np.array([0, -1], dtype=np.int64))
    n_vectors = len(embedded) + 1
    pair_index = (model.pair_rows * n_vectors + model.pair_cols).to(torch.int64)
    pairs = graph.op("Gather", graph.op("Reshape", dots, flat_shape),
                     graph.initializer("dense/pair_index", pair_index), axis=1)
    return _mlp(graph, model.top, graph.op("Concat", x, pairs, axis=1), "top")


def _lr_logit(graph: GraphBuilder, model: LogisticRegression, embedded: list[str]) -> str:
    bias = graph.initializer("dense/bias", model.bias.detach())
    logit = graph.op("Add", graph.op("Sum", *embedded), bias)
    if model.dense_weights is not None:
        weight = graph.initializer("dense/dense_weights.weight", model.dense_weights.weight)
        dense_bias = graph.initializer("dense/dense_weights.bias", model.dense_weights.bias)
        logit = graph.op("Add", logit,
                         graph.op("Gemm", DENSE_INPUT, weight, dense_bias, transB=1))
    return logit


@torch.no_grad()
def build_graph(model: CTRModel, name: str = "ctr") -> tuple[onnx.ModelProto, list[TableExport]]:
    """The model as ONNX, with each table's record (in column order)."""
    graph = GraphBuilder()
    model_tables = model.embedding_tables()
    n_tables = len(model_tables)
    shared = _shared_memories(graph, model_tables)
    axis = graph.initializer("dense/ids_axis", np.array([1], dtype=np.int64))
    columns = [f"ids/{table_name}" for table_name in model.table_names]
    split = helper.make_node("Split", [SPARSE_INPUT], [f"{c}/column" for c in columns],
                             name="Split_ids", axis=1, num_outputs=n_tables)
    graph.nodes.append(split)
    embedded, tables = [], []
    functions: dict[tuple[str, str], onnx.FunctionProto] = {}
    for table_name, table, column in zip(model.table_names, model_tables, columns, strict=True):
        ids = graph.op("Squeeze", f"{column}/column", axis, output=column)
        output, record, node = _table_node(graph, table_name, table, ids, shared)
        embedded.append(output)
        tables.append(record)
        build_function = scheme_export(table).function
        if build_function is not None and node.function_key not in functions:
            functions[node.function_key] = build_function(node)
    if isinstance(model, DLRM):
        logit = _dlrm_logit(graph, model, embedded)
    elif isinstance(model, LogisticRegression):
        logit = _lr_logit(graph, model, embedded)
    else:
        raise ValueError(f"no ONNX export for model {type(model).__name__}")
    flat = graph.initializer("dense/flat", np.array([-1], dtype=np.int64))
    graph.op("Reshape", graph.op("Sigmoid", logit), flat, output=OUTPUT)

    inputs = [helper.make_tensor_value_info(SPARSE_INPUT, TensorProto.INT64, ["N", n_tables])]
    if model.n_dense:
        inputs.insert(0, helper.make_tensor_value_info(
            DENSE_INPUT, TensorProto.FLOAT, ["N", model.n_dense]))
    outputs = [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N"])]
    proto = helper.make_graph(graph.nodes, name, inputs, outputs,
                              list(graph.initializers.values()))
    onnx_model = helper.make_model(
        proto,
        opset_imports=[helper.make_opsetid("", OPSET),
                       helper.make_opsetid(DOMAIN, DOMAIN_VERSION)],
        functions=[functions[key] for key in sorted(functions)],
        ir_version=IR_VERSION,
        producer_name="ctrserve",
    )
    return onnx_model, tables
