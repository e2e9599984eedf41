"""Dynamic batching for one model version.

Requests queue their rows; one loop takes queued rows into a batch of at most
``max_batch_rows``, waiting at most ``max_queue_delay_us`` after the oldest queued row arrived for
more to come, and runs the batch (feature transform once for all its rows, then one session run)
on the model's inference thread while the event loop goes on parsing requests. A request larger
than a batch is split into pieces and reassembled; every request gets exactly its own rows back,
in order. The queue is bounded in rows: beyond ``max_queue_rows`` a request is refused at once,
503 while the rows waiting make it so, 413 when the request alone is larger than the queue.

One batch runs at a time per model: while it runs the queue fills, so the next batch is as large
as the load makes it, with no added wait when the load is light.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from numpy.ma import MaskedArray, getmaskarray

from ctrserve.models.keys import InvalidValueError, shown
from ctrserve.models.schema import RawBatch

from .errors import BadRequest, PayloadTooLarge, QueueFull, RequestTimeout, Unavailable
from .features import Features, ModelTensors, RawColumns
from .metrics import BatchMetrics
from .runtime import ModelRuntime


@dataclass(eq=False)
class _Request:
    rows: int
    future: asyncio.Future
    result: np.ndarray
    pieces_left: int
    cancelled: bool = False


@dataclass(eq=False)
class _Piece:
    request: _Request
    offset: int
    features: Features
    enqueued: float = field(default_factory=time.monotonic)


@dataclass
class BatchStats:
    """Triton-style counters: rows scored, batches run, and how many batches of each size."""

    inference_count: int = 0
    execution_count: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0

    def record(self, rows: int, queue_seconds: float, compute_seconds: float) -> None:
        self.inference_count += rows
        self.execution_count += 1
        self.batch_sizes[rows] = self.batch_sizes.get(rows, 0) + 1
        self.queue_seconds += queue_seconds
        self.compute_seconds += compute_seconds


@dataclass
class BatchingConfig:
    enabled: bool = True
    max_batch_rows: int = 1024
    max_queue_delay_us: int = 500
    max_queue_rows: int = 65536
    timeout_ms: int = 0


class Batcher:
    """Queues rows for one ``ModelRuntime`` and runs them in batches (see the module docstring).

    Create it inside a running event loop; ``close`` drains it.
    """

    def __init__(self, runtime: ModelRuntime, config: BatchingConfig) -> None:
        self.runtime = runtime
        self.config = config
        self.stats = BatchStats()
        transform = runtime.transform
        self.metrics = BatchMetrics(runtime.name, runtime.version,
                                    [e.column.name for e in transform.categorical],
                                    [e.name for e in transform.dense])
        self._vocabulary_columns = np.array([e.mode == "vocab" for e in transform.categorical])
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"infer-{runtime.name}")
        self._queue: deque[_Piece] = deque()
        self._queued_rows = 0
        self._in_flight_rows = 0
        self._arrived = asyncio.Event()
        self._closed = False
        #: Running unbatched requests (batching off), referenced until done.
        self._unbatched: set[asyncio.Task] = set()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def score(self, features: Features) -> np.ndarray:
        """Probabilities (float32 [rows]) for ``features``, in order."""
        if self._closed:
            raise Unavailable(f"model {self.runtime.name} version {self.runtime.version} is "
                              "being unloaded")
        if features.rows == 0:
            return np.zeros(0, np.float32)
        if features.rows > self.config.max_queue_rows:  # it would wait for room forever
            raise PayloadTooLarge(f"{features.rows:,} rows in one request; the queue of model "
                                  f"{self.runtime.name} holds {self.config.max_queue_rows:,}")
        waiting = self._queued_rows + self._in_flight_rows
        if waiting + features.rows > self.config.max_queue_rows:
            raise QueueFull(f"model {self.runtime.name}: {waiting:,} rows are waiting, the queue "
                            f"holds {self.config.max_queue_rows:,}; retry shortly")
        loop = asyncio.get_running_loop()
        step = self.config.max_batch_rows if self.config.enabled else features.rows
        starts = range(0, features.rows, step)
        request = _Request(features.rows, loop.create_future(),
                           np.empty(features.rows, np.float32), len(starts))
        pieces = [_Piece(request, s, features.slice(s, min(s + step, features.rows))
                         if len(starts) > 1 else features) for s in starts]
        if self.config.enabled:
            self._queue.extend(pieces)
            self._queued_rows += features.rows
            self.metrics.queue_rows.set(self._queued_rows)
            self._arrived.set()
        else:
            self._in_flight_rows += features.rows
            task = loop.create_task(self._run_unbatched(pieces))
            self._unbatched.add(task)
            task.add_done_callback(self._unbatched.discard)
        timeout = self.config.timeout_ms / 1000 if self.config.timeout_ms > 0 else None
        try:
            return await asyncio.wait_for(asyncio.shield(request.future), timeout)
        except TimeoutError:
            request.cancelled = True
            raise RequestTimeout(f"model {self.runtime.name}: no result within "
                                 f"{self.config.timeout_ms} ms") from None

    async def _run_unbatched(self, pieces: list[_Piece]) -> None:
        try:
            for piece in pieces:
                await self._execute([piece])
        finally:
            self._in_flight_rows -= sum(p.features.rows for p in pieces)

    async def _run(self) -> None:
        delay = self.config.max_queue_delay_us / 1e6
        while True:
            if not self._queue:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._queue[0].enqueued + delay
            while self._queued_rows < self.config.max_batch_rows:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            batch = self._take_batch()
            if batch:
                await self._execute(batch)

    def _take_batch(self) -> list[_Piece]:
        batch: list[_Piece] = []
        rows = 0
        while self._queue:
            piece = self._queue[0]
            if piece.request.cancelled:
                self._queue.popleft()
                self._queued_rows -= piece.features.rows
                continue
            if batch and rows + piece.features.rows > self.config.max_batch_rows:
                break
            self._queue.popleft()
            self._queued_rows -= piece.features.rows
            self._in_flight_rows += piece.features.rows
            batch.append(piece)
            rows += piece.features.rows
        self.metrics.queue_rows.set(self._queued_rows)
        return batch

    async def _execute(self, batch: list[_Piece]) -> None:
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        rows = sum(p.features.rows for p in batch)
        try:
            failures, probabilities = await loop.run_in_executor(self._executor, self._compute,
                                                                 batch)
        except Exception as session_error:  # the session failed: every request learns why
            failures, probabilities = {p.request: session_error for p in batch}, None
        finally:
            if self.config.enabled:
                self._in_flight_rows -= rows
        scored = [p for p in batch if p.request not in failures]
        for piece in scored:
            self.metrics.queue.observe(started - piece.enqueued)
        if scored:
            self.stats.record(sum(p.features.rows for p in scored),
                              sum(started - p.enqueued for p in scored) / len(scored),
                              time.monotonic() - started)
        for failure in failures.values():
            if isinstance(failure, BadRequest):
                self.metrics.rejections["bad_value"].inc()
        offset = 0
        for piece in scored:
            assert probabilities is not None  # a piece was scored
            n = piece.features.rows
            piece.request.result[piece.offset:piece.offset + n] = probabilities[offset:offset + n]
            offset += n
            piece.request.pieces_left -= 1
            if piece.request.pieces_left == 0 and not piece.request.future.done():
                piece.request.future.set_result(piece.request.result)
        for request, failure in failures.items():
            if not request.future.done() and not request.cancelled:
                request.future.set_exception(failure)

    def _compute(self, batch: list[_Piece]) -> tuple[dict[_Request, Exception], np.ndarray | None]:
        """On the inference thread: transform the batch's raw rows at once, run the session.

        A raw value the transform rejects fails only the request it came from (with its column
        and its row within that request); the batch is transformed again without it.
        """
        failures: dict[_Request, Exception] = {}
        started = time.perf_counter()
        while True:
            live = [p for p in batch if p.request not in failures]
            if not live:
                return failures, None
            try:
                dense, sparse, dense_missing = self._tensors(live)
                break
            except InvalidValueError as error:
                piece, row = _locate([p for p in live if isinstance(p.features, RawColumns)],
                                      error.row)
                failures[piece.request] = BadRequest(
                    f"column {error.column!r}, row {piece.offset + row}: {shown(error.value)} is "
                    f"not {error.expected}"
                )
        transformed = time.perf_counter()
        probabilities = self.runtime.predict(dense, sparse)
        self.metrics.batch(len(sparse), transformed - started,
                           time.perf_counter() - transformed, probabilities)
        self.metrics.data_quality(sparse, dense_missing, self._vocabulary_columns)
        return failures, probabilities

    def _tensors(self, pieces: list[_Piece]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """dense and sparse for ``pieces`` in order (raw pieces transformed together), and the
        raw pieces' count of missing values per dense column."""
        raw = [p.features for p in pieces if isinstance(p.features, RawColumns)]
        tensors = [p.features for p in pieces if isinstance(p.features, ModelTensors)]
        if not raw:
            return (np.concatenate([f.dense for f in tensors]),
                    np.concatenate([f.sparse for f in tensors]), None)
        batch = RawBatch(
            labels=None,
            dense={name: np.concatenate([f.dense[name] for f in raw]) for name in raw[0].dense},
            categorical={name: _concatenate([f.categorical[name] for f in raw])
                         for name in raw[0].categorical},
        )
        transformed = self.runtime.transform.transform(batch)
        dense_missing = np.array([np.count_nonzero(np.isnan(batch.dense[e.name]))
                                  for e in self.runtime.transform.dense], dtype=np.int64)
        if len(raw) == len(pieces):
            return transformed.dense, transformed.sparse, dense_missing
        dense_parts, sparse_parts, start = [], [], 0
        for piece in pieces:
            if isinstance(piece.features, RawColumns):
                stop = start + piece.features.rows
                dense_parts.append(transformed.dense[start:stop])
                sparse_parts.append(transformed.sparse[start:stop])
                start = stop
            else:
                dense_parts.append(piece.features.dense)
                sparse_parts.append(piece.features.sparse)
        return np.concatenate(dense_parts), np.concatenate(sparse_parts), dense_missing

    async def close(self) -> None:
        """Refuses new requests, lets queued and running batches finish, then stops."""
        self._closed = True
        for _ in range(100_000):
            if not self._queue and self._in_flight_rows == 0:
                break
            await asyncio.sleep(0.005)
        self._loop_task.cancel()
        self._executor.shutdown(wait=True)


def _concatenate(parts: list[np.ndarray]) -> np.ndarray:
    """Column parts of several requests; a mix of int and object parts becomes object, and
    masked int parts (missing values) stay masked."""
    if len(parts) == 1:
        return parts[0]
    if len({p.dtype for p in parts}) > 1:
        return np.concatenate([_as_objects(p) for p in parts])
    if parts[0].dtype != object and any(isinstance(p, MaskedArray) for p in parts):
        # Ids and masks apart: np.ma.concatenate costs ~10x more on many small parts.
        ids, missing = zip(*(_ids_and_missing(p) for p in parts), strict=True)
        return MaskedArray(np.concatenate(ids), mask=np.concatenate(missing))
    return np.concatenate(parts)


def _ids_and_missing(part: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(part, MaskedArray):
        return part.data, getmaskarray(part)
    return part, np.zeros(len(part), dtype=bool)


def _as_objects(part: np.ndarray) -> np.ndarray:
    """``part`` as Python objects, masked values as None."""
    if not isinstance(part, MaskedArray):
        return part.astype(object)
    objects = part.data.astype(object)
    objects[getmaskarray(part)] = None
    return objects


def _locate(pieces: list[_Piece], row: int) -> tuple[_Piece, int]:
    """The piece holding row ``row`` of the pieces' concatenation, and the row within it."""
    for piece in pieces:
        if row < piece.features.rows:
            return piece, row
        row -= piece.features.rows
    raise IndexError(row)
