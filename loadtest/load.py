"""The load generator: an asyncio HTTP client on uvloop (``rawhttp.py``'s minimal keep-alive
client, or aiohttp's), closed or open loop.

- Closed loop: ``concurrency`` clients, each sending its next request as soon as the previous
  answer arrived. Latency is from send to the end of the answer.
- Open loop: requests at Poisson arrival times for a target rate, sent at their scheduled time
  whatever the server is doing (every request has its own connection when needed). Latency is
  from each request's *scheduled* send time to the end of its answer, so a server (or a
  generator) that falls behind cannot hide the queueing: no coordinated omission. A request that
  would exceed ``max_in_flight`` is not sent and counts as an error (``backlog``).

Only requests scheduled (open) or sent (closed) inside the measurement window, after
``warmup`` seconds, are counted; each of them is awaited to its end, so ``sent == ok + errors``.
In the open loop the achieved rate is the answers
over the time from the window's start to the last answer (an overloaded server answers long after
the window). Errors are counted by kind: ``http_<status>``, ``timeout``, ``connection``,
``backlog``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field

import aiohttp
import numpy as np

from .payloads import Body
from .rawhttp import Client, HTTPError

#: ``raw``: the minimal keep-alive client of ``rawhttp.py`` (the default: cheapest per request);
#: ``aiohttp``: aiohttp's client session.
CLIENTS = ("raw", "aiohttp")

PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "p99.9": 99.9}


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
    latency_ms: dict[str, float] = field(default_factory=dict)
    send_lag_ms: dict[str, float] = field(default_factory=dict)
    client_cpu: float = 0.0  # cores the generator process used during the window
    extra: dict = field(default_factory=dict)

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_dict(self) -> dict:
        return {"mode": self.mode, "url": self.url, "rows": self.rows,
                "duration_s": self.duration_s, "concurrency": self.concurrency,
                "offered_rate": self.offered_rate, "sent": self.sent, "ok": self.ok,
                "errors": dict(self.errors), "req_per_s": self.req_per_s,
                "rows_per_s": self.rows_per_s, "latency_ms": self.latency_ms,
                "send_lag_ms": self.send_lag_ms, "client_cpu": self.client_cpu, **self.extra}


def percentiles(values_s: np.ndarray) -> dict[str, float]:
    """Latency summary in milliseconds (p50, p90, p99, p99.9, mean, max)."""
    if len(values_s) == 0:
        return {}
    ms = np.asarray(values_s) * 1e3
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
async def sender(client: str, base_url: str,
                 timeout_s: float) -> AsyncIterator[Callable[[Body], Awaitable[str | None]]]:
    """``send(body)``: None when answered 200, else the error kind."""
    if client == "aiohttp":
        async with _session(timeout_s) as session:
            async def send(body: Body) -> str | None:
                try:
                    async with session.post(base_url + body.path, data=body.data,
                                            headers=body.headers) as answer:
                        await answer.read()
                        return None if answer.status == 200 else f"http_{answer.status}"
                except TimeoutError:
                    return "timeout"
                except (aiohttp.ClientError, OSError):
                    return "connection"
            yield send
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
    kinds: Counter[str] = Counter()
    rows_ok = 0
    async with sender(client, base_url, timeout_s) as send:
        begin = time.perf_counter()
        window_start = begin + warmup_s
        window_end = window_start + duration_s
        cpu_marks: list[float] = []

        async def client(index: int) -> None:
            nonlocal rows_ok
            k = index
            while True:
                started = time.perf_counter()
                if started >= window_end:
                    return
                body = bodies[k % len(bodies)]
                k += concurrency
                error = await send(body)
                if started >= window_start:
                    if error is None:
                        latencies.append(time.perf_counter() - started)
                        rows_ok += body.rows
                    else:
                        kinds[error] += 1

        async def cpu_marker() -> None:
            await asyncio.sleep(max(0.0, window_start - time.perf_counter()))
            cpu_marks.append(time.process_time())

        marker = asyncio.ensure_future(cpu_marker())
        await asyncio.gather(*(client(i) for i in range(concurrency)))
        await marker
        finished = time.perf_counter()
        client_cpu = (time.process_time() - cpu_marks[0]) / max(1e-9, finished - window_start)
    ok = len(latencies)
    result = LoadResult("closed", base_url, float(np.mean([b.rows for b in bodies])),
                        duration_s, concurrency=concurrency, sent=ok + sum(kinds.values()),
                        ok=ok, errors=dict(kinds), req_per_s=ok / duration_s,
                        rows_per_s=rows_ok / duration_s,
                        latency_ms=percentiles(np.array(latencies)), client_cpu=client_cpu)
    return result


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
    latency = np.full(n, np.nan)
    lag = np.full(n, np.nan)
    done_at = np.full(n, np.nan)
    error_of: list[str | None] = [None] * n
    in_flight = 0
    tasks: list[asyncio.Task] = []
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

        cpu_start = None
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
    errors = Counter(error_of[i] for i in np.flatnonzero(counted) if error_of[i] is not None)
    good = counted & np.array([e is None for e in error_of])
    rows = np.array([bodies[i % len(bodies)].rows for i in range(n)])
    # Achieved rate: answers over the time they took to come back, the window at least (an
    # overloaded server answers the window's requests long after it).
    span = duration_s
    if good.any():
        span = max(duration_s, float(np.nanmax(done_at[good])) - (begin + warmup_s))
    return LoadResult(
        "open", base_url, float(rows[counted].mean()) if counted.any() else 0.0, duration_s,
        offered_rate=rate, sent=int(counted.sum()), ok=int(good.sum()), errors=dict(errors),
        req_per_s=float(good.sum()) / span, rows_per_s=float(rows[good].sum()) / span,
        latency_ms=percentiles(latency[good]),
        send_lag_ms=percentiles(lag[counted & ~np.isnan(lag)]), client_cpu=client_cpu,
    )


def run(coroutine_factory: Callable[[], Coroutine]):
    """Runs a load coroutine on a fresh uvloop event loop (asyncio's own where uvloop is
    absent)."""
    try:
        import uvloop

        factory = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coroutine_factory())
