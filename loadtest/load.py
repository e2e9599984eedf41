"""The load generator: an asyncio HTTP client on uvloop (``rawhttp.py``'s minimal keep-alive
client, or aiohttp's), closed or open loop. Every benchmark and load test of this package sends
its requests through here; locust (``locustfile.py``) is the only other client, an outside
referee.

- Closed loop: ``concurrency`` clients, each sending its next request as soon as the previous
  answer arrived. Latency is from send to the end of the answer.
- Open loop: requests at Poisson arrival times for a target rate, sent at their scheduled time
  whatever the server is doing (every request has its own connection when needed). Latency is
  from each request's *scheduled* send time to the end of its answer, so a server (or a
  generator) that falls behind cannot hide the queueing: no coordinated omission. A request that
  would exceed ``max_in_flight`` is not sent and counts as an error (``backlog``).

Only requests scheduled (open) or sent (closed) inside the measurement window, after
``warmup`` seconds, are counted; each of them is awaited to its end, so ``sent == ok + errors``.
In the open loop the achieved rate is the answers over the time from the window's start to the
last answer (an overloaded server answers long after the window). Errors are counted by kind:
``http_<status>``, ``timeout``, ``connection``, ``backlog``; the latencies of answered errors
(a 503 refusal, say) are summarised per kind too.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import aiohttp
import numpy as np

from .payloads import Body
from .rawhttp import Client, HTTPError

#: ``raw``: the minimal keep-alive client of ``rawhttp.py`` (the default: cheapest per request);
#: ``aiohttp``: aiohttp's client session.
CLIENTS = ("raw", "aiohttp")

PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p99.9": 99.9}

#: ``send(body)``: None when answered 200, else the error kind.
Send = Callable[[Body], Awaitable[str | None]]
Result = TypeVar("Result")


@dataclass
class LoadResult:
    mode: str  # "closed" or "open"
    url: str
    rows: float  # rows per request (mean, for mixed sizes)
    duration_s: float
    concurrency: int | None = None
    offered_rate: float | None = None  # requests/s scheduled (open loop)
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    req_per_s: float = 0.0
    rows_per_s: float = 0.0
    latency_ms: dict[str, float] = field(default_factory=dict)  # answers with 200
    #: Per error kind, the latency of the requests that ended with it (none for ``backlog``).
    error_latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    send_lag_ms: dict[str, float] = field(default_factory=dict)
    client_cpu: float = 0.0  # cores the generator process used during the window

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentiles(values_s: Sequence[float] | np.ndarray) -> dict[str, float]:
    """Latency summary in milliseconds (p50, p90, p99, p99.9, mean, max)."""
    if len(values_s) == 0:
        return {}
    ms = np.asarray(values_s, dtype=np.float64) * 1e3
    summary = {name: float(np.percentile(ms, q)) for name, q in PERCENTILES.items()}
    summary["mean"] = float(ms.mean())
    summary["max"] = float(ms.max())
    return summary


def _session(timeout_s: float) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, force_close=False, enable_cleanup_closed=False,
                                     keepalive_timeout=120)
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
        total=timeout_s), skip_auto_headers=("User-Agent",), auto_decompress=False)


@contextlib.asynccontextmanager
async def sender(client: str, base_url: str, timeout_s: float) -> AsyncIterator[Send]:
    """``send(body)`` over the chosen client (one of ``CLIENTS``), its connections closed on
    the way out."""
    if client == "aiohttp":
        async with _session(timeout_s) as session:
            async def send_aiohttp(body: Body) -> str | None:
                try:
                    async with session.post(base_url + body.path, data=body.data,
                                            headers=body.headers) as answer:
                        await answer.read()
                        return None if answer.status == 200 else f"http_{answer.status}"
                except TimeoutError:
                    return "timeout"
                except (aiohttp.ClientError, OSError):
                    return "connection"
            yield send_aiohttp
        return
    if client != "raw":
        raise ValueError(f"unknown client {client!r}; expected one of {', '.join(CLIENTS)}")
    raw = Client(base_url, timeout_s)

    async def send_raw(body: Body) -> str | None:
        try:
            status = await raw.post(body)
        except TimeoutError:
            return "timeout"
        except (HTTPError, OSError):
            return "connection"
        return None if status == 200 else f"http_{status}"
    try:
        yield send_raw
    finally:
        raw.close()


async def closed_loop(base_url: str, bodies: Sequence[Body], concurrency: int,
                      duration_s: float, warmup_s: float = 1.0,
                      timeout_s: float = 30.0, client: str = "raw") -> LoadResult:
    latencies: list[float] = []
    error_latencies: dict[str, list[float]] = {}
    rows_ok = 0
    async with sender(client, base_url, timeout_s) as send:
        window_start = time.perf_counter() + warmup_s
        window_end = window_start + duration_s
        cpu_at_window_start: list[float] = []

        async def user(first: int) -> None:
            nonlocal rows_ok
            k = first
            while True:
                started = time.perf_counter()
                if started >= window_end:
                    return
                body = bodies[k % len(bodies)]
                k += concurrency
                error = await send(body)
                if started < window_start:
                    continue
                elapsed = time.perf_counter() - started
                if error is None:
                    latencies.append(elapsed)
                    rows_ok += body.rows
                else:
                    error_latencies.setdefault(error, []).append(elapsed)

        async def cpu_marker() -> None:
            await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
            cpu_at_window_start.append(time.process_time())

        marker = asyncio.ensure_future(cpu_marker())
        await asyncio.gather(*(user(i) for i in range(concurrency)))
        await marker
        finished = time.perf_counter()
        client_cpu = ((time.process_time() - cpu_at_window_start[0])
                      / max(1e-9, finished - window_start))
    ok = len(latencies)
    errors = {kind: len(values) for kind, values in error_latencies.items()}
    return LoadResult(
        "closed", base_url, float(np.mean([b.rows for b in bodies])), duration_s,
        concurrency=concurrency, sent=ok + sum(errors.values()), ok=ok, errors=errors,
        req_per_s=ok / duration_s, rows_per_s=rows_ok / duration_s,
        latency_ms=percentiles(latencies),
        error_latency_ms={kind: percentiles(v) for kind, v in error_latencies.items()},
        client_cpu=client_cpu)


def poisson_schedule(rate: float, seconds: float, seed: int = 0) -> np.ndarray:
    """Arrival offsets (s) of a Poisson process at ``rate`` per second within ``seconds``."""
    rng = np.random.default_rng(seed)
    expected = int(rate * seconds)
    gaps = rng.exponential(1.0 / rate, size=expected + 10 * int(np.sqrt(expected) + 10))
    times = np.cumsum(gaps)
    while times[-1] < seconds:  # practically never
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, 1000))])
    return times[times < seconds]


async def open_loop(base_url: str, bodies: Sequence[Body], rate: float, duration_s: float,
                    warmup_s: float = 1.0, timeout_s: float = 30.0, max_in_flight: int = 4096,
                    seed: int = 0, client: str = "raw") -> LoadResult:
    schedule = poisson_schedule(rate, warmup_s + duration_s, seed)
    n = len(schedule)
    latency = np.full(n, np.nan)  # from the scheduled send to the end of the answer
    lag = np.full(n, np.nan)  # from the scheduled send to the actual one
    done_at = np.full(n, np.nan)
    error_of: list[str | None] = [None] * n
    in_flight = 0
    tasks: list[asyncio.Future[None]] = []
    async with sender(client, base_url, timeout_s) as send:
        begin = time.perf_counter()
        due = begin + schedule

        async def one(index: int) -> None:
            nonlocal in_flight
            lag[index] = time.perf_counter() - due[index]
            try:
                error_of[index] = await send(bodies[index % len(bodies)])
            finally:
                in_flight -= 1
            done_at[index] = time.perf_counter()
            latency[index] = done_at[index] - due[index]

        cpu_start: tuple[float, float] | None = None  # (process time, wall time)
        index = 0
        while index < n:
            now = time.perf_counter()
            if cpu_start is None and now >= begin + warmup_s:
                cpu_start = (time.process_time(), now)
            while index < n and due[index] <= now:
                if in_flight >= max_in_flight:
                    error_of[index] = "backlog"
                else:
                    in_flight += 1
                    tasks.append(asyncio.ensure_future(one(index)))
                index += 1
            if index < n:
                await asyncio.sleep(max(0.0, due[index] - time.perf_counter()))
        await asyncio.gather(*tasks)
        finished = time.perf_counter()
        if cpu_start is None:
            cpu_start = (time.process_time(), finished)
        client_cpu = (time.process_time() - cpu_start[0]) / max(1e-9, finished - cpu_start[1])
    counted = schedule >= warmup_s
    good = counted & np.array([e is None for e in error_of])
    errors: dict[str, int] = {}
    error_latencies: dict[str, list[float]] = {}
    for i in np.flatnonzero(counted):
        kind = error_of[i]
        if kind is None:
            continue
        errors[kind] = errors.get(kind, 0) + 1
        if not np.isnan(latency[i]):  # sent (not a backlog refusal)
            error_latencies.setdefault(kind, []).append(float(latency[i]))
    rows = np.array([bodies[i % len(bodies)].rows for i in range(n)])
    # Achieved rate: answers over the time they took to come back, the window at least (an
    # overloaded server answers the window's requests long after it).
    span = duration_s
    if good.any():
        span = max(duration_s, float(np.nanmax(done_at[good])) - (begin + warmup_s))
    return LoadResult(
        "open", base_url, float(rows[counted].mean()) if counted.any() else 0.0, duration_s,
        offered_rate=rate, sent=int(counted.sum()), ok=int(good.sum()), errors=errors,
        req_per_s=float(good.sum()) / span, rows_per_s=float(rows[good].sum()) / span,
        latency_ms=percentiles(latency[good]),
        error_latency_ms={kind: percentiles(v) for kind, v in error_latencies.items()},
        send_lag_ms=percentiles(lag[counted & ~np.isnan(lag)]), client_cpu=client_cpu,
    )


def run(load: Coroutine[Any, Any, Result]) -> Result:
    """Runs a load coroutine (``closed_loop(...)``, ``open_loop(...)``) to its end on a fresh
    uvloop event loop (asyncio's own where uvloop is absent: it is not built for Windows)."""
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(load)
