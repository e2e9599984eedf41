"""Limits on a request's raw values, checked while its body is decoded, before anything joins a
batch, the same on every path.

How many JSON values a body holds: parsing builds a Python object per value, so a body of tiny
values (``[0,0,0,...]``) would cost 16 to 26 times its size. Every value of an array or object
but its first follows a comma, so the commas (counted at memory speed, before parsing) bound the
values; a body holding more than a request of the row limit needs is refused (413).

The length of one text value, on the friendly API's rows and columns, v2 JSON and binary BYTES,
ranking's entity ids and context values, values read back from Redis:

A batch turns each categorical column into a fixed-width numpy text array as wide as its longest
value, so one long value would cost its length times the batch's rows and hold up every request
sharing the batch. A ``hex`` column's text may have 16 characters (``keys.MAX_HEX_DIGITS``),
every other column's ``max_value_bytes`` UTF-8 bytes (a setting). Whether a value parses is the
feature transform's call (``models/keys.py``), made once per batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

from ctrserve.models.keys import EXPECTED, MAX_HEX_DIGITS

from .errors import BadRequest, PayloadTooLarge

#: The default of ``ServiceSettings.max_value_bytes``: ids, words and short labels fit.
MAX_VALUE_BYTES = 256


def json_values_bound(max_rows: int, columns: int) -> int:
    """The most JSON values a request of ``max_rows`` rows of ``columns`` columns needs, in any
    protocol's layout, with room for its envelope."""
    return max_rows * (columns + 2) + 1024


def refuse_too_many_values(body: bytes, end: int, max_values: int) -> None:
    """413 when ``body[:end]`` holds ``max_values`` JSON values or more (see above)."""
    if body.count(b",", 0, end) >= max_values:
        raise PayloadTooLarge(f"the body holds more than {max_values:,} JSON values, more than "
                              "a request within the row limit needs")


@dataclass(frozen=True)
class TextLimit:
    """The most UTF-8 bytes a text value of one column may have (characters in a ``hex``
    column: whatever else they are, more than 16 are no hexadecimal id)."""

    kind: str
    limit: int
    #: Text of at most this many characters fits whatever its characters: hot loops test
    #: ``len(text) > short`` before calling ``fits``.
    short: int

    @classmethod
    @cache  # asked per column of every request: built once
    def of(cls, kind: str, max_value_bytes: int) -> TextLimit:
        """The limit of a column of ``kind`` (``int``, ``hex``, ``string``)."""
        if kind == "hex":
            return cls(kind, MAX_HEX_DIGITS, MAX_HEX_DIGITS)
        return cls(kind, max_value_bytes, max_value_bytes // 4)  # 4 bytes a character at most

    def fits(self, text: str) -> bool:
        """Whether ``text`` is within the limit (encoded only when its length in characters
        leaves it open, so never when it is long)."""
        length = len(text)
        if length <= self.short:
            return True
        if length > self.limit:
            return False
        return text.isascii() or len(text.encode(errors="surrogatepass")) <= self.limit

    def error(self, where: str, what: str) -> BadRequest:
        """The error for a value (``what``: as ``keys.shown`` shows it, or its size) past the
        limit."""
        reason = EXPECTED["hex"] if self.kind == "hex" else "the setting max_value_bytes"
        return BadRequest(f"{where}: {what} is longer than {self.limit:,} bytes, the most a "
                          f"value may have here ({reason})")
