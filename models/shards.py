"""One process's share of a data part, read without reading the rest of the file.

A file is cut into pieces a reader can start at (``readers.FileRange``): byte ranges of whole
lines for the text formats (``cut``: a few per process, 1 to 64 MiB each), single row groups for
Parquet. Counting each piece's lines (``count_lines``) and then its rows (``count_rows``) gives
every row the global index a single process reading the whole file gives it: the position among
the rows the reader hands out, so a skipped malformed row takes none, and the split's total,
which counts the rows ``readers.count_rows`` counts. The split (``readers.split_mask``) then puts
each row in the part one process would. Training shares the counting out among its processes
(``sharded_data.index_file``); here everything runs in the calling process.

A part's rows, numbered from 0 in file order, are dealt out as contiguous ranges (``share``), and
``Part.batches`` reads only the pieces a range touches. A text file whose quoted fields hold line
breaks cannot be cut by bytes: a piece could start inside such a field.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from .readers import FileRange, ReadStats, count_rows, iter_batches, split_mask
from .schema import DatasetSpec, RawBatch

#: Bounds of a text piece: small files still give each process a few pieces, large ones are not
#: held in memory whole (a reader holds its piece while it parses it).
MIN_PIECE_BYTES = 1 << 20
MAX_PIECE_BYTES = 64 << 20
#: Pieces a process gets when the file is large enough, so that ranges rarely share a piece.
PIECES_PER_PROCESS = 4
#: Rows a chunk of the counting pass holds.
_COUNT_ROWS = 65536
#: Bytes read at a time when counting line breaks.
_SCAN_BYTES = 16 << 20


def piece_bytes(file_bytes: int, processes: int) -> int:
    """The size of the pieces a text file of ``file_bytes`` is cut into for ``processes``."""
    wanted = file_bytes // (PIECES_PER_PROCESS * processes)
    return min(MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, wanted))


def cut(path: str | Path, spec: DatasetSpec, block_bytes: int) -> list[tuple[int, int]]:
    """The pieces of ``path``: ``(start, end)`` byte ranges of whole lines of about
    ``block_bytes`` (each ends just after a line break, the last at the end of the file), or for
    Parquet one ``(group, group + 1)`` per row group."""
    if spec.format == "parquet":
        groups = pq.ParquetFile(path).metadata.num_row_groups
        return [(group, group + 1) for group in range(groups)]
    size = os.path.getsize(path)
    bounds = [0]
    with open(path, "rb") as file:
        for target in range(block_bytes, size, block_bytes):
            if target <= bounds[-1]:
                continue  # the line before ran past this target
            file.seek(target - 1)
            file.readline()  # to just after the first line break at or past target - 1
            if file.tell() < size:
                bounds.append(file.tell())
    return list(zip(bounds, [*bounds[1:], size], strict=True))


def count_lines(path: str | Path, spec: DatasetSpec, span: tuple[int, int]) -> int:
    """What a piece adds to the numbering of lines (Parquet: rows) of the pieces after it:
    its line breaks, or its row group's rows."""
    start, end = span
    if spec.format == "parquet":
        metadata = pq.ParquetFile(path).metadata
        return sum(metadata.row_group(group).num_rows for group in range(start, end))
    breaks = 0
    with open(path, "rb") as file:
        file.seek(start)
        for offset in range(start, end, _SCAN_BYTES):
            breaks += file.read(min(_SCAN_BYTES, end - offset)).count(b"\n")
    return breaks


def file_ranges(spans: list[tuple[int, int]], lines: list[int]) -> list[FileRange]:
    """The pieces with the number of their first line (row), from each piece's ``count_lines``."""
    first_lines = 1 + np.concatenate([[0], np.cumsum(lines[:-1], dtype=np.int64)])
    return [FileRange(start, end, int(first))
            for (start, end), first in zip(spans, first_lines, strict=True)]


@dataclass(frozen=True)
class Piece:
    range: FileRange
    #: Rows the reader hands out from it: they number the rows.
    rows: int
    #: Rows ``readers.count_rows`` counts in it: the pieces' sum is the split's total.
    counted: int


def count_piece(path: str | Path, spec: DatasetSpec, on_error: str,
                file_range: FileRange) -> Piece:
    """Reads a piece to count its rows (a malformed row raises, or is skipped, as in training)."""
    stats = ReadStats()
    for _ in iter_batches(path, spec, _COUNT_ROWS, on_error, stats=stats, file_range=file_range):
        pass
    return Piece(file_range, stats.rows_read, count_rows(path, spec, file_range))


@dataclass(frozen=True)
class FileIndex:
    """Where the rows of a file are: its pieces, with their counts."""

    path: str
    spec: DatasetSpec
    on_error: str
    pieces: tuple[Piece, ...]

    @property
    def total_rows(self) -> int:
        """The rows the split is cut by (``readers.count_rows`` of the whole file)."""
        return sum(piece.counted for piece in self.pieces)

    def first_rows(self) -> np.ndarray:
        """The global index of each piece's first row."""
        rows = np.array([piece.rows for piece in self.pieces], dtype=np.int64)
        return np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64)


def index_file(path: str | Path, spec: DatasetSpec, on_error: str,
               block_bytes: int) -> FileIndex:
    """The index of ``path`` cut into pieces of about ``block_bytes``, every piece counted in
    this process."""
    spans = cut(path, spec, block_bytes)
    ranges = file_ranges(spans, [count_lines(path, spec, span) for span in spans])
    return FileIndex(str(path), spec, on_error,
                     tuple(count_piece(path, spec, on_error, r) for r in ranges))


@dataclass(frozen=True)
class SplitCut:
    """How a part is cut from its file (``readers.split_mask``'s arguments but the rows)."""

    mode: str
    fractions: tuple[float, ...]
    part: int
    seed: int


class Part:
    """The rows of one part of a file: all of them (a part with a file of its own), or those
    ``cut`` puts in it. They are numbered from 0 in file order."""

    def __init__(self, index: FileIndex, cut: SplitCut | None) -> None:
        self.index = index
        self.cut = cut
        self.first_rows = index.first_rows()
        in_piece = [int(self._mask(start, piece.rows).sum())
                    for start, piece in zip(self.first_rows, index.pieces, strict=True)]
        #: Rows of the part before each piece, and in all of them (the last entry).
        self.before = np.concatenate([[0], np.cumsum(in_piece, dtype=np.int64)]).astype(np.int64)

    @property
    def rows(self) -> int:
        return int(self.before[-1])

    def _mask(self, start: int, n: int) -> np.ndarray:
        """Which of the global rows ``start .. start + n - 1`` are in the part."""
        if self.cut is None:
            return np.ones(n, dtype=bool)
        return split_mask(start, n, self.index.total_rows, self.cut.mode, self.cut.fractions,
                          self.cut.part, self.cut.seed)

    def batches(self, low: int, high: int, batch_rows: int) -> Iterator[RawBatch]:
        """The part's rows ``low .. high - 1``, in order, as non-empty chunks of at most
        ``batch_rows``; only the pieces holding them are read."""
        index = self.index
        for number, piece in enumerate(index.pieces):
            if self.before[number + 1] <= low or self.before[number] >= high:
                continue
            row, ordinal = int(self.first_rows[number]), int(self.before[number])
            for batch in iter_batches(index.path, index.spec, batch_rows, index.on_error,
                                      file_range=piece.range):
                mask = self._mask(row, len(batch))
                ordinals = ordinal + np.cumsum(mask) - 1  # of the part's rows among them
                keep = mask & (ordinals >= low) & (ordinals < high)
                row += len(batch)
                ordinal += int(mask.sum())
                if keep.all():
                    yield batch
                elif keep.any():
                    yield batch.take(keep)
                if ordinal >= high:
                    return


def share(rows: int, rank: int, processes: int) -> tuple[int, int]:
    """The range ``[low, high)`` of ``rows`` that process ``rank`` of ``processes`` takes:
    contiguous, in rank order, together all of them, sizes differing by at most one."""
    return rank * rows // processes, (rank + 1) * rows // processes
