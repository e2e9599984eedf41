"""The data of a training run spread over processes (``distributed.World``).

- Indexing: the files are cut into pieces and the pieces' rows counted, each piece by one
  process (``shards.py``), so no process reads a whole file and every row gets the index, and
  the part, a single process gives it.
- Vocabulary: every process counts the values of its share of the training rows, rank 0 adds
  the counts up, fits the transform (``min_frequency`` and ``max_vocabulary`` judge the counts
  of all the rows) and sends it to the others with ``broadcast_object_list``. The counts travel
  as objects over the process group rather than through a file rank 0 writes: processes on
  several hosts share no file system.
- Training rows: process ``r`` of ``n`` reads the training rows ``[r t / n, r t / n + t // n)``
  of the ``t`` (``shards.share``): contiguous ranges in file order, all of the same length, so
  every process steps equally many batches; the last ``t mod n < n`` rows are left out of
  training (the vocabulary counts them). LMA's signatures come from the first training rows,
  which rank 0 reads as one process does (``first_training_rows``).
- Validation and test: every process predicts its share of the rows, and rank 0 gathers them in
  row order.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from .data import PARTS, DataConfig
from .distributed import World, from_leader, gather_at_leader, shared_work
from .schema import DatasetSpec, RawBatch
from .shards import (
    FileIndex,
    Part,
    SplitCut,
    count_lines,
    count_piece,
    cut,
    file_ranges,
    piece_bytes,
    share,
)
from .transform import (
    FeatureTransform,
    TransformConfig,
    count_keys,
    fit_transform,
    merge_counts,
    transform_from_counts,
)


def index_file(world: World, path: str, spec: DatasetSpec, on_error: str) -> FileIndex:
    """The index of ``path``, its pieces counted by the processes in turn."""
    spans = cut(path, spec, piece_bytes(os.path.getsize(path), world.size))
    lines = shared_work(world, spans, lambda span: count_lines(path, spec, span))
    pieces = shared_work(world, file_ranges(spans, lines),
                         lambda piece: count_piece(path, spec, on_error, piece))
    return FileIndex(path, spec, on_error, tuple(pieces))


class ShardedData:
    """The parts of ``data`` as this process reads them."""

    def __init__(self, data: DataConfig, world: World) -> None:
        self.world = world
        indexes: dict[str, FileIndex] = {}
        self.parts: dict[str, Part] = {}
        for part in PARTS:
            path, spec, cut_index = data.part_source(part)
            if path not in indexes:
                indexes[path] = index_file(world, path, spec, data.on_error)
            split = None if cut_index is None else SplitCut(data.split, data.fractions,
                                                            cut_index, data.split_seed)
            self.parts[part] = Part(indexes[path], split)
        #: Training rows of each process, and those no process trains on.
        self.train_rows = self.parts["train"].rows // world.size
        self.left_out = self.parts["train"].rows % world.size
        if not self.train_rows:
            raise ValueError(f"{self.parts['train'].rows} training rows cannot be shared among "
                             f"{world.size} processes")

    def my_rows(self, part: str, chunk_rows: int) -> Iterator[RawBatch]:
        """This process's share of ``part`` (all of its rows among the processes together)."""
        low, high = share(self.parts[part].rows, self.world.rank, self.world.size)
        return self.parts[part].batches(low, high, chunk_rows)

    def training_rows(self, chunk_rows: int) -> Iterator[RawBatch]:
        """This process's training rows: as many as every other process's."""
        low, _ = share(self.parts["train"].rows, self.world.rank, self.world.size)
        return self.parts["train"].batches(low, low + self.train_rows, chunk_rows)

    def first_training_rows(self, chunk_rows: int) -> Iterator[RawBatch]:
        """All the training rows in file order, as one process reads them (read as far as the
        caller goes)."""
        return self.parts["train"].batches(0, self.parts["train"].rows, chunk_rows)

    def fit_transform(self, spec: DatasetSpec, config: TransformConfig,
                      chunk_rows: int) -> FeatureTransform:
        """The transform one process would fit on all the training rows (see the module
        docstring)."""
        if config.hash_buckets:
            return fit_transform(spec, [], config)  # hashing needs no rows
        counts = gather_at_leader(self.world, count_keys(spec, self.my_rows("train", chunk_rows)))
        transform = (transform_from_counts(spec, merge_counts(counts), config)
                     if self.world.leads else None)
        fitted = from_leader(transform)
        assert fitted is not None  # the one rank 0 fitted
        return fitted

    def gather_predictions(self, labels: np.ndarray, probabilities: np.ndarray
                           ) -> tuple[np.ndarray, np.ndarray]:
        """Every process's labels and probabilities, in rank order (row order) on rank 0; empty
        arrays elsewhere."""
        gathered = gather_at_leader(self.world, (labels, probabilities))
        if not gathered:
            return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.float32)
        return (np.concatenate([part[0] for part in gathered]),
                np.concatenate([part[1] for part in gathered]))
