"""Each embedding scheme's part of the ONNX export: the node a table of the scheme becomes (op
type, overload, attributes, and which of its stored tensors it reads) and the function body that
node calls.

This is the export half of the scheme registry (``ctrserve.models.schemes``), kept here because
it needs onnx and ``models`` never imports ``export``. ``SCHEME_EXPORTS`` is keyed by the
registry's scheme names; ``tests/test_schemes.py`` checks that every registered scheme has its
entry, that its node reads every tensor the table stores, and that the function's inputs are the
node's.

A node's ``inputs`` name, in order, what the node reads: ``ids`` (the table's column of the
``sparse`` input) and keys of the table's ``inference_tensors()``; the graph feeds each tensor as
an initializer (``memory`` of a shared-memory table as the one memory all its tables share).
They are also the input names of the function the node calls.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from onnx import FunctionProto

from ctrserve.models.embeddings.base import EmbeddingTable
from ctrserve.models.embeddings.compositional import CompositionalTable
from ctrserve.models.embeddings.pep import PEPTable
from ctrserve.models.embeddings.robe import RobeTable

from .functions import (
    DOMAIN,
    HYBRID_TENSORS,
    cce_gather,
    hash_gather,
    hybrid_gather,
    lma_gather,
    pruned_gather,
    pruned_gather_empty,
    qr_gather,
    quantized_gather_fp16,
    quantized_gather_int8,
    robe_gather,
)

#: The input that stands for the table's ids.
IDS = "ids"

T = TypeVar("T", bound=EmbeddingTable)


@dataclass(frozen=True)
class TableNode:
    """The node one table becomes."""

    op_type: str
    inputs: tuple[str, ...]
    #: The function the node calls; "" for a standard op.
    overload: str = "default"
    domain: str = DOMAIN
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def function_key(self) -> tuple[str, str]:
        return self.op_type, self.overload


@dataclass(frozen=True)
class SchemeExport(Generic[T]):
    """One scheme's export: ``node(table)``, and ``function(node)``, the body a node of the
    scheme calls (None where the node is a standard op)."""

    node: Callable[[T], TableNode]
    function: Callable[[TableNode], FunctionProto] | None


def _full_node(table: EmbeddingTable) -> TableNode:
    return TableNode("Gather", ("weight", IDS), overload="", domain="", attributes={"axis": 0})


def _hash_node(table: EmbeddingTable) -> TableNode:
    return TableNode("HashGather", (IDS, "weight", "buckets"))


def _hybrid_node(table: EmbeddingTable) -> TableNode:
    return TableNode("HybridGather", (IDS, *HYBRID_TENSORS))


def _qr_node(table: CompositionalTable) -> TableNode:
    partitions = len(table.radices)
    return TableNode("QRGather", (IDS, "radices", *(f"weight{j}" for j in range(partitions))),
                     overload=f"{table.operation}{partitions}",
                     attributes={"operation": table.operation, "partitions": partitions})


def _qr_function(node: TableNode) -> FunctionProto:
    return qr_gather(node.attributes["operation"], node.attributes["partitions"])


def _pep_node(table: PEPTable) -> TableNode:
    """Overload ``empty`` when every value is pruned (nothing to gather from)."""
    overload = "packed" if table.parameter_count() else "empty"
    return TableNode("PrunedGather", (IDS, "values", "offsets", "mask_bits", "dim"),
                     overload=overload)


def _pep_function(node: TableNode) -> FunctionProto:
    return pruned_gather() if node.overload == "packed" else pruned_gather_empty()


def _int8_node(table: EmbeddingTable) -> TableNode:
    return TableNode("QuantizedGather", (IDS, "codes", "scale", "offset"), overload="int8",
                     attributes={"kind": "int8"})


def _fp16_node(table: EmbeddingTable) -> TableNode:
    return TableNode("QuantizedGather", (IDS, "weight"), overload="fp16",
                     attributes={"kind": "fp16"})


def _lma_node(table: EmbeddingTable) -> TableNode:
    return TableNode("LMAGather", (IDS, "memory", "signatures", "coefficients"))


def _robe_node(table: RobeTable) -> TableNode:
    """The width is an attribute: no stored tensor holds it."""
    return TableNode("ROBEGather", (IDS, "memory", "coefficients", "block"),
                     attributes={"dim": table.dim})


def _cce_node(table: EmbeddingTable) -> TableNode:
    return TableNode("CCEGather", (IDS, "pointers", "weight0", "weight1", "coefficients"))


#: Every scheme's export, by the registry's scheme names.
SCHEME_EXPORTS: dict[str, SchemeExport[Any]] = {
    "full": SchemeExport(_full_node, None),
    "hash": SchemeExport(_hash_node, lambda node: hash_gather()),
    "hybrid": SchemeExport(_hybrid_node, lambda node: hybrid_gather()),
    "qr": SchemeExport(_qr_node, _qr_function),
    "kpart": SchemeExport(_qr_node, _qr_function),
    "pep": SchemeExport(_pep_node, _pep_function),
    "int8": SchemeExport(_int8_node, lambda node: quantized_gather_int8()),
    "fp16": SchemeExport(_fp16_node, lambda node: quantized_gather_fp16()),
    "lma": SchemeExport(_lma_node, lambda node: lma_gather()),
    "robe": SchemeExport(_robe_node, lambda node: robe_gather()),
    "cce": SchemeExport(_cce_node, lambda node: cce_gather()),
}


def scheme_export(table: EmbeddingTable) -> SchemeExport[Any]:
    if table.scheme not in SCHEME_EXPORTS:
        raise ValueError(f"no ONNX export for scheme {table.scheme!r}")
    return SCHEME_EXPORTS[table.scheme]
