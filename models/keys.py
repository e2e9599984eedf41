"""Raw categorical values -> unsigned 64-bit keys, and the seeded integer hash used everywhere.

Every categorical value, whatever its column's kind, first becomes a uint64 key; vocabularies and
hashed id spaces work on keys only. Everything is numpy and gives the same result on every
platform and in every process (no Python ``hash``): training and serving must agree exactly.

- ``int``: integers in int64 range (ints or decimal strings); the key is the two's complement.
- ``hex``: up to 16 hexadecimal digits (Criteo's hashed values); the key is the number.
- ``string``: any text (ints are written in decimal first); the key is a 64-bit hash of it.
"""

from __future__ import annotations

import numpy as np

_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_HEX_VALUE = np.full(128, 255, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10)
_HEX_VALUE[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)


class InvalidValueError(ValueError):
    """A raw value that cannot become a key; names the column and the row within the batch."""

    def __init__(self, column: str, row: int, value: object, expected: str) -> None:
        if isinstance(value, np.generic):  # np.str_('x') from a text array: name it as 'x'
            value = value.item()
        super().__init__(f"column {column!r}, row {row}: {value!r} is not {expected}")
        self.column = column
        self.row = row
        self.value = value
        self.expected = expected


def splitmix64(values: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective, well-mixing map on uint64 (wrapping arithmetic)."""
    z = np.asarray(values, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def seeded_hash(keys: np.ndarray, seed: int) -> np.ndarray:
    """A stable uint64 hash of ``keys`` that depends on ``seed``."""
    seed_mix = splitmix64(np.array([seed], dtype=np.uint64))
    return splitmix64(np.asarray(keys, dtype=np.uint64) ^ seed_mix)


def _missing_mask(values: np.ndarray) -> np.ndarray:
    """None, NaN and the empty string are missing values."""
    if values.dtype.kind == "f":
        return np.isnan(values)
    if values.dtype.kind in "US":
        return values == values.dtype.type()
    if values.dtype != object:
        return np.zeros(len(values), dtype=bool)
    return np.fromiter(
        (v is None or (isinstance(v, str) and not v) or (isinstance(v, float) and v != v)
         for v in values),
        dtype=bool,
        count=len(values),
    )


def _code_points(text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unicode code points [n, width] (zero padded) and the length of each string."""
    if text.dtype.itemsize == 0:
        text = text.astype("U1")
    width = text.dtype.itemsize // 4
    return text.view(np.uint32).reshape(len(text), width), np.char.str_len(text)


def _as_text(column: str, values: np.ndarray, expected: str) -> np.ndarray:
    """Strings as a numpy 'U' array; ints become decimal text; anything else is an error."""
    if values.dtype.kind in "iuU":
        return values.astype(str)
    for row, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (str, int, np.integer)):
            raise InvalidValueError(column, row, value, expected)
    return values.astype(str)


def _int_keys(column: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.int64).view(np.uint64)
    text = _as_text(column, values, "an integer")
    try:
        return text.astype(np.int64).view(np.uint64)
    except (ValueError, OverflowError):
        for row, value in enumerate(text):
            try:
                np.int64(int(value, 10))
            except (ValueError, OverflowError):
                raise InvalidValueError(column, row, values[row], "an integer") from None
        raise


def _hex_keys(column: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.uint64)
    text = _as_text(column, values, "a hexadecimal value")
    codes, lengths = _code_points(text)
    digits = _HEX_VALUE[np.minimum(codes, 127)]
    digits[codes > 127] = 255
    used = np.arange(codes.shape[1])[None, :] < lengths[:, None]
    bad_rows = (lengths > 16) | ((digits == 255) & used).any(axis=1)
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        raise InvalidValueError(column, row, values[row], "a hexadecimal value of 1-16 digits")
    keys = np.zeros(len(text), dtype=np.uint64)
    for position in range(codes.shape[1]):
        active = used[:, position]
        keys[active] = (keys[active] << np.uint64(4)) | digits[active, position].astype(np.uint64)
    return keys


def string_hash(text: np.ndarray) -> np.ndarray:
    """FNV-1a over each string's Unicode code points, then splitmix64 to mix the bits."""
    codes, lengths = _code_points(np.asarray(text, dtype=str))
    state = np.full(len(codes), _FNV_OFFSET, dtype=np.uint64)
    for position in range(codes.shape[1]):
        active = lengths > position
        state[active] = (state[active] ^ codes[active, position].astype(np.uint64)) * _FNV_PRIME
    return splitmix64(state ^ lengths.astype(np.uint64))


def _string_keys(column: str, values: np.ndarray) -> np.ndarray:
    return string_hash(_as_text(column, values, "a string or an integer"))


_CONVERTERS = {"int": _int_keys, "hex": _hex_keys, "string": _string_keys}


def to_keys(column: str, kind: str, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys (uint64, 0 where missing) and the missing mask for one raw categorical column."""
    if np.ndim(values) != 1:
        raise ValueError(f"column {column!r}: expected one value per row")
    if isinstance(values, np.ma.MaskedArray):  # integers with missing values masked
        missing = np.ma.getmaskarray(values)
        values = values.filled(0)
    else:
        values = np.asarray(values)
        missing = _missing_mask(values)
    keys = np.zeros(len(values), dtype=np.uint64)
    if missing.all():
        return keys, missing
    present_rows = np.flatnonzero(~missing)
    try:
        keys[present_rows] = _CONVERTERS[kind](column, values[present_rows])
    except InvalidValueError as error:
        row = int(present_rows[error.row])
        raise InvalidValueError(column, row, values[row], error.expected) from None
    return keys, missing
