"""Raw categorical values -> unsigned 64-bit keys, and the seeded integer hash used everywhere.

Every categorical value, whatever its column's kind, first becomes a uint64 key; vocabularies and
hashed id spaces work on keys only. Everything is numpy and gives the same result on every
platform and in every process (no Python ``hash``): training and serving must agree exactly.
What each kind takes (``EXPECTED`` words it for error messages):

- ``int``: integers in int64 range, or their decimal text; the key is the two's complement.
- ``hex``: text of 1-16 hexadecimal digits (Criteo's hashed values), or a non-negative integer
  below 2**64 meaning the same number (``1761418852`` is ``"68fd1e64"``); the key is the number.
- ``string``: text (integers are written in decimal first); the key is a 64-bit hash of it.

Text holding a control character (U+0000-U+001F, U+007F-U+009F) is no value of any kind: numpy's
text arrays drop trailing NULs, so ``"6\\0"`` would otherwise be read as ``"6"``. Python strings
(object arrays, what readers and the service hand over) are checked whole; a numpy text array
has lost its trailing NULs already and is checked for the rest.
"""

from __future__ import annotations

import re

import numpy as np

#: What each kind of column takes, as error messages word it.
EXPECTED = {
    "int": "an integer in int64 or its decimal text",
    "hex": "hexadecimal text of 1-16 digits or an integer in [0, 2**64)",
    "string": "text without control characters, or an integer",
}
#: The most digits of a hex column's text (64 bits).
MAX_HEX_DIGITS = 16
#: Characters of a text value that an error message shows; the rest is counted, not echoed.
SHOWN_CHARACTERS = 32
_CONTROL_CHARACTER = re.compile("[\x00-\x1f\x7f-\x9f]")
_JSON_TYPES: dict[type, str] = {list: "an array", dict: "an object"}
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)
_HEX_VALUE = np.full(128, 255, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789", dtype=np.uint8)] = np.arange(10)
_HEX_VALUE[np.frombuffer(b"abcdef", dtype=np.uint8)] = np.arange(10, 16)
_HEX_VALUE[np.frombuffer(b"ABCDEF", dtype=np.uint8)] = np.arange(10, 16)


class InvalidValueError(ValueError):
    """A raw value that cannot become a key; names the column and the row within the batch."""

    def __init__(self, column: str, row: int, value: object, expected: str) -> None:
        super().__init__(f"column {column!r}, row {row}: {shown(value)} is not {expected}")
        self.column = column
        self.row = row
        self.value = value
        self.expected = expected


def shown(value: object) -> str:
    """``value`` as an error message shows it: numbers and short text in full, long text as its
    start and its length, anything else by its JSON type only (a list or an object may be nested
    deeper than ``repr`` recurses, and may be as large as the body)."""
    if isinstance(value, np.generic):  # np.str_('x') from a text array: shown as 'x'
        value = value.item()
    if isinstance(value, str):
        if len(value) <= SHOWN_CHARACTERS:
            return repr(value)
        return f"{value[:SHOWN_CHARACTERS]!r}... ({len(value):,} characters)"
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length():,} bits"
    if value is None or isinstance(value, int | float):
        return repr(value)
    return _JSON_TYPES.get(type(value), f"a {type(value).__name__}")


def has_control_character(text: str) -> bool:
    """Whether ``text`` holds a control character (U+0000-U+001F, U+007F-U+009F)."""
    # isprintable() is False for every control character (and for some other text, which the
    # search then clears): one fast pass for the usual, printable value.
    return not text.isprintable() and _CONTROL_CHARACTER.search(text) is not None


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


def _as_text(column: str, kind: str, values: np.ndarray) -> np.ndarray:
    """Values as a numpy 'U' array: text as it is, integers written in decimal (in hexadecimal
    for a ``hex`` column); anything else, and text with a control character, is an error."""
    if values.dtype.kind in "iu":
        return values.astype(str)
    if values.dtype.kind != "U" and not set(map(type, values)) <= {str}:
        values = _integers_written(column, kind, values)
    _check_controls(column, kind, values)
    return values.astype(str, copy=False)


def _integers_written(column: str, kind: str, values: np.ndarray) -> np.ndarray:
    """An object array with its integers as text (hexadecimal in a ``hex`` column, else
    decimal); anything but text and integers is an error."""
    written = values.copy()
    for row, value in enumerate(values):
        if isinstance(value, str):
            continue
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise InvalidValueError(column, row, value, EXPECTED[kind])
        written[row] = _hex_digits(column, row, int(value)) if kind == "hex" else str(value)
    return written


def _check_controls(column: str, kind: str, text: np.ndarray) -> None:
    """No control character in any of ``text`` (Python strings still hold the trailing NULs a
    numpy text array drops); one pass over all of it, row by row only to name a culprit."""
    strings = text.tolist()
    if not has_control_character("".join(strings)):
        return
    for row, value in enumerate(strings):
        if has_control_character(value):
            raise InvalidValueError(column, row, text[row], EXPECTED[kind])


def _hex_digits(column: str, row: int, number: int) -> str:
    """An integer sent to a hex column, as the hexadecimal text of the same number."""
    if not 0 <= number < 2**64:
        raise InvalidValueError(column, row, number, EXPECTED["hex"])
    return format(number, "x")


def _int_keys(column: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        return values.astype(np.int64).view(np.uint64)
    text = _as_text(column, "int", values)
    try:
        return text.astype(np.int64).view(np.uint64)
    except (ValueError, OverflowError):
        for row, value in enumerate(text):
            try:
                np.int64(int(value, 10))
            except (ValueError, OverflowError):
                raise InvalidValueError(column, row, values[row], EXPECTED["int"]) from None
        raise


def _hex_keys(column: str, values: np.ndarray) -> np.ndarray:
    if values.dtype.kind in "iu":
        negative = np.flatnonzero(values < 0)
        if len(negative):
            row = int(negative[0])
            raise InvalidValueError(column, row, values[row], EXPECTED["hex"])
        return values.astype(np.uint64)
    text = _as_text(column, "hex", values)
    codes, lengths = _code_points(text)
    digits = _HEX_VALUE[np.minimum(codes, 127)]
    digits[codes > 127] = 255
    used = np.arange(codes.shape[1])[None, :] < lengths[:, None]
    bad_rows = (lengths > MAX_HEX_DIGITS) | ((digits == 255) & used).any(axis=1)
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        raise InvalidValueError(column, row, values[row], EXPECTED["hex"])
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
    return string_hash(_as_text(column, "string", values))


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
