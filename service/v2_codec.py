"""Open Inference Protocol v2 (KServe / Triton REST) infer bodies, JSON or with Triton's binary
tensor extension, to ``Features`` and back.

A request body is a JSON object, optionally followed by binary tensor data: the
``Inference-Header-Content-Length`` header gives the JSON's length, and each input with the
parameter ``binary_data_size`` takes that many bytes, in input order, from what follows. Binary
data is little-endian and row-major; a BYTES element is a 4-byte little-endian length and its
bytes. JSON ``data`` may be flat or nested (row-major).

A request carries either the model's own tensors, ``dense`` FP32 [N, n_dense] and ``sparse``
INT64 [N, n_tables] (ids after the feature transform, each within its table's rows), or raw
columns by name, one tensor [N] or [N, 1] each: dense columns FP32, FP64 or INT64 (NaN is a
missing value), categorical columns BYTES (UTF-8 text; the empty string is a missing value).
A BYTES element is the text of its column's kind (``models/keys.py``): an ``int`` column's the
decimal text of an integer in int64, a ``hex`` column's 1-16 hexadecimal digits, a ``string``
column's any text; none may hold a control character. An element longer than its column allows
(16 bytes in a hex column, ``max_value_bytes`` in the others; ``raw_values.py``) is refused while
decoding, a binary one from its length prefix, before it is read. Text stays Python strings until
its batch. A raw column left out is missing in every row. The batcher applies the package's
transform to raw columns, as it does to the friendly API's rows.

The answer is ``probability`` FP32 [N], as JSON ``data`` or, when the requested output's
``binary_data`` (else the request's ``binary_data_output``) says so, as binary data after the
JSON.

JSON ``data`` holds numbers for FP32 and FP64 (integers too), integers for INT64 and strings for
BYTES, flat or nested as the shape, no deeper; an error names the input and never echoes a whole
value.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import orjson

from ctrserve.models.keys import shown
from ctrserve.models.transform import FeatureTransform

from .errors import BadRequest, PayloadTooLarge
from .features import Features, ModelTensors, RawColumns
from .raw_values import MAX_VALUE_BYTES, TextLimit, json_values_bound, refuse_too_many_values

HEADER_LENGTH = "Inference-Header-Content-Length"
OUTPUT = "probability"
#: Numpy's dtype of each fixed-size Triton datatype this service reads (little-endian on the wire).
_NUMPY: dict[str, np.dtype] = {"FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
                               "INT64": np.dtype("<i8")}
#: The Python types JSON data may hold for each datatype: an integer is a valid FP32 value, a
#: float is not a valid INT64 one.
_JSON_TYPES: dict[str, set[type]] = {"FP32": {int, float}, "FP64": {int, float},
                                     "INT64": {int}, "BYTES": {str}}
_TENSORS = {"dense": "FP32", "sparse": "INT64"}
_RAW_DENSE = ("FP32", "FP64", "INT64")
_RAW_CATEGORICAL = ("BYTES",)
_ELEMENT_LENGTH = struct.Struct("<I")


@dataclass(frozen=True)
class ModelSchema:
    """What one model version's v2 requests may carry: its tensors' widths, its tables' rows and
    its raw columns."""

    n_dense: int
    #: The raw categorical column behind each column of ``sparse``.
    tables: tuple[str, ...]
    #: Rows of each table (uint64, so that a negative id, viewed as uint64, is out of range too).
    table_rows: np.ndarray
    dense_columns: tuple[str, ...]
    #: Raw categorical columns and their kind (``int``, ``hex``, ``string``).
    categorical_kinds: dict[str, str]

    @classmethod
    def of(cls, transform: FeatureTransform) -> ModelSchema:
        tables = tuple(e.column.name for e in transform.categorical)
        return cls(transform.n_dense, tables, np.array(transform.table_sizes, dtype=np.uint64),
                   tuple(e.name for e in transform.dense),
                   {e.column.name: e.column.kind for e in transform.categorical})

    def raw_inputs(self) -> list[dict]:
        """The raw columns as v2 tensor metadata, with the datatypes they are usually sent in."""
        return [
            *({"name": name, "datatype": "FP32", "shape": [-1]} for name in self.dense_columns),
            *({"name": name, "datatype": "BYTES", "shape": [-1], "kind": kind}
              for name, kind in self.categorical_kinds.items()),
        ]


@dataclass(frozen=True)
class InferRequest:
    """A decoded request: the rows to score, the id to echo, and how to send the output."""

    features: Features
    request_id: str | None
    binary_output: bool


def decode_infer_request(body: bytes, header_length: str | None, schema: ModelSchema,
                         max_rows: int, max_value_bytes: int = MAX_VALUE_BYTES) -> InferRequest:
    json_end = _json_length(header_length, len(body))
    columns = len(schema.dense_columns) + len(schema.categorical_kinds)
    refuse_too_many_values(body, json_end, json_values_bound(max_rows, columns))
    header = _parse_header(memoryview(body)[:json_end])
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest('"inputs" must be a non-empty list of tensors')
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest('"id" must be a string')
    tensors: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    offset = json_end
    for spec in inputs:
        name, array, n, offset = _input(spec, body, offset, schema, max_value_bytes)
        if name in tensors:
            raise BadRequest(f"input {name!r} is given twice")
        tensors[name], rows[name] = array, n
    if offset != len(body):
        raise BadRequest(f"the body has {len(body) - json_end} bytes after its JSON header; the "
                         f"inputs' binary_data_size add up to {offset - json_end}")
    if len(set(rows.values())) > 1:
        raise BadRequest(f"inputs have different batch sizes: {rows}")
    n = next(iter(rows.values()))
    if n > max_rows:
        raise PayloadTooLarge(f"{n:,} rows in one request; the limit is {max_rows:,}")
    features: Features
    if tensors.keys() & _TENSORS.keys():
        features = _tensor_features(tensors, n, schema)
    else:
        features = _raw_features(tensors, n, schema)
    return InferRequest(features, request_id, _binary_output(header))


def encode_infer_response(model: str, version: int, request_id: str | None,
                          probabilities: np.ndarray, binary: bool) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (the JSON's length when binary data follows)."""
    output: dict = {"name": OUTPUT, "datatype": "FP32", "shape": [len(probabilities)]}
    response: dict = {"model_name": model, "model_version": str(version), "outputs": [output]}
    if request_id is not None:
        response["id"] = request_id
    if not binary:
        output["data"] = probabilities
        return orjson.dumps(response, option=orjson.OPT_SERIALIZE_NUMPY), {}
    output["parameters"] = {"binary_data_size": probabilities.nbytes}
    header = orjson.dumps(response)
    # The batcher's result is a fresh contiguous float32 array: its memory is the payload.
    return b"".join((header, probabilities.data)), {HEADER_LENGTH: str(len(header))}


def _json_length(value: str | None, body_length: int) -> int:
    if value is None:
        return body_length
    try:
        length = int(value)
    except ValueError:
        raise BadRequest(f"{HEADER_LENGTH} must be an integer, got {shown(value)}") from None
    if not 0 < length <= body_length:
        raise BadRequest(f"{HEADER_LENGTH} is {length}, but the body has {body_length} bytes")
    return length


def _parse_header(text: memoryview) -> dict:
    try:
        header = orjson.loads(text)
    except orjson.JSONDecodeError as error:
        # tritonclient and Python's json write a float NaN (a missing dense value) as the bare
        # word NaN, which is not JSON and which orjson refuses; the standard library reads it
        # (and recurses on nesting orjson refused as too deep).
        try:
            header = json.loads(bytes(text))
        except (ValueError, RecursionError):
            raise BadRequest(f"the request header is not valid JSON: {error}") from None
    if not isinstance(header, dict):
        raise BadRequest("the request header must be a JSON object")
    return header


def _input(spec: object, body: bytes, offset: int, schema: ModelSchema,
           max_value_bytes: int) -> tuple[str, np.ndarray, int, int]:
    """One input: its name, its values (flat, or [N, width] for ``dense`` and ``sparse``), its
    rows, and where the next input's binary data starts."""
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise BadRequest("each input must be an object with a string name")
    name = spec["name"]
    datatype, shape = spec.get("datatype"), spec.get("shape")
    accepted, width = _expected(name, schema)
    if datatype not in accepted:
        raise BadRequest(f"input {name!r}: datatype {shown(datatype)} is not accepted "
                         f"(expected {' or '.join(accepted)})")
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        raise BadRequest(f"input {name!r}: shape must be a list of non-negative integers")
    if not (shape and (shape[1:] == [width] if width else shape[1:] in ([], [1]))):
        expected = f"[N, {width}]" if width else "[N] or [N, 1]"
        raise BadRequest(f"input {name!r}: shape {shape}, expected {expected}")
    # BYTES are raw categorical columns' values: text as long as the column allows.
    text_limit = TextLimit.of(schema.categorical_kinds.get(name, "string"), max_value_bytes)
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest(f"input {name!r}: parameters must be an object")
    if "shared_memory_region" in parameters:
        raise BadRequest(f"input {name!r}: shared memory is not supported; send the data in "
                         "the body")
    size = parameters.get("binary_data_size")
    if size is not None:
        if type(size) is not int or size < 0:
            raise BadRequest(f"input {name!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(body):
            raise BadRequest(f"input {name!r}: binary_data_size {size} runs past the end of the "
                             f"body ({len(body) - offset} bytes left): the body is truncated or "
                             f"{HEADER_LENGTH} is wrong")
        values = _from_binary(name, datatype, shape, body, offset, size, text_limit)
        offset += size
    elif "data" in spec:
        values = _from_json(name, datatype, shape, spec["data"], text_limit)
    else:
        raise BadRequest(f"input {name!r} has neither data nor binary_data_size")
    return name, values.reshape(shape[0], width) if width else values, shape[0], offset


def _expected(name: str, schema: ModelSchema) -> tuple[tuple[str, ...], int | None]:
    """The datatypes input ``name`` may have, and its row width (None: a raw column)."""
    if name == "sparse":
        return (_TENSORS[name],), len(schema.tables)
    if name == "dense" and schema.n_dense:
        return (_TENSORS[name],), schema.n_dense
    if name in schema.dense_columns:
        return _RAW_DENSE, None
    if name in schema.categorical_kinds:
        return _RAW_CATEGORICAL, None
    tensors = "'dense' and 'sparse'" if schema.n_dense else "'sparse'"
    raise BadRequest(f"unknown input {shown(name)}: the model takes {tensors}, or raw columns "
                     "by name (see the model's metadata)")


def _from_binary(name: str, datatype: str, shape: list[int], body: bytes, offset: int,
                 size: int, text_limit: TextLimit) -> np.ndarray:
    count = math.prod(shape)
    if datatype == "BYTES":
        return _bytes_elements(name, body, offset, offset + size, count, text_limit)
    dtype = _NUMPY[datatype]
    if size != count * dtype.itemsize:
        raise BadRequest(f"input {name!r}: shape {shape} of {datatype} needs "
                         f"{count * dtype.itemsize} bytes, binary_data_size is {size}")
    return np.frombuffer(body, dtype, count, offset)  # a view of the body: no copy


def _bytes_elements(name: str, body: bytes, start: int, stop: int, count: int,
                    text_limit: TextLimit) -> np.ndarray:
    """A binary BYTES tensor's elements, as text objects; one longer than ``text_limit`` is
    refused before it is decoded."""
    elements: list[str] = []
    offset = start
    for _ in range(count):
        if offset + 4 > stop:
            break
        (length,) = _ELEMENT_LENGTH.unpack_from(body, offset)
        if offset + 4 + length > stop:
            break
        if length > text_limit.limit:
            raise text_limit.error(f"column {name!r}, row {len(elements)}",
                                   f"a value of {length:,} bytes")
        try:
            elements.append(body[offset + 4:offset + 4 + length].decode())
        except UnicodeDecodeError:
            raise BadRequest(f"input {name!r}: element {len(elements)} is not UTF-8 "
                             "text") from None
        offset += 4 + length
    if len(elements) < count:
        raise BadRequest(f"input {name!r}: binary_data_size {stop - start} holds "
                         f"{len(elements)} of its {count} BYTES elements")
    if offset != stop:
        raise BadRequest(f"input {name!r}: {stop - offset} bytes are left after its {count} "
                         "BYTES elements")
    return _objects(elements)


def _from_json(name: str, datatype: str, shape: list[int], data: object,
               text_limit: TextLimit) -> np.ndarray:
    """JSON data as a flat array, its values' types checked before numpy sees them (numpy would
    size a text array by the longest string, whatever the datatype)."""
    elements: list[Any] = data if isinstance(data, list) else [data]
    for width in shape[1:]:  # nested as the shape: one level of equal-length lists at a time
        if not (elements and all(type(e) is list for e in elements)):
            break  # flat from here on
        if any(len(e) != width for e in elements):
            raise BadRequest(f"input {name!r}: data is not a regular nested list")
        elements = list(chain.from_iterable(elements))
    count = math.prod(shape)
    if len(elements) != count:
        raise BadRequest(f"input {name!r}: shape {shape} holds {count} values, data has "
                         f"{len(elements)}")
    types = set(map(type, elements))
    if list in types:
        raise BadRequest(f"input {name!r}: data is not a regular nested list (nested deeper "
                         "than its shape, or ragged)")
    if not types <= _JSON_TYPES[datatype]:
        row = next(i for i, e in enumerate(elements) if type(e) not in _JSON_TYPES[datatype])
        raise BadRequest(f"input {name!r}: data are not all {datatype} values (element {row}: "
                         f"{shown(elements[row])})")
    if datatype == "BYTES":
        short = text_limit.short
        for row, text in enumerate(elements):
            if len(text) > short and not text_limit.fits(text):
                raise text_limit.error(f"column {name!r}, row {row}", shown(text))
        return _objects(elements)
    try:
        return np.array(elements, dtype=_NUMPY[datatype])
    except OverflowError:
        raise BadRequest(f"input {name!r}: data are not all {datatype} values (one is out of "
                         "range)") from None


def _objects(values: list) -> np.ndarray:
    """``values`` as a numpy object array: a request's text stays Python strings, each as long
    as itself, until its batch's transform."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _tensor_features(tensors: dict[str, np.ndarray], n: int,
                     schema: ModelSchema) -> ModelTensors:
    raw = sorted(tensors.keys() - _TENSORS.keys())
    if raw:
        raise BadRequest(f"send either the tensors 'dense' and 'sparse' or raw columns, not "
                         f"both (got {raw[0]!r} too)")
    if "sparse" not in tensors or (schema.n_dense and "dense" not in tensors):
        missing = "sparse" if "sparse" not in tensors else "dense"
        raise BadRequest(f"input {missing!r} is missing")
    sparse = tensors["sparse"]
    outside = sparse.view(np.uint64) >= schema.table_rows  # negative ids are huge as uint64
    if outside.any():
        row, column = (int(i) for i in np.argwhere(outside)[0])
        raise BadRequest(f"input 'sparse', row {row}, column {column} "
                         f"({schema.tables[column]}): id {sparse[row, column]} is outside the "
                         f"table's rows [0, {schema.table_rows[column]})")
    dense = tensors.get("dense", np.zeros((n, 0), np.float32))
    if not np.isfinite(dense).all():
        row, column = (int(i) for i in np.argwhere(~np.isfinite(dense))[0])
        raise BadRequest(f"input 'dense', row {row}, column {column}: {dense[row, column]} is "
                         "not a finite number")
    return ModelTensors(n, dense, sparse)


def _raw_features(tensors: dict[str, np.ndarray], n: int, schema: ModelSchema) -> RawColumns:
    """Raw columns as ``friendly.py`` builds them: every column present, absent ones missing."""
    for name in schema.dense_columns:
        values = tensors.get(name)
        if values is not None and values.dtype.kind == "f" and np.isinf(values).any():
            row = int(np.flatnonzero(np.isinf(values))[0])
            raise BadRequest(f"input {name!r}, row {row}: {values[row]} is not a finite number")
    return RawColumns(
        n,
        dense={name: tensors.get(name, np.full(n, np.nan)) for name in schema.dense_columns},
        categorical={name: tensors.get(name, np.full(n, None, dtype=object))
                     for name in schema.categorical_kinds},
    )


def _binary_output(header: dict) -> bool:
    """Whether ``probability`` goes back as binary data: the requested output's ``binary_data``,
    else the request's ``binary_data_output``, else JSON."""
    parameters = header.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be an object')
    binary = parameters.get("binary_data_output") is True
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list):
        raise BadRequest('"outputs" must be a list')
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if name != OUTPUT:
            raise BadRequest(f"unknown output {shown(name)}: the model's output is "
                             f"{OUTPUT!r}")
        wanted = output.get("parameters") or {}
        if not isinstance(wanted, dict):
            raise BadRequest(f"output {OUTPUT!r}: parameters must be an object")
        unsupported = wanted.keys() & {"classification", "shared_memory_region"}
        if unsupported:
            raise BadRequest(f"output {OUTPUT!r}: {unsupported.pop()} is not supported")
        if "binary_data" in wanted:
            binary = wanted["binary_data"] is True
    return binary
