"""Dynamic batching for one model version.

Requests queue their rows; a batch takes queued rows up to ``max_batch_rows`` once that many
wait, or once the oldest queued row has waited ``max_queue_delay_us`` for more to come, and runs
(feature transform once for all its rows, then one session run) on the model's inference thread
while the event loop goes on parsing requests. A request larger than a batch is split into
pieces and reassembled; every request gets exactly its own rows back, in order. The queue is
bounded in rows: beyond ``max_queue_rows`` a request is refused at once, 503 while the rows
waiting make it so, 413 when the request alone is larger than the queue. With batching off each
request runs alone, in arrival order.

One batch runs at a time per model: while it runs the queue fills, so the next batch is as large
as the load makes it, with no added wait when the load is light.

Nothing runs per request beyond queueing its rows and awaiting one future: no task, no timer
(but the optional per-request timeout's). Batches are started from the event loop when rows
arrive, when the oldest row's delay ends (one timer) and when the previous batch ends (the
inference thread hands its result back with one ``call_soon_threadsafe``). A batch of at most
``INLINE_ROWS`` rows runs on the event loop itself, in a callback of its own: handing it to the
inference thread and back cost more CPU than its session run (a single-row request at low load
used 10% less CPU inline, 64 single-row clients got 3% more answers).
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

#: Batches of at most this many rows run on the event loop (see the module docstring): their
#: session run takes a fraction of a millisecond.
INLINE_ROWS = 64


@dataclass(eq=False)
class _Request:
    rows: int
    future: asyncio.Future[np.ndarray]
    pieces_left: int
    #: The probabilities of a request split into pieces, filled piece by piece (None for a
    #: request in one piece: it gets its rows of the batch's output as they are).
    result: np.ndarray | None = None
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

    Create it inside a running event loop, and call it from that loop only; ``close`` drains it.
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
        self._loop = asyncio.get_running_loop()
        self._delay = config.max_queue_delay_us / 1e6 if config.enabled else 0.0
        self._queue: deque[_Piece] = deque()
        self._queued_rows = 0
        self._in_flight_rows = 0
        self._running = False
        #: Wakes the dispatcher when the oldest queued row's delay ends.
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    async def score(self, features: Features) -> np.ndarray:
        """Probabilities (float32 [rows]) for ``features``, in order."""
        if self._closed:
            raise Unavailable(f"model {self.runtime.name} version {self.runtime.version} is "
                              "being unloaded")
        rows = features.rows
        if rows == 0:
            return np.zeros(0, np.float32)
        if rows > self.config.max_queue_rows:  # it would wait for room forever
            raise PayloadTooLarge(f"{rows:,} rows in one request; the queue of model "
                                  f"{self.runtime.name} holds {self.config.max_queue_rows:,}")
        waiting = self._queued_rows + self._in_flight_rows
        if waiting + rows > self.config.max_queue_rows:
            raise QueueFull(f"model {self.runtime.name}: {waiting:,} rows are waiting, the queue "
                            f"holds {self.config.max_queue_rows:,}; retry shortly")
        step = self.config.max_batch_rows if self.config.enabled else rows
        request = _Request(rows, self._loop.create_future(), -(-rows // step))
        if request.pieces_left == 1:
            self._queue.append(_Piece(request, 0, features))
        else:
            request.result = np.empty(rows, np.float32)
            self._queue.extend(_Piece(request, start, features.slice(start, min(start + step,
                                                                                rows)))
                               for start in range(0, rows, step))
        self._queued_rows += rows
        self.metrics.queue_rows.set(self._queued_rows)
        self._dispatch()
        try:
            if self.config.timeout_ms <= 0:
                return await request.future
            async with asyncio.timeout(self.config.timeout_ms / 1000):
                return await request.future
        except TimeoutError:
            request.cancelled = True
            raise RequestTimeout(f"model {self.runtime.name}: no result within "
                                 f"{self.config.timeout_ms} ms") from None
        except asyncio.CancelledError:  # the client left: its queued rows need not run
            request.cancelled = True
            raise

    def _dispatch(self, delay_ended: bool = False) -> None:
        """Starts the next batch if none runs and one is due: a full batch waits, the oldest
        row has waited its delay (at once with batching off), or the batcher is closing; else
        sets the timer for the oldest row's delay."""
        while self._queue and not self._running:
            if not (delay_ended or self._closed
                    or self._queued_rows >= self.config.max_batch_rows):
                left = self._queue[0].enqueued + self._delay - time.monotonic()
                if left > 0:
                    if self._timer is None:
                        self._timer = self._loop.call_later(left, self._delay_ended)
                    return
            batch = self._take_batch()
            if batch:
                self._start(batch)

    def _delay_ended(self) -> None:
        """The timer: the oldest row's delay is over (the loop's timers may fire up to a
        millisecond early: re-checking the clock here would spin until it agrees)."""
        self._timer = None
        self._dispatch(delay_ended=True)

    def _take_batch(self) -> list[_Piece]:
        """The queued pieces of the next batch, in order (one piece with batching off); pieces
        of cancelled requests are dropped."""
        batch: list[_Piece] = []
        rows = 0
        while self._queue:
            piece = self._queue[0]
            if piece.request.cancelled:
                self._queue.popleft()
                self._queued_rows -= piece.features.rows
                continue
            if batch and (rows + piece.features.rows > self.config.max_batch_rows
                          or not self.config.enabled):
                break
            self._queue.popleft()
            self._queued_rows -= piece.features.rows
            batch.append(piece)
            rows += piece.features.rows
        self._in_flight_rows += rows
        self.metrics.queue_rows.set(self._queued_rows)
        return batch

    def _start(self, batch: list[_Piece]) -> None:
        if self._timer is not None:  # it was set for rows that run now
            self._timer.cancel()
            self._timer = None
        self._running = True
        if sum(p.features.rows for p in batch) <= INLINE_ROWS:
            self._loop.call_soon(self._run_inline, batch, time.monotonic())
        else:
            self._executor.submit(self._run_batch, batch, time.monotonic())

    def _run_batch(self, batch: list[_Piece], started: float) -> None:
        """On the inference thread: computes the batch and hands the outcome to the loop."""
        self._loop.call_soon_threadsafe(self._finish, batch, started, *self._outcome(batch))

    def _run_inline(self, batch: list[_Piece], started: float) -> None:
        """On the loop: computes a small batch (``INLINE_ROWS``) and finishes it."""
        self._finish(batch, started, *self._outcome(batch))

    def _outcome(self, batch: list[_Piece]) -> tuple[dict[_Request, Exception],
                                                     np.ndarray | None]:
        try:
            return self._compute(batch)
        except Exception as session_error:  # the session failed: every request learns why
            return {p.request: session_error for p in batch}, None

    def _finish(self, batch: list[_Piece], started: float,
                failures: dict[_Request, Exception], probabilities: np.ndarray | None) -> None:
        """On the loop: each request gets its rows (or its failure); the next batch starts."""
        self._running = False
        self._in_flight_rows -= sum(p.features.rows for p in batch)
        scored = [p for p in batch if p.request not in failures]
        if scored:
            for piece in scored:
                self.metrics.queue.observe(started - piece.enqueued)
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
            request = piece.request
            rows = probabilities[offset:offset + n]
            offset += n
            request.pieces_left -= 1
            if request.result is not None:
                request.result[piece.offset:piece.offset + n] = rows
                rows = request.result
            if request.pieces_left == 0 and not request.future.done():
                request.future.set_result(rows)
        for request, failure in failures.items():
            if not request.future.done():
                request.future.set_exception(failure)
        self._dispatch()

    def _compute(self, batch: list[_Piece]) -> tuple[dict[_Request, Exception], np.ndarray | None]:
        """Transforms the batch's raw rows at once and runs the session (on the inference
        thread, or on the loop for a small batch).

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
        self._dispatch()  # what waits for company runs now
        for _ in range(100_000):
            if not self._queue and not self._running:
                break
            await asyncio.sleep(0.005)
        if self._timer is not None:
            self._timer.cancel()
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
