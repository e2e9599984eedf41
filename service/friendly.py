"""The friendly JSON body: raw features by column name, as rows or as columns.

    {"rows": [{"I1": 3, "C1": "68fd1e64"}, {"I1": null}]}
    {"columns": {"I1": [3, null], "C1": ["68fd1e64", null]}}

A key left out or ``null`` is a missing value (filled as in training). Dense columns take finite
numbers. A categorical column takes what its kind does (``models/keys.py``): ``int``, integers in
int64 or their decimal text; ``hex``, hexadecimal text of 1-16 digits or an integer in
[0, 2**64) meaning the same number (``1761418852`` is ``"68fd1e64"``); ``string``, text without
control characters, or integers (as their decimal text). Text is limited while decoding
(``raw_values.py``): 16 characters in a hex column, ``max_value_bytes`` UTF-8 bytes in the
others. An unknown column, a value of the wrong type or over its limit, or a malformed body is a
``BadRequest`` naming the column and the row; no value is echoed whole. Values of the right type
that do not parse (``"zz"`` in a hex column, a control character) are found by the feature
transform, which runs once per batch; the batcher then fails only the request they came from.
"""

from __future__ import annotations

import math

import numpy as np
import orjson

from ctrserve.models.keys import EXPECTED, shown
from ctrserve.models.transform import FeatureTransform

from .errors import BadRequest, PayloadTooLarge
from .features import RawColumns
from .raw_values import MAX_VALUE_BYTES, TextLimit, json_values_bound, refuse_too_many_values

#: Why a float is no categorical value, when the client may not have meant one.
FLOAT_NOTE = (" (a JSON number with a fraction or an exponent, or an integer past 64 bits, is a "
              "float)")
#: Rows from which an integer column with missing values becomes a masked int64 array. Building
#: one costs ~12 us and the batcher's concatenation ~3 us a part, against ~3 us a value on the
#: transform's object path (ints and None), so small requests stay objects.
MASKED_FROM_ROWS = 8


def parse_json(body: bytes, max_values: int | None = None) -> object:
    """The body as JSON; with ``max_values``, a body holding more values is refused (413)
    before it is parsed (``raw_values.refuse_too_many_values``)."""
    if max_values is not None:
        refuse_too_many_values(body, len(body), max_values)
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        raise BadRequest(f"the body is not valid JSON: {error}") from None


def decode_score_request(body: bytes, transform: FeatureTransform, max_rows: int,
                         max_value_bytes: int = MAX_VALUE_BYTES) -> RawColumns:
    payload = parse_json(body, json_values_bound(max_rows, len(transform.column_names)))
    if not isinstance(payload, dict) or len(payload.keys() & {"rows", "columns"}) != 1:
        raise BadRequest('the body must be an object with either "rows" (a list of objects) or '
                         '"columns" (an object of equal-length lists)')
    if "rows" in payload:
        columns, n = _rows_to_columns(payload["rows"], transform, max_rows)
    else:
        columns, n = _check_columns(payload["columns"], transform, max_rows)
    return features_from_columns(columns, n, transform, max_value_bytes)


def encode_score_response(model: str, version: int, probabilities: np.ndarray) -> bytes:
    return orjson.dumps({"model": model, "version": version, "probabilities": probabilities},
                        option=orjson.OPT_SERIALIZE_NUMPY)


def features_from_columns(columns: dict[str, list], n: int, transform: FeatureTransform,
                          max_value_bytes: int = MAX_VALUE_BYTES) -> RawColumns:
    """Raw values by column name (``n`` per column; absent columns are missing) as the
    batcher's raw features, type-checked and text within its limits."""
    return RawColumns(
        n,
        dense={e.name: _dense(e.name, columns.get(e.name), n) for e in transform.dense},
        categorical={
            e.column.name: _categorical(e.column.name, e.column.kind, columns.get(e.column.name),
                                        n, max_value_bytes)
            for e in transform.categorical
        },
    )


def _check_rows(n: int, max_rows: int) -> None:
    if n > max_rows:
        raise PayloadTooLarge(f"{n:,} rows in one request; the limit is {max_rows:,}")


def _rows_to_columns(rows: object, transform: FeatureTransform,
                     max_rows: int) -> tuple[dict[str, list], int]:
    if not isinstance(rows, list):
        raise BadRequest('"rows" must be a list of objects')
    _check_rows(len(rows), max_rows)
    known = transform.column_names
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise BadRequest(f"row {index}: expected an object of column: value, got "
                             f"{type(row).__name__}")
        if not row.keys() <= known:
            unknown = sorted(row.keys() - known)[0]
            raise BadRequest(f"row {index}: unknown column {shown(unknown)}")
    present = set().union(*(row.keys() for row in rows)) if rows else set()
    return {name: [row.get(name) for row in rows] for name in present}, len(rows)


def _check_columns(columns: object, transform: FeatureTransform,
                   max_rows: int) -> tuple[dict[str, list], int]:
    if not isinstance(columns, dict):
        raise BadRequest('"columns" must be an object of column: list of values')
    known = transform.column_names
    lengths = set()
    for name, values in columns.items():
        if name not in known:
            raise BadRequest(f"unknown column {shown(name)}")
        if not isinstance(values, list):
            raise BadRequest(f"column {name!r}: expected a list of values, got {shown(values)}")
        lengths.add(len(values))
    if len(lengths) > 1:
        raise BadRequest(f"columns have different lengths: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    _check_rows(n, max_rows)
    return columns, n


def _dense(name: str, values: list | None, n: int) -> np.ndarray:
    if values is None:
        return np.full(n, np.nan)
    for row, value in enumerate(values):
        kind_of = type(value)
        if kind_of is float:
            if not math.isfinite(value):
                raise BadRequest(f"column {name!r}, row {row}: {value!r} is not a finite number")
        elif kind_of is not int and value is not None:
            raise BadRequest(f"column {name!r}, row {row}: {shown(value)} is not a number")
    return np.array(values, dtype=np.float64)  # None becomes NaN: a missing value


def _categorical(name: str, kind: str, values: list | None, n: int,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> np.ndarray:
    """One raw categorical column: int64 for integer columns, masked where values are missing
    once the request has ``MASKED_FROM_ROWS`` rows, else objects; text within its limit."""
    if values is None:
        if kind == "int" and n >= MASKED_FROM_ROWS:
            return np.ma.masked_all(n, dtype=np.int64)
        return np.full(n, None, dtype=object)
    text_limit = TextLimit.of(kind, max_value_bytes)
    short = text_limit.short
    ints_or_missing = True
    missing = 0
    for row, value in enumerate(values):
        kind_of = type(value)
        if kind_of is int:
            continue
        if value is None:
            missing += 1
            continue
        ints_or_missing = False
        if kind_of is str:
            if len(value) > short and not text_limit.fits(value):
                raise text_limit.error(f"column {name!r}, row {row}", shown(value))
            continue
        note = FLOAT_NOTE if kind_of is float else ""
        raise BadRequest(f"column {name!r}, row {row}: {shown(value)} is not {EXPECTED[kind]}"
                         f"{note}")
    if ints_or_missing and kind == "int":
        try:
            if not missing:
                return np.array(values, dtype=np.int64)
            if n < MASKED_FROM_ROWS:
                return np.array(values, dtype=object)
            is_missing = np.fromiter((v is None for v in values), dtype=bool, count=n)
            ids = np.array([0 if v is None else v for v in values], dtype=np.int64)
            return np.ma.MaskedArray(ids, mask=is_missing)
        except OverflowError:
            pass  # out of int64: the transform reports the row
    array = np.empty(n, dtype=object)
    array[:] = values
    return array
