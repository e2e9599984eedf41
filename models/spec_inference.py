"""A column spec proposed from a sample of a CSV or Parquet file (``ctrserve spec infer``, and
``ctrserve train`` without ``--spec``).

Each column is judged on the first ``sample_rows`` rows, and the reason is kept:

- the label: the column named by ``label``, else the first one named like a label
  (``LABEL_NAMES``, any case); without a ``threshold`` its values must be clicks (0/1 or -1/1),
  with one, values at or above it are positive (a rating of 4 or more, say);
- a column with no value in the sample is ignored;
- numbers: categorical ``int`` when they are integers and either the column is named like an id
  (``user``, ``item_id``, ``movieId``...) or it has at most ``MAX_LEVELS`` distinct values (a
  gender code, an hour, an age band); otherwise dense;
- text: categorical, ``hex`` when every value is 6 to 16 hexadecimal digits, all of one length,
  with letters and digits (hashed values as Criteo writes them), else ``string``;
- a text or id column with a distinct value in every one of at least ``ROW_ID_ROWS`` sampled rows
  names the row, not a feature, and is ignored.

A CSV file must have a header line; its delimiter is sniffed from the first lines. The rules
are a proposal: the spec is printed with its reasons and written out, to be edited and passed
back with ``--spec``.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from .schema import CategoricalColumn, CategoricalKind, DatasetSpec, LabelRule

#: Column names taken for the label, in order of preference (compared in lower case).
LABEL_NAMES = ("label", "click", "clicked", "is_click", "clk", "y", "target", "conversion",
               "converted")
#: Integer columns with at most this many distinct values in the sample are categorical.
MAX_LEVELS = 100
#: Words that make an integer column an id, when its name ends with one.
ID_WORDS = frozenset({"id", "ids", "uid", "iid", "key", "user", "item", "userid", "itemid"})
#: A column distinct in every row is a row id only when the sample has at least this many rows.
ROW_ID_ROWS = 100
DELIMITERS = ",\t;|"
_SNIFF_BYTES = 1 << 16
_HEX = r"^[0-9a-fA-F]{6,16}$"


@dataclass(frozen=True)
class InferredSpec:
    """A proposed spec, the reason for each column's role, and the rows it was judged on."""

    spec: DatasetSpec
    reasons: dict[str, str]
    sample_rows: int

    def describe(self) -> str:
        """One line per column: its role and why."""
        width = max(len(name) for name in self.reasons)
        return "\n".join(f"  {name.ljust(width)}  {reason}"
                         for name, reason in self.reasons.items())


def infer_spec(path: str | Path, fmt: str, label: str | None = None,
               threshold: float | None = None, sample_rows: int = 100_000) -> InferredSpec:
    """Proposes the spec of ``path`` (``fmt``: ``csv`` or ``parquet``); see the module doc."""
    if fmt == "csv":
        delimiter = sniff_delimiter(path)
        table = _csv_sample(path, delimiter, sample_rows)
    elif fmt == "parquet":
        delimiter = ","
        table = _parquet_sample(path, sample_rows)
    else:
        raise ValueError(f"specs are inferred for csv and parquet files, not {fmt!r}")
    if table.num_rows == 0:
        raise ValueError(f"{path} has no data rows to infer a spec from")
    label_column = _label_column(table, label, path)
    reasons = {label_column: _check_label(table.column(label_column), label_column, threshold)}
    dense: list[str] = []
    categorical: list[CategoricalColumn] = []
    ignore: list[str] = []
    for name in table.column_names:
        if name == label_column:
            continue
        kind, reason = _judge(name, table.column(name).combine_chunks(), table.num_rows)
        if kind == "dense":
            dense.append(name)
        elif kind == "ignored":
            ignore.append(name)
        else:
            categorical.append(CategoricalColumn(name, kind))
        role = kind if kind in ("dense", "ignored") else f"categorical {kind}"
        reasons[name] = f"{role}: {reason}"
    spec = DatasetSpec(label=LabelRule(label_column, threshold), dense=tuple(dense),
                       categorical=tuple(categorical), format=fmt, delimiter=delimiter,
                       header=True, ignore=tuple(ignore))
    return InferredSpec(spec, reasons, table.num_rows)


def sniff_delimiter(path: str | Path) -> str:
    """The delimiter of a CSV file, one of ``DELIMITERS``, from its first lines (``,`` when
    the sniffer cannot tell, e.g. a file of one column)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as file:
        sample = file.read(_SNIFF_BYTES)
    try:
        return csv.Sniffer().sniff(sample, delimiters=DELIMITERS).delimiter
    except csv.Error:
        return ","


def _csv_sample(path: str | Path, delimiter: str, rows: int) -> pa.Table:
    """The first ``rows`` rows, every column as text (missing: null)."""
    with open(path, encoding="utf-8", errors="replace", newline="") as file:
        header = next(csv.reader(file, delimiter=delimiter), [])
    numbers = [name for name in header if _is_number(name)]
    if numbers:
        raise ValueError(f"{path}: the first line holds {numbers[0]!r}, not a column name: a "
                         "CSV file needs a header line naming its columns")
    reader = pcsv.open_csv(
        path, parse_options=pcsv.ParseOptions(delimiter=delimiter),
        convert_options=pcsv.ConvertOptions(column_types=dict.fromkeys(header, pa.string()),
                                            strings_can_be_null=True, null_values=[""]))
    batches, count = [], 0
    for batch in reader:
        batches.append(batch)
        count += batch.num_rows
        if count >= rows:
            break
    return pa.Table.from_batches(batches, schema=reader.schema).slice(0, rows)


def _parquet_sample(path: str | Path, rows: int) -> pa.Table:
    file = pq.ParquetFile(path)
    first = next(file.iter_batches(batch_size=rows), None)
    return pa.Table.from_batches([first] if first is not None else [],
                                 schema=file.schema_arrow)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _label_column(table: pa.Table, label: str | None, path: str | Path) -> str:
    if label is not None:
        if label not in table.column_names:
            raise ValueError(f"{path} has no column {label!r}; its columns: "
                             f"{', '.join(table.column_names)}")
        return label
    lowered = {name.lower(): name for name in reversed(table.column_names)}
    for candidate in LABEL_NAMES:
        if candidate in lowered:
            return lowered[candidate]
    raise ValueError(f"{path}: no column is named like a label ({', '.join(LABEL_NAMES)}); "
                     "pass --label COLUMN (and --label-threshold X where values of X and above "
                     "are positive, e.g. ratings)")


def _check_label(values: pa.ChunkedArray, name: str, threshold: float | None) -> str:
    numbers = _numbers(values.combine_chunks())
    if numbers is None:
        raise ValueError(f"label column {name!r} holds values that are not numbers")
    present = numbers[~np.isnan(numbers)]
    if threshold is not None:
        positive = float(np.mean(present >= threshold)) if len(present) else 0.0
        return f"label: {threshold:g} and above positive ({positive:.1%} of the sample)"
    others = np.unique(present[~np.isin(present, (-1.0, 0.0, 1.0))])
    if len(others):
        shown = ", ".join(f"{value:g}" for value in others[:5])
        raise ValueError(f"label column {name!r} holds values other than 0/1 ({shown}): pass "
                         "--label-threshold X (values of X and above are positive)")
    return f"label: clicks ({float(np.mean(present > 0)):.1%} positive in the sample)"


def _numbers(values: pa.Array) -> np.ndarray | None:
    """float64 values (NaN where missing), or None when a present value is not a number."""
    if pa.types.is_boolean(values.type):
        values = pc.cast(values, pa.int8())
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        text = values if pa.types.is_string(values.type) else pc.cast(values, pa.string())
        try:
            values = pc.cast(text, pa.float64())
        except pa.ArrowInvalid:
            return None
    numbers = pc.cast(values, pa.float64()).to_numpy(zero_copy_only=False)
    present = numbers[~np.isnan(numbers)]
    return numbers if np.isfinite(present).all() else None


def _judge(name: str, values: pa.Array,
           rows: int) -> tuple[CategoricalKind | Literal["dense", "ignored"], str]:
    """A column's role (``dense``, ``ignored``, or the kind of a categorical column) and why."""
    present = values.drop_null() if values.null_count else values
    if len(present) == 0:
        return "ignored", "no value in the sample"
    numbers = _numbers(present)
    distinct = len(pc.unique(present))
    every_row = distinct == rows >= ROW_ID_ROWS
    if numbers is not None:
        integers = bool(np.all(numbers == np.round(numbers)) and np.all(np.abs(numbers) < 2**63))
        if _named_like_id(name):
            if every_row:
                return "ignored", f"named like an id and distinct in each of {rows:,} rows"
            if integers:
                return "int", f"integers named like an id, {_values(distinct)}"
            return "string", f"named like an id, {_values(distinct)}"
        if integers and distinct <= MAX_LEVELS:
            return "int", f"integers with {_values(distinct)} (≤ {MAX_LEVELS})"
        return "dense", (f"integers with {_values(distinct)}" if integers
                         else f"numbers, {_values(distinct)}")
    if every_row:
        return "ignored", f"text distinct in each of {rows:,} rows: names the row"
    text = present if pa.types.is_string(present.type) else pc.cast(present, pa.string())
    if _looks_hex(text):
        return "hex", f"hexadecimal text, {_values(distinct)}"
    return "string", f"text, {_values(distinct)}"


def _values(count: int) -> str:
    return f"{count:,} value" + ("" if count == 1 else "s")


def _named_like_id(name: str) -> bool:
    """``user``, ``item_id``, ``movieId``, ``AdID``: the last word of the name is an id word or
    ends with "id"."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1 \2", name)
    words = re.split(r"[^0-9a-zA-Z]+", spaced.strip())
    last = words[-1].lower() if words and words[-1] else name.lower()
    return last in ID_WORDS or last.endswith("id")


def _looks_hex(text: pa.Array) -> bool:
    if not pc.all(pc.match_substring_regex(text, _HEX)).as_py():
        return False
    lengths = pc.utf8_length(text)
    letters = pc.any(pc.match_substring_regex(text, "[a-fA-F]")).as_py()
    digits = pc.any(pc.match_substring_regex(text, "[0-9]")).as_py()
    return bool(pc.min(lengths).as_py() == pc.max(lengths).as_py() and letters and digits)
