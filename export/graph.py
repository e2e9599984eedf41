"""A trained CTR model as one ONNX graph.

Inputs: ``dense`` float32 [N, n_dense] (absent when the model has no dense columns) and ``sparse``
int64 [N, n_tables] (ids after the feature transform). Output: ``probability`` float32 [N].

Every table's stored tensors (``EmbeddingTable.inference_tensors``) become initializers named
``<table>/<tensor>``, in their stored dtypes; the memory shared by LMA (or ROBE) tables is one
initializer ``shared/<scheme>/memory`` fed to all of them. Full tables are a standard ``Gather``;
every compressed table is one ``ctrserve`` node (see ``functions.py``). The MLPs and DLRM's
pairwise interaction are standard ops with initializers under ``dense/``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from ctrserve.models.dlrm import DLRM, CTRModel, LogisticRegression
from ctrserve.models.embeddings import EmbeddingTable
from ctrserve.models.embeddings.base import FLOAT32_BYTES

from .functions import DOMAIN, DOMAIN_VERSION, OPSET, functions_for

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
                shared: dict[str, str]) -> tuple[str, TableExport]:
    """Adds ``table``'s node reading ``ids``; returns the embedding's name and its record."""
    tensors = table.inference_tensors()
    own = {key: value for key, value in tensors.items() if key != "memory"}
    names = {key: graph.initializer(f"{name}/{key}", value) for key, value in own.items()}
    scheme = table.scheme
    memory, share = None, 0
    if scheme in ("lma", "robe"):
        memory = names["memory"] = shared[scheme]
        share = int(tensors["memory"].numel()) * FLOAT32_BYTES
    attributes: dict = {}
    overload = "default"
    if scheme == "full":
        output = graph.op("Gather", names["weight"], ids, output=f"{name}/embedding", axis=0)
        return output, TableExport(name, scheme, "Gather", [names["weight"]])
    if scheme == "hash":
        op_type, inputs = "HashGather", ["weight", "buckets"]
    elif scheme in ("qr", "kpart"):
        partitions = len(table.radices)
        op_type = "QRGather"
        inputs = ["radices", *(f"weight{j}" for j in range(partitions))]
        overload = f"{table.operation}{partitions}"
        attributes = {"operation": table.operation, "partitions": partitions}
    elif scheme == "pep":
        op_type, inputs = "PrunedGather", ["values", "offsets", "mask_bits", "dim"]
        overload = "packed" if own["values"].numel() else "empty"
    elif scheme in ("int8", "fp16"):
        op_type = "QuantizedGather"
        inputs = ["codes", "scale", "offset"] if scheme == "int8" else ["weight"]
        overload, attributes = scheme, {"kind": scheme}
    elif scheme == "lma":
        op_type, inputs = "LMAGather", ["memory", "signatures", "coefficients"]
    elif scheme == "robe":
        op_type, inputs = "ROBEGather", ["memory", "coefficients", "block"]
        attributes = {"dim": table.dim}
    else:
        raise ValueError(f"table {name}: no ONNX export for scheme {scheme!r}")
    output = graph.op(op_type, ids, *(names[key] for key in inputs), output=f"{name}/embedding",
                      domain=DOMAIN, overload=overload, **attributes)
    return output, TableExport(name, scheme, op_type, [names[key] for key in inputs], memory,
                               share)


def _shared_memories(graph: GraphBuilder, model: CTRModel) -> dict[str, str]:
    memories: dict[str, str] = {}
    for table in model.tables:
        if table.scheme in ("lma", "robe") and table.scheme not in memories:
            values = table.memory.weight()
            name = graph.initializer(f"shared/{table.scheme}/memory", values)
            memories[table.scheme] = name
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
    n_tables = len(model.tables)
    shared = _shared_memories(graph, model)
    axis = graph.initializer("dense/ids_axis", np.array([1], dtype=np.int64))
    columns = [f"ids/{table_name}" for table_name in model.table_names]
    split = helper.make_node("Split", [SPARSE_INPUT], [f"{c}/column" for c in columns],
                             name="Split_ids", axis=1, num_outputs=n_tables)
    graph.nodes.append(split)
    embedded, tables = [], []
    for table_name, table, column in zip(model.table_names, model.tables, columns, strict=True):
        ids = graph.op("Squeeze", f"{column}/column", axis, output=column)
        output, record = _table_node(graph, table_name, table, ids, shared)
        embedded.append(output)
        tables.append(record)
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
        functions=functions_for(graph.nodes),
        ir_version=IR_VERSION,
        producer_name="ctrserve",
    )
    return onnx_model, tables
