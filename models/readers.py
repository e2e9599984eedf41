"""Streaming readers: data files to :class:`RawBatch` chunks, and train/valid/test splits.

Text formats (``criteo``, ``avazu``, ``libfm``, ``csv``) go through pyarrow's streaming CSV
reader with every column read as a string, so a bad value never stops the parser: numbers are
converted chunk by chunk, and a row that fails is either reported (file and line) or skipped.
Parquet goes through ``ParquetFile.iter_batches``. No reader holds more than a few blocks.

Line numbers: the CSV reader runs single-threaded because only then does pyarrow pass the line
number of a row with the wrong field count to the invalid-row handler, and with
``ignore_empty_lines=False`` that number is the physical 1-based line, header included. Blank
lines then come back as all-null rows, which are dropped without counting as errors. A row of a
chunk is mapped back to its line by counting the rows handed out before it and the lines the
parser rejected before it (:class:`_LineMap`).
"""

from __future__ import annotations

import bisect
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from .schema import CategoricalColumn, DatasetSpec, LabelRule, RawBatch

#: Bytes the CSV reader parses at a time; also the longest line it accepts.
_BLOCK_BYTES = 2 << 20
#: How many skipped line numbers :class:`ReadStats` keeps.
_MAX_SKIPPED_LINES = 10
TEXT_FORMATS = ("criteo", "avazu", "libfm", "csv")
FORMATS = (*TEXT_FORMATS, "parquet")
SPLIT_MODES = ("position", "random")

_AVAZU_COLUMNS = (
    "hour", "C1", "banner_pos", "site_id", "site_domain", "site_category", "app_id",
    "app_domain", "app_category", "device_id", "device_ip", "device_model", "device_type",
    "device_conn_type", "C14", "C15", "C16", "C17", "C18", "C19", "C20", "C21",
)


class MalformedRowError(ValueError):
    """A row that does not fit its spec.

    ``line`` is the 1-based line in the file, header included (for parquet: the 1-based row).
    """

    def __init__(self, path: str | Path, line: int, reason: str, unit: str = "line") -> None:
        super().__init__(f"{path}, {unit} {line}: {reason}")
        self.path = str(path)
        self.line = line
        self.reason = reason
        self.unit = unit

    def __reduce__(self) -> tuple:
        return type(self), (self.path, self.line, self.reason, self.unit)


@dataclass
class ReadStats:
    """What :func:`iter_batches` read: rows handed out and malformed rows skipped."""

    rows_read: int = 0
    rows_skipped: int = 0
    #: Lines (parquet: rows) of the first skipped rows, in file order.
    first_skipped_lines: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class FileRange:
    """A piece of a file a reader can start at (``shards.py`` cuts them): bytes ``start`` to
    ``end`` of a text file, whole lines, the first of them line ``first_line``; or row groups
    ``start`` to ``end`` of a Parquet file, the first of their rows row ``first_line``."""

    start: int
    end: int
    first_line: int


# --------------------------------------------------------------------------- specs


def criteo_spec() -> DatasetSpec:
    """Criteo Kaggle / Terabyte TSV: label, I1..I13 (integers), C1..C26 (hex hashes)."""
    return DatasetSpec(
        label=LabelRule("label"),
        dense=tuple(f"I{i}" for i in range(1, 14)),
        categorical=tuple(CategoricalColumn(f"C{i}", "hex") for i in range(1, 27)),
        format="criteo",
        delimiter="\t",
        header=False,
    )


def avazu_spec() -> DatasetSpec:
    """Avazu CSV with header; ``id`` overflows int64 and only names the row, so it is ignored."""
    return DatasetSpec(
        label=LabelRule("click"),
        categorical=tuple(CategoricalColumn(name, "string") for name in _AVAZU_COLUMNS),
        format="avazu",
        delimiter=",",
        header=True,
        ignore=("id",),
    )


def libfm_spec(n_fields: int) -> DatasetSpec:
    """libFM ``label idx:val ...``: the k-th ``idx:val`` of a row is field ``f{k}``, value idx."""
    if n_fields < 1:
        raise ValueError(f"a libfm file needs at least one field, got {n_fields}")
    return DatasetSpec(
        label=LabelRule("label"),
        categorical=tuple(CategoricalColumn(f"f{k}", "int") for k in range(1, n_fields + 1)),
        format="libfm",
        delimiter=" ",
        header=False,
    )


def spec_for(path: str | Path, fmt: str, spec_path: str | Path | None = None) -> DatasetSpec:
    """The spec of a file in format ``fmt``.

    Criteo files with 39 fields (Kaggle ``test.txt``) and Avazu files without a ``click``
    column get a spec with no label. ``csv`` and ``parquet`` need a DatasetSpec JSON file;
    its ``format`` is replaced by ``fmt``. A file that does not fit ``fmt`` is a ValueError
    that says which format its content looks like (:func:`sniff_format`).
    """
    if fmt == "criteo":
        n_fields = len(_first_line(path).split("\t"))
        labeled = criteo_spec()
        if n_fields == 1 + len(labeled.column_names):
            return labeled
        if n_fields == len(labeled.column_names):
            return replace(labeled, label=None)
        raise ValueError(f"{path}: a criteo line has 39 or 40 tab-separated fields, the first "
                         f"has {n_fields}{_format_hint(path, fmt)}")
    if fmt == "avazu":
        header = _first_line(path).split(",")
        missing = [name for name in _AVAZU_COLUMNS if name not in header]
        if missing:
            raise ValueError(f"{path}: an avazu header names {', '.join(_AVAZU_COLUMNS)}; this "
                             f"one lacks {', '.join(missing[:3])}{_format_hint(path, fmt)}")
        spec = avazu_spec()
        return spec if "click" in header else replace(spec, label=None)
    if fmt == "libfm":
        tokens = _first_line(path).split(" ")
        if len(tokens) < 2 or not all(_LIBFM_TOKEN.fullmatch(token) for token in tokens[1:]):
            raise ValueError(f"{path}: a libfm line is a label and space-separated idx:val "
                             f"tokens{_format_hint(path, fmt)}")
        return libfm_spec(len(tokens) - 1)
    if fmt in ("csv", "parquet"):
        if spec_path is None:
            raise ValueError(f"{path}: format {fmt!r} needs a column spec: pass --spec "
                             "SPEC.json, or leave it out to have one inferred (`ctrserve spec "
                             "infer FILE` shows what would be)")
        return replace(DatasetSpec.load(spec_path), format=fmt)
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


_LIBFM_TOKEN = re.compile(r"\d+:[^:\s]+")


def sniff_format(path: str | Path) -> tuple[str, str]:
    """The format ``path``'s content shows, and the evidence, in words.

    Parquet by its magic bytes; then by the first line: ``libfm`` when every field after the
    first is an ``idx:val`` token, ``criteo`` for 39 or 40 tab-separated fields, ``avazu`` for a
    comma-separated header naming Avazu's columns; anything else is ``csv``.
    """
    with open(path, "rb") as file:
        if file.read(4) == b"PAR1":
            return "parquet", "Parquet magic bytes"
    line = _first_line(path)
    tokens = line.split()
    if len(tokens) > 1 and all(_LIBFM_TOKEN.fullmatch(token) for token in tokens[1:]):
        return "libfm", f"a label and {len(tokens) - 1} idx:val tokens a line"
    fields = line.split("\t")
    if len(fields) in (39, 40):
        return "criteo", f"{len(fields)} tab-separated fields a line"
    if set(_AVAZU_COLUMNS) <= set(line.split(",")):
        return "avazu", "a header with Avazu's columns"
    return "csv", "none of the fixed formats"


def _format_hint(path: str | Path, fmt: str) -> str:
    """``'; it looks like libfm (...): pass --format libfm'``, or '' when it looks like ``fmt``."""
    sniffed, evidence = sniff_format(path)
    if sniffed == fmt:
        return ""
    return f"; it looks like {sniffed} ({evidence}): pass --format {sniffed}"


def _first_line(path: str | Path) -> str:
    with open(path, encoding="utf-8", errors="replace", newline="") as file:
        for line in file:
            if line.strip("\r\n"):
                return line.rstrip("\r\n")
    raise ValueError(f"{path} has no data")


# --------------------------------------------------------------------------- reading


def iter_batches(
    path: str | Path,
    spec: DatasetSpec,
    batch_rows: int = 65536,
    on_error: str = "raise",
    *,
    stats: ReadStats | None = None,
    file_range: FileRange | None = None,
) -> Iterator[RawBatch]:
    """Stream ``path`` (only ``file_range`` of it, when given) as RawBatch chunks of at most
    ``batch_rows`` rows, in file order.

    ``on_error="raise"`` raises :class:`MalformedRowError` at the first malformed row (wrong
    field count, unparseable number or libfm token, missing label or one outside the label
    rule); ``on_error="skip"`` drops such rows and counts them in ``stats``. Blank lines are
    ignored.
    """
    if spec.format not in FORMATS:
        raise ValueError(f"unknown format {spec.format!r}; expected one of {', '.join(FORMATS)}")
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be positive, got {batch_rows}")
    stats = ReadStats() if stats is None else stats
    is_text = spec.format != "parquet"
    if is_text:
        source, offset = _text_source(path, spec, file_range)
        lines = _LineMap(first_row_line=(2 if spec.header else 1) + offset, offset=offset)
        tables = _rechunk(_text_batches(source, spec, lines), batch_rows)
    else:
        groups = None if file_range is None else range(file_range.start, file_range.end)
        lines = _LineMap(first_row_line=1 if file_range is None else file_range.first_line)
        tables = _parquet_tables(path, spec, batch_rows, groups)
    report = _Reporter(path, "line" if is_text else "row", on_error, stats)

    for table in tables:
        batch, problems = _convert(table, spec)
        drop = _blank_rows(table) if is_text else np.zeros(table.num_rows, dtype=bool)
        bad = np.zeros(table.num_rows, dtype=bool)
        for problem in problems:
            bad |= problem.rows
        bad &= ~drop
        bad_rows = np.flatnonzero(bad)
        failures = [
            (lines.line_of(row), _describe(table, problems, row))
            for row in bad_rows[: report.lines_wanted()]
        ]
        rejected = lines.advance(table.num_rows)
        report(sorted(failures + rejected), len(bad_rows) + len(rejected))
        drop |= bad
        if drop.any():
            batch = batch.take(~drop)
        stats.rows_read += len(batch)
        if len(batch):
            yield batch
    rejected = lines.advance(None)
    report(rejected, len(rejected))


def count_rows(path: str | Path, spec: DatasetSpec, file_range: FileRange | None = None) -> int:
    """Number of data rows (of ``file_range`` only, when given), streaming (parquet: from the
    metadata).

    Counts the non-blank lines with the right number of fields; rows that fail later checks
    (a bad number, a missing label) are counted, so this can exceed what a skipping read yields.
    """
    if spec.format == "parquet":
        metadata = pq.ParquetFile(path).metadata
        if file_range is None:
            return metadata.num_rows
        return sum(metadata.row_group(group).num_rows
                   for group in range(file_range.start, file_range.end))
    first = _used_columns(spec)[:1]
    source, _ = _text_source(path, spec, file_range)
    reader = pcsv.open_csv(
        source,
        read_options=_read_options(spec, use_threads=True),
        parse_options=_parse_options(spec, lambda row: "skip", ignore_empty_lines=True),
        convert_options=_convert_options(first),
    )
    return sum(batch.num_rows for batch in reader)


class _LineMap:
    """Line numbers of the rows the CSV reader hands out, in order.

    Every row the parser returns is one line; between them are the lines it rejected (wrong
    field count), which the invalid-row handler records here, in file order, as it parses. The
    parser numbers the lines it reads; ``offset`` turns them into the file's (``_text_source``).
    """

    def __init__(self, first_row_line: int, offset: int = 0) -> None:
        #: Line of the last row handed out (the header's line, or 0).
        self.last = first_row_line - 1
        self.offset = offset
        #: (line, reason) of rejected lines after ``last``.
        self.rejected: list[tuple[int, str]] = []

    def reject(self, row: pcsv.InvalidRow) -> str:
        reason = f"expected {row.expected_columns} fields, found {row.actual_columns}"
        self.rejected.append((row.number + self.offset, reason))
        return "skip"

    def line_of(self, row: int) -> int:
        """Line of the ``row``-th (0-based) row after the last one handed out."""
        line = self.last + row + 1
        for rejected_line, _ in self.rejected:
            if rejected_line > line:
                break
            line += 1
        return line

    def advance(self, rows: int | None) -> list[tuple[int, str]]:
        """Hand out ``rows`` more rows (None: all the rest); the lines rejected among them."""
        if rows is None:
            passed, self.rejected = self.rejected, []
            return passed
        end = self.line_of(rows - 1)
        cut = bisect.bisect_right(self.rejected, end, key=lambda item: item[0])
        passed, self.rejected = self.rejected[:cut], self.rejected[cut:]
        self.last = end
        return passed


@dataclass
class _Reporter:
    """Raises on, or counts, the malformed rows of each chunk."""

    path: str | Path
    unit: str
    on_error: str
    stats: ReadStats

    def lines_wanted(self) -> int:
        """How many of a chunk's first malformed rows need a line number."""
        if self.on_error == "raise":
            return 1
        return _MAX_SKIPPED_LINES - len(self.stats.first_skipped_lines)

    def __call__(self, first_failures: list[tuple[int, str]], count: int) -> None:
        """``first_failures``: (line, reason) of at least the first wanted failures, sorted."""
        if not count:
            return
        if self.on_error == "raise":
            line, reason = first_failures[0]
            raise MalformedRowError(self.path, line, reason, self.unit)
        self.stats.rows_skipped += count
        wanted = self.lines_wanted()
        self.stats.first_skipped_lines.extend(line for line, _ in first_failures[:wanted])


def _used_columns(spec: DatasetSpec) -> list[str]:
    label = [] if spec.label is None else [spec.label.column]
    return [*label, *spec.column_names]


def _read_options(spec: DatasetSpec, use_threads: bool) -> pcsv.ReadOptions:
    if spec.header:
        return pcsv.ReadOptions(use_threads=use_threads, block_size=_BLOCK_BYTES)
    if spec.ignore:
        raise ValueError(
            "a spec without header cannot ignore columns: the columns of a headerless file "
            "are the label, the dense and the categorical columns, in that order"
        )
    return pcsv.ReadOptions(
        use_threads=use_threads, block_size=_BLOCK_BYTES, column_names=_used_columns(spec)
    )


def _parse_options(
    spec: DatasetSpec, handler: Callable[[pcsv.InvalidRow], str], ignore_empty_lines: bool
) -> pcsv.ParseOptions:
    return pcsv.ParseOptions(
        delimiter=spec.delimiter,
        # Only generic CSV has quoting; the fixed formats have none.
        quote_char='"' if spec.format == "csv" else False,
        ignore_empty_lines=ignore_empty_lines,
        invalid_row_handler=handler,
    )


def _convert_options(columns: list[str]) -> pcsv.ConvertOptions:
    return pcsv.ConvertOptions(
        include_columns=columns,
        column_types=dict.fromkeys(columns, pa.string()),
        strings_can_be_null=True,
        null_values=[""],
    )


def _text_source(path: str | Path, spec: DatasetSpec, file_range: FileRange | None
                 ) -> tuple[str | Path | pa.BufferReader, int]:
    """What the CSV reader parses for ``file_range`` (None: the whole file), and what turns the
    line numbers it reports into the file's. A range past the start is read into memory behind
    the header line (which names the columns), when the format has one."""
    if file_range is None:
        return path, 0
    with open(path, "rb") as file:
        header = file.readline() if spec.header and file_range.start > 0 else b""
        file.seek(file_range.start)
        text = file.read(file_range.end - file_range.start)
    return pa.BufferReader(header + text), file_range.first_line - 1 - (1 if header else 0)


def _text_batches(source: str | Path | pa.BufferReader, spec: DatasetSpec,
                  lines: _LineMap) -> Iterator[pa.RecordBatch]:
    columns = _used_columns(spec)
    yield from pcsv.open_csv(
        source,
        read_options=_read_options(spec, use_threads=False),
        parse_options=_parse_options(spec, lines.reject, ignore_empty_lines=False),
        convert_options=_convert_options(columns),
    )


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.Table]:
    """Regroup the reader's block-sized batches into tables of ``rows`` rows (the last: fewer)."""
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in batches:
        pending.append(batch)
        count += batch.num_rows
        while count >= rows:
            table = pa.Table.from_batches(pending)
            yield table.slice(0, rows)
            rest = table.slice(rows)
            pending, count = rest.to_batches(), rest.num_rows
    if count:
        yield pa.Table.from_batches(pending)


def _parquet_tables(path: str | Path, spec: DatasetSpec, rows: int,
                    groups: range | None = None) -> Iterator[pa.Table]:
    """Tables of ``rows`` rows of the row ``groups`` (None: all of them)."""
    batches = pq.ParquetFile(path).iter_batches(batch_size=rows, row_groups=groups,
                                                columns=_used_columns(spec))
    for batch in batches:
        if batch.num_rows:
            yield pa.Table.from_batches([batch])


# --------------------------------------------------------------------------- conversion


@dataclass
class _Problem:
    column: str
    reason: str
    rows: np.ndarray  # bool mask over the chunk


def _convert(table: pa.Table, spec: DatasetSpec) -> tuple[RawBatch, list[_Problem]]:
    """Columns of a chunk as numpy, and the rows whose values do not parse."""
    problems: list[_Problem] = []
    labels = None
    if spec.label is not None:
        labels = _labels(_column(table, spec.label.column), spec.label, problems)
    dense = {}
    for name in spec.dense:
        dense[name], failed = _to_float(_column(table, name))
        if failed.any():
            problems.append(_Problem(name, "not a number", failed))
    categorical = {}
    for column in spec.categorical:
        values = _column(table, column.name)
        if spec.format == "libfm":
            categorical[column.name] = _libfm_index(values, column.name, problems)
        else:
            categorical[column.name] = _categorical(values, column.kind)
    return RawBatch(labels=labels, dense=dense, categorical=categorical), problems


def _column(table: pa.Table, name: str) -> pa.Array:
    return table.column(name).combine_chunks()


def _labels(values: pa.Array, rule: LabelRule, problems: list[_Problem]) -> np.ndarray:
    raw, failed = _to_float(values)
    missing = np.isnan(raw) & ~failed
    if rule.threshold is None:
        # Without a threshold only click labels make sense; e.g. a 1-5 rating needs one.
        outside = ~np.isin(raw, (-1.0, 0.0, 1.0)) & ~np.isnan(raw)
        reason = "label must be -1, 0 or 1 (a LabelRule threshold allows other values)"
        positive = raw > 0
    else:
        outside = np.isinf(raw)
        reason = "label must be finite"
        positive = raw >= rule.threshold
    for rows, why in ((failed, "not a number"), (missing, "missing label"), (outside, reason)):
        if rows.any():
            problems.append(_Problem(rule.column, why, rows))
    return positive.astype(np.float32)


def _to_float(values: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """float64 values with NaN for missing and failed entries, and the mask of failed ones."""
    parsed, failed = _cast_locating(values, pa.float64())
    return parsed.to_numpy(zero_copy_only=False, writable=True), failed


def _cast_locating(values: pa.Array, to: pa.DataType) -> tuple[pa.Array, np.ndarray]:
    """Cast ``values``; entries that do not cast become null and are flagged in the mask.

    The whole array is cast at once. Only when that fails are the bad entries found, by
    bisection, which costs a few casts per bad entry.
    """
    failed = np.zeros(len(values), dtype=bool)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return pc.cast(values, to, safe=False), failed  # numbers (parquet): nothing to parse
    try:
        return pc.cast(values, to), failed
    except pa.ArrowInvalid:
        _flag_failures(values, to, 0, failed)
    kept = pc.if_else(pa.array(failed), pa.scalar(None, values.type), values)
    return pc.cast(kept, to), failed


def _flag_failures(values: pa.Array, to: pa.DataType, offset: int, failed: np.ndarray) -> None:
    try:
        pc.cast(values, to)
    except pa.ArrowInvalid:
        if len(values) == 1:
            failed[offset] = True
            return
        half = len(values) // 2
        _flag_failures(values.slice(0, half), to, offset, failed)
        _flag_failures(values.slice(half), to, offset + half, failed)


def _categorical(values: pa.Array, kind: str) -> np.ndarray:
    """int64 for an ``int`` column, uint64 for a ``hex`` column stored as integers (the numbers
    themselves, as the transform reads integers there), a masked array where values are missing;
    else object str / None. Integers never go through Python objects: that is 50x slower at
    scale."""
    hex_numbers = kind == "hex" and pa.types.is_integer(values.type)
    if kind == "int" or hex_numbers:
        try:
            ints = pc.cast(values, pa.uint64() if hex_numbers else pa.int64())
        except pa.ArrowInvalid:
            ints = None  # not all integers: hand the text to the transform, which reports it
        if ints is not None:
            data = pc.fill_null(ints, 0).to_numpy(zero_copy_only=False, writable=True)
            if ints.null_count == 0:
                return data
            return np.ma.MaskedArray(data, mask=ints.is_null().to_numpy(zero_copy_only=False))
    text = values if pa.types.is_string(values.type) else pc.cast(values, pa.string())
    text = pc.if_else(pc.equal(text, ""), pa.scalar(None, pa.string()), text)
    return text.to_numpy(zero_copy_only=False)


def _libfm_index(values: pa.Array, name: str, problems: list[_Problem]) -> np.ndarray:
    """The idx of ``idx:val`` tokens as int64; other tokens are problems."""
    parts = pc.split_pattern(values, ":")
    shaped = pc.fill_null(pc.equal(pc.list_value_length(parts), 2), False)
    pairs = pc.if_else(shaped, parts, pa.scalar(None, parts.type))
    index, index_failed = _cast_locating(pc.list_element(pairs, 0), pa.int64())
    _, value_failed = _cast_locating(pc.list_element(pairs, 1), pa.float64())
    index = pc.fill_null(index, 0).to_numpy(zero_copy_only=False, writable=True)
    bad = ~shaped.to_numpy(zero_copy_only=False) | index_failed | value_failed | (index < 0)
    if bad.any():
        problems.append(_Problem(name, "not an idx:val pair", bad))
    return index


def _blank_rows(table: pa.Table) -> np.ndarray:
    """Rows with every field empty: what the parser makes of a blank line."""
    blank = np.ones(table.num_rows, dtype=bool)
    for column in table.columns:
        if column.null_count == 0:
            return np.zeros(table.num_rows, dtype=bool)
        blank &= column.is_null().to_numpy()
    return blank


def _describe(table: pa.Table, problems: list[_Problem], row: int) -> str:
    for problem in problems:
        if problem.rows[row]:
            value = table.column(problem.column)[row].as_py()
            return f"{problem.reason} in column {problem.column!r}: {value!r}"
    raise AssertionError(f"row {row} has no problem")


# --------------------------------------------------------------------------- splits

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def row_hash(rows: np.ndarray, seed: int) -> np.ndarray:
    """A 63-bit hash of each global row index: ``mix(row * golden + mix(seed)) >> 1``.

    Both steps are bijections of uint64, so distinct rows never tie: ranking rows by it is a
    seeded shuffle that depends on nothing but the index and the seed.
    """
    key = _mix64(np.array([seed % 2**64], dtype=np.uint64))
    return _mix64(rows.astype(np.uint64) * _GOLDEN + key) >> np.uint64(1)


def _check_split(mode: str, fractions: tuple[float, ...], part: int) -> None:
    if mode not in SPLIT_MODES:
        raise ValueError(f"split mode must be one of {', '.join(SPLIT_MODES)}, got {mode!r}")
    if not fractions or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be non-negative and sum to 1, got {fractions}")
    if not 0 <= part < len(fractions):
        raise ValueError(f"split part {part} is not in 0..{len(fractions) - 1}")


def part_sizes(total_rows: int, fractions: tuple[float, ...]) -> np.ndarray:
    """Rows before each boundary between parts: ``round(cumulative fraction * total_rows)``."""
    return np.round(np.cumsum(fractions)[:-1] * total_rows).astype(np.int64)


@functools.lru_cache(maxsize=16)
def _random_edges(total_rows: int, fractions: tuple[float, ...], seed: int) -> np.ndarray:
    """The row hash at which each part after the first begins: exactly ``part_sizes`` rows hash
    below each edge. Needs every row's hash once (8 bytes a row), then only the edges."""
    boundaries = part_sizes(total_rows, fractions)
    edges = np.full(len(boundaries), 2**63, dtype=np.uint64)  # above every 63-bit hash
    edges[boundaries <= 0] = 0
    inside = (boundaries > 0) & (boundaries < total_rows)
    if inside.any():
        hashes = row_hash(np.arange(total_rows, dtype=np.int64), seed)
        hashes.partition(np.unique(boundaries[inside]))
        edges[inside] = hashes[boundaries[inside]]
    return edges


def split_mask(
    start_row: int,
    n: int,
    total_rows: int,
    mode: str,
    fractions: tuple[float, ...],
    part: int,
    seed: int,
) -> np.ndarray:
    """Which of the rows ``start_row .. start_row + n - 1`` (global indices) are in ``part``.

    Each part holds exactly ``part_sizes(total_rows, fractions)`` apart rows. ``position``:
    contiguous ranges in order (rows past ``total_rows`` go to the last part). ``random``: the
    rows ranked by ``row_hash`` with ``seed``, so a row's part depends on nothing but its index,
    the seed, the fractions and ``total_rows``.
    """
    _check_split(mode, fractions, part)
    rows = np.arange(start_row, start_row + n, dtype=np.int64)
    if mode == "position":
        parts = np.searchsorted(part_sizes(total_rows, fractions), rows, side="right")
    else:
        edges = _random_edges(total_rows, tuple(fractions), seed)
        parts = np.searchsorted(edges, row_hash(rows, seed), side="right")
    return parts == part


def iter_split(
    path: str | Path,
    spec: DatasetSpec,
    mode: str,
    fractions: tuple[float, ...],
    part: int,
    seed: int,
    batch_rows: int = 65536,
    on_error: str = "raise",
    stats: ReadStats | None = None,
    total_rows: int | None = None,
) -> Iterator[RawBatch]:
    """The rows of split ``part`` (see :func:`split_mask`), as non-empty chunks.

    A row's global index is its position among the rows :func:`iter_batches` hands out, so
    skipped malformed rows take none. The rows are counted first unless ``total_rows`` is given.
    """
    _check_split(mode, fractions, part)
    if total_rows is None:
        total_rows = count_rows(path, spec)
    start = 0
    for batch in iter_batches(path, spec, batch_rows, on_error, stats=stats):
        mask = split_mask(start, len(batch), total_rows, mode, fractions, part, seed)
        start += len(batch)
        if mask.all():
            yield batch
        elif mask.any():
            yield batch.take(mask)
