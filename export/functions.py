"""The custom gather ops of domain ``ctrserve`` (opset 1), each with a model-local ONNX function.

A compressed table is one node ``ctrserve::<Op>`` whose inputs are the ids (int64 [N]) and the
table's stored tensors, and whose output is float32 [N, dim]. The node names a function
``overload``: the body, written with standard ONNX ops only, that ONNX Runtime inlines, so its CPU
and CUDA providers run the model without a native plug-in; a fused kernel can later replace the
body without changing the graph. The bodies mirror the torch schemes in
``ctrserve.models.embeddings`` operation for operation, in integer arithmetic for ids (``Div`` and
``Mod`` on int64 are exact for every id below 2**63).

Which scheme's table becomes which node is ``table_nodes.py``.

| op               | overload            | inputs after ids                          |
|------------------|---------------------|-------------------------------------------|
| HashGather       | ``default``         | weight, buckets                           |
| HybridGather     | ``default``         | head_weight, remainder, quotient,         |
|                  |                     | head_bits, head_rank                      |
| QRGather         | ``{operation}{k}``  | radices, weight0 .. weight{k-1}           |
| PrunedGather     | ``packed``/``empty``| values, offsets, mask_bits, dim           |
| QuantizedGather  | ``int8``            | codes, scale, offset                      |
| QuantizedGather  | ``fp16``            | weight                                    |
| LMAGather        | ``default``         | memory, signatures, coefficients          |
| ROBEGather       | ``default``         | memory, coefficients, block               |
| CCEGather        | ``default``         | pointers, weight0, weight1, coefficients  |

Every op of every body has a CUDA kernel in the pinned ONNX Runtime for the types it meets
(``tests/test_gpu_runtime.py`` checks each against ONNX Runtime's kernel table), so a CUDA session
runs the bodies on the GPU: bit unpacking is integer ``Div`` and ``Mod``, not ``BitShift`` and
``BitwiseAnd``, which have no CUDA kernel. The ``Gather`` nodes that read rows of a stored tensor
are named ``lookup`` (``Body.lookup``): the server checks those run on the GPU.

Scalar constants inside the bodies (the prime, digit bases, axes) are code, not table data; every
tensor a table stores is a graph initializer fed to its node and counted. Lengths of stored
tensors are taken with ``Shape``, not ``Size``: with ``Size`` of a 13 MB shared memory, creating
an ONNX Runtime session left 10 MB more resident (measured; its constant folding of ``Size``
appears to copy the initializer).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from onnx import AttributeProto, FunctionProto, NodeProto, TensorProto, helper, numpy_helper

from ctrserve.models.embeddings.hybrid import RANK_BLOCK
from ctrserve.models.embeddings.robe import DIGIT_BASE
from ctrserve.models.embeddings.shared_memory import PRIME

from .package import LOOKUP_NODE

DOMAIN = "ctrserve"
#: A hybrid table's stored tensors, in the order its node and function read them.
HYBRID_TENSORS = ("head_weight", "remainder", "quotient", "head_bits", "head_rank")
DOMAIN_VERSION = 1
#: The standard opset the graph and every function body use.
OPSET = 21


class Body:
    """Builds a function body: each ``op`` call appends a node and returns its output name."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.nodes: list[NodeProto] = []
        self._count = 0

    def op(self, op_type: str, *inputs: str, output: str | None = None, **attributes) -> str:
        self._count += 1
        name = output or f"{self.prefix}{self._count}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attributes))
        return name

    def lookup(self, table: str, indices: str, output: str | None = None) -> str:
        """``Gather(table, indices, axis=0)``: rows of a stored tensor, in a node named as a
        lookup (``LOOKUP_NODE``)."""
        gathered = self.op("Gather", table, indices, output=output, axis=0)
        self.nodes[-1].name = f"{LOOKUP_NODE}{self._count}"
        return gathered

    def const(self, value: int | float | Sequence[int], dtype=np.int64) -> str:
        return self.op("Constant", value=numpy_helper.from_array(np.asarray(value, dtype=dtype)))

    def attribute_int(self, attribute: str) -> str:
        """A scalar int64 tensor holding the node's attribute ``attribute``."""
        self._count += 1
        name = f"{self.prefix}{self._count}"
        node = helper.make_node("Constant", [], [name])
        node.attribute.append(AttributeProto(
            name="value_int", ref_attr_name=attribute, type=AttributeProto.INT
        ))
        self.nodes.append(node)
        return name


def _function(op_type: str, overload: str, inputs: list[str], body: Body,
              attributes: Sequence[str] = ()) -> FunctionProto:
    function = helper.make_function(
        DOMAIN, op_type, inputs, ["embedding"], body.nodes,
        [helper.make_opsetid("", OPSET)], attributes=list(attributes),
    )
    function.overload = overload
    return function


def hash_gather() -> FunctionProto:
    body = Body("h")
    rows = body.op("Mod", "ids", "buckets")
    body.lookup("weight", rows, output="embedding")
    return _function("HashGather", "default", ["ids", "weight", "buckets"], body)


def hybrid_gather() -> FunctionProto:
    """Head ids read their own row, the others a quotient-remainder pair
    (``embeddings/hybrid.py``): an id's rank (head ids below it) is ``head_rank`` of its block
    of 64 plus an exclusive prefix count of the block's bits, unpacked from its eight bytes by
    integer ``Div`` and ``Mod``; a head id's row is its rank, a tail id numbered ``t = id -
    rank`` reads ``remainder[t mod c] * quotient[t // c]``, ``c`` the remainder's rows."""
    body = Body("y")
    block = body.op("Div", "ids", body.const(RANK_BLOCK))
    position = body.op("Unsqueeze", body.op("Mod", "ids", body.const(RANK_BLOCK)),
                       body.const([1]))  # [N, 1]
    first_byte = body.op("Mul", body.op("Unsqueeze", block, body.const([1])), body.const(8))
    byte_index = body.op("Add", first_byte, body.const(list(range(8))))  # [N, 8]
    # The last block may be short: its missing bytes repeat the last one, past every id.
    last = body.op("Sub", body.op("Shape", "head_bits"), body.const(1))
    block_bytes = body.op("Cast", body.lookup("head_bits", body.op("Min", byte_index, last)),
                          to=TensorProto.INT64)
    places = body.const([1 << k for k in range(8)])
    shifted = body.op("Div", body.op("Unsqueeze", block_bytes, body.const([-1])), places)
    flags = body.op("Reshape", body.op("Mod", shifted, body.const(2)),
                    body.op("Concat", body.op("Shape", "ids"), body.const([RANK_BLOCK]), axis=0))
    before = body.op("CumSum", flags, body.const(1), exclusive=1)  # [N, 64]
    below = body.op("GatherElements", before, position, axis=1)  # [N, 1]
    ranks = body.op("Cast", body.lookup("head_rank", block), to=TensorProto.INT64)
    rank = body.op("Add", ranks, body.op("Squeeze", below, body.const([1])))  # [N]
    heads = _length(body, "head_weight")
    head_row = body.lookup("head_weight", body.op("Min", rank, body.op("Sub", heads,
                                                                      body.const(1))))
    number = body.op("Sub", "ids", rank)
    collisions = _length(body, "remainder")
    last_quotient = body.op("Sub", _length(body, "quotient"), body.const(1))
    quotient = body.op("Min", body.op("Div", number, collisions), last_quotient)
    tail_row = body.op("Mul", body.lookup("remainder", body.op("Mod", number, collisions)),
                       body.lookup("quotient", quotient))
    member = body.op("Cast", body.op("GatherElements", flags, position, axis=1),
                     to=TensorProto.BOOL)  # [N, 1]
    body.op("Where", member, head_row, tail_row, output="embedding")
    return _function("HybridGather", "default", ["ids", *HYBRID_TENSORS], body)


def _length(body: Body, tensor: str, axis: int = 0) -> str:
    """The length of a stored tensor along ``axis`` (its rows by default), a scalar."""
    return body.op("Gather", body.op("Shape", tensor), body.const(axis), axis=0)


def qr_gather(operation: str, partitions: int) -> FunctionProto:
    """Mixed-radix digits of the id pick one row per part; parts are multiplied, added or
    concatenated. ``radices`` holds the k radices, least significant first."""
    body = Body("q")
    weights = [f"weight{j}" for j in range(partitions)]
    parts = []
    place = None
    for j, weight in enumerate(weights):
        radix = body.op("Gather", "radices", body.const(j), axis=0)
        quotient = "ids" if place is None else body.op("Div", "ids", place)
        digit = body.op("Mod", quotient, radix)
        parts.append(body.lookup(weight, digit))
        place = radix if place is None else body.op("Mul", place, radix)
    if operation == "concat":
        body.op("Concat", *parts, output="embedding", axis=-1)
    else:
        combine = "Mul" if operation == "mult" else "Add"
        combined = parts[0]
        for j, part in enumerate(parts[1:], start=1):
            last = j == partitions - 1
            combined = body.op(combine, combined, part, output="embedding" if last else None)
    return _function("QRGather", f"{operation}{partitions}", ["ids", "radices", *weights], body,
                     attributes=("operation", "partitions"))


def pruned_gather() -> FunctionProto:
    """PEP's packed rows: a row's kept values lie at ``values[offsets[id]:offsets[id + 1]]`` in
    column order, and bit ``j % 8`` of byte ``j // 8`` of ``mask_bits[id]`` says whether column
    ``j`` was kept; dropped columns are zero. The bits are unpacked in int64 arithmetic,
    ``(byte // 2**k) mod 2`` for k = 0..7: exact for every byte, and ``Div`` and ``Mod`` on int64
    have CUDA kernels where the bitwise ops do not."""
    body = Body("p")
    bits = body.op("Cast", body.lookup("mask_bits", "ids"), to=TensorProto.INT64)  # [N, B]
    places = body.const([1 << k for k in range(8)])
    shifted = body.op("Div", body.op("Unsqueeze", bits, body.const([-1])), places)
    flags = body.op("Mod", shifted, body.const(2))  # int64 0/1 [N, B, 8]
    rows = body.op("Shape", "ids")
    columns = body.op("Reshape", flags, body.op("Concat", rows, body.const([-1]), axis=0))
    counts = body.op("Slice", columns, body.const([0]), "dim", body.const([1]))  # [N, D]
    kept = body.op("Cast", counts, to=TensorProto.BOOL)
    rank = body.op("CumSum", counts, body.const(1), exclusive=1)
    starts = body.op("Cast", body.lookup("offsets", "ids"), to=TensorProto.INT64)
    index = body.op("Add", body.op("Unsqueeze", starts, body.const([1])), rank)
    # A dropped column after a row's last kept value may point past the end: clamp, then mask.
    last = body.op("Sub", body.op("Shape", "values"), body.const(1))
    gathered = body.lookup("values", body.op("Min", index, last))
    body.op("Where", kept, gathered, body.const(0.0, np.float32), output="embedding")
    return _function("PrunedGather", "packed", ["ids", "values", "offsets", "mask_bits", "dim"],
                     body)


def pruned_gather_empty() -> FunctionProto:
    """A PEP table with every value pruned: zeros, whatever the id."""
    body = Body("e")
    shape = body.op("Concat", body.op("Shape", "ids"), "dim", axis=0)
    body.op("Expand", body.const(0.0, np.float32), shape, output="embedding")
    return _function("PrunedGather", "empty", ["ids", "values", "offsets", "mask_bits", "dim"],
                     body)


def quantized_gather_int8() -> FunctionProto:
    """Row-wise int8: ``offset[id] + scale[id] * codes[id]``."""
    body = Body("i")
    codes = body.op("Cast", body.lookup("codes", "ids"), to=TensorProto.FLOAT)
    axis = body.const([1])
    scale = body.op("Unsqueeze", body.lookup("scale", "ids"), axis)
    offset = body.op("Unsqueeze", body.lookup("offset", "ids"), axis)
    body.op("Add", offset, body.op("Mul", scale, codes), output="embedding")
    return _function("QuantizedGather", "int8", ["ids", "codes", "scale", "offset"], body,
                     attributes=("kind",))


def quantized_gather_fp16() -> FunctionProto:
    body = Body("f")
    body.op("Cast", body.lookup("weight", "ids"), output="embedding", to=TensorProto.FLOAT)
    return _function("QuantizedGather", "fp16", ["ids", "weight"], body, attributes=("kind",))


def _coordinates(body: Body, dim: str) -> str:
    """int64 [D]: 0, 1, ..., D - 1 for a scalar ``dim``."""
    return body.op("Range", body.const(0), dim, body.const(1))


def lma_gather() -> FunctionProto:
    """Coordinate ``j`` of an id reads ``memory[((a_j s + c_j) mod PRIME) mod |M|]`` with ``s``
    the id's minhash ``j mod K``."""
    body = Body("l")
    signature = body.op("Cast", body.lookup("signatures", "ids"), to=TensorProto.INT64)  # [N, K]
    dim = _length(body, "coefficients")
    minhashes = _length(body, "signatures", axis=1)
    which = body.op("Mod", _coordinates(body, dim), minhashes)
    minhash = body.op("Gather", signature, which, axis=1)  # [N, D]
    a = body.op("Gather", "coefficients", body.const(0), axis=1)
    c = body.op("Gather", "coefficients", body.const(1), axis=1)
    hashed = body.op("Mod", body.op("Add", body.op("Mul", minhash, a), c), body.const(PRIME))
    locations = body.op("Mod", hashed, body.op("Shape", "memory"))
    body.lookup("memory", locations, output="embedding")
    return _function("LMAGather", "default", ["ids", "memory", "signatures", "coefficients"], body)


def _universal_hashes(body: Body) -> str:
    """int64 [N, H]: ``(a0 d0 + a1 d1 + a2 d2 + c) mod PRIME`` of each id's base-2**21 digits
    ``d`` with each row ``(a0, a1, a2, c)`` of ``coefficients`` [H, 4] (``robe.block_hashes``)."""
    base = body.const(DIGIT_BASE)
    axis = body.const([1])
    digit0 = body.op("Unsqueeze", body.op("Mod", "ids", base), axis)  # [N, 1]
    digit1 = body.op("Unsqueeze", body.op("Mod", body.op("Div", "ids", base), base), axis)
    digit2 = body.op("Unsqueeze", body.op("Div", "ids", body.const(DIGIT_BASE * DIGIT_BASE)), axis)
    terms = [
        body.op("Mul", digit, body.op("Gather", "coefficients", body.const(k), axis=1))
        for k, digit in enumerate((digit0, digit1, digit2))
    ]
    constant = body.op("Gather", "coefficients", body.const(3), axis=1)
    total = body.op("Add", body.op("Add", body.op("Add", terms[0], terms[1]), terms[2]), constant)
    return body.op("Mod", total, body.const(PRIME))


def robe_gather() -> FunctionProto:
    """Block ``b`` of an id starts at ``h_b(id) mod |M|`` with ``h_b`` a universal hash of the
    id's base-2**21 digits; coordinate ``j`` reads ``memory[(start_{j // Z} + j mod Z) mod |M|]``.
    The width ``dim`` is an attribute (it is not among the stored tensors)."""
    body = Body("r")
    size = body.op("Shape", "memory")
    starts = body.op("Mod", _universal_hashes(body), size)  # [N, blocks]
    block = body.op("Squeeze", "block", body.const([0]))
    coordinates = _coordinates(body, body.attribute_int("dim"))
    start = body.op("Gather", starts, body.op("Div", coordinates, block), axis=1)  # [N, D]
    locations = body.op("Mod", body.op("Add", start, body.op("Mod", coordinates, block)), size)
    body.lookup("memory", locations, output="embedding")
    return _function("ROBEGather", "default", ["ids", "memory", "coefficients", "block"], body,
                     attributes=("dim",))


def cce_gather() -> FunctionProto:
    """Chunk ``i`` of an id is ``weight0[p * c + i] + weight1[h * c + i]`` with ``p`` its
    pointer ``pointers[id, i]`` and ``h`` the universal hash of chunk ``i`` mod ``k``; the
    chunks are laid side by side. ``c`` and ``k`` come from the shapes of ``pointers`` and
    ``weight0`` (``[k * c, dim / c]``)."""
    body = Body("c")
    chunks = _length(body, "pointers", axis=1)
    rows = body.op("Div", _length(body, "weight0"), chunks)
    chunk = _coordinates(body, chunks)  # [c]
    pointers = body.op("Cast", body.lookup("pointers", "ids"), to=TensorProto.INT64)  # [N, c]
    hashed = body.op("Mod", _universal_hashes(body), rows)  # [N, c]
    part0 = body.lookup("weight0", body.op("Add", body.op("Mul", pointers, chunks), chunk))
    part1 = body.lookup("weight1", body.op("Add", body.op("Mul", hashed, chunks), chunk))
    body.op("Flatten", body.op("Add", part0, part1), output="embedding", axis=1)
    return _function("CCEGather", "default", ["ids", "pointers", "weight0", "weight1",
                                              "coefficients"], body)
