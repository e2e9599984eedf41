"""Overload benchmark for ``docs/reliability.md``: offer about twice what the service sustains,
for a bounded time, and count what happens to every request.

1. Capacity: a closed loop of ``--clients`` clients sending ``--rows``-row requests (friendly
   JSON columns) for ``--probe-s`` seconds after ``--warmup`` seconds; the answered rate is the
   sustained capacity.
2. Overload: Poisson arrivals at ``--factor`` x capacity for ``--seconds`` (each request's
   latency is timed from its scheduled send, so queueing cannot hide), while the resident memory
   of the service's process group is sampled every second.
3. Recovery: the closed loop again; its rate and p99 should match step 1.

The service (``servers.ServiceServer``) is pinned to core 0 and the load generator
(``load.py``) to core 1 when there are two. Writes ``overload.json`` to ``--out``:

    python -m ctrserve.loadtest.overload --package runs/demo/repo/demo/1 \\
        --data runs/demo/data/data.parquet --max-concurrency 64 --out docs/reliability
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from . import load
from .load import LoadResult
from .payloads import Body, RowPool
from .servers import ServiceServer

SERVER_CPU = 0
CLIENT_CPU = 1


async def sample_resident_bytes(server: ServiceServer, seconds: float,
                                samples: list[tuple[float, int]]) -> None:
    """Appends (seconds since the start, resident bytes) once a second for ``seconds``."""
    started = time.perf_counter()
    for second in range(math.ceil(seconds)):
        samples.append((time.perf_counter() - started, server.resident_bytes()))
        await asyncio.sleep(max(0.0, started + second + 1 - time.perf_counter()))


async def overload(server: ServiceServer, bodies: list[Body], rate: float, seconds: float,
                   client: str) -> tuple[LoadResult, list[tuple[float, int]]]:
    """Poisson arrivals at ``rate`` for ``seconds``, and the server's RSS meanwhile."""
    samples: list[tuple[float, int]] = []
    sampler = asyncio.ensure_future(sample_resident_bytes(server, seconds, samples))
    result = await load.open_loop(server.url, bodies, rate, seconds, warmup_s=0.0,
                                  client=client)
    await sampler
    return result, samples


def summary(result: LoadResult) -> dict[str, Any]:
    """Requests by outcome (``200`` and the generator's error kinds), and the latency of the
    answered ones and of the refusals (503)."""
    return {"counts": {"200": result.ok, **result.errors},
            "accepted_latency_ms": result.latency_ms,
            "rejected_latency_ms": result.error_latency_ms.get("http_503", {})}


def run(args: argparse.Namespace) -> dict[str, Any]:
    pin = (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {CLIENT_CPU})
    flags = ["--max-queue-rows", str(args.max_queue_rows)]
    if args.max_concurrency:
        flags += ["--max-concurrency", str(args.max_concurrency)]
    bodies = RowPool(args.package, rows=4096, data=args.data).bodies("columns", args.rows, 64)
    with ServiceServer(args.package, flags, SERVER_CPU if pin else None) as server:
        before = load.run(load.closed_loop(server.url, bodies, args.clients, args.probe_s,
                                           args.warmup, client=args.client))
        if before.ok == 0:
            raise RuntimeError(f"the service answered nothing in {args.probe_s} s: "
                               f"{before.errors}\n{server.log()}")
        rate = before.req_per_s * args.factor
        during, rss = load.run(overload(server, bodies, rate, args.seconds, args.client))
        after = load.run(load.closed_loop(server.url, bodies, args.clients, args.probe_s, 0.0,
                                          client=args.client))
    pinning = (f"server on core {SERVER_CPU}, load generator on core {CLIENT_CPU}" if pin
               else "no pinning")
    report = {
        "machine": f"{os.cpu_count()} cores, {pinning}", "client": args.client,
        "rows_per_request": args.rows, "max_queue_rows": args.max_queue_rows,
        "max_concurrency": args.max_concurrency,
        "capacity_req_s": before.req_per_s, "offered_req_s": rate, "factor": args.factor,
        "before": summary(before), "overload": summary(during),
        "after": {**summary(after), "rate": after.req_per_s},
        "rss_mib": [(round(t, 1), round(b / 2**20, 1)) for t, b in rss],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--package", type=Path, default=Path("runs/demo/repo/demo/1"),
                        help="the model package to serve (REPO/MODEL/VERSION)")
    parser.add_argument("--data", type=Path,
                        help="raw rows to send (Parquet); default: synthesised from the "
                             "package's vocabularies")
    parser.add_argument("--rows", type=int, default=64, help="rows per request")
    parser.add_argument("--clients", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--probe-s", type=float, default=15,
                        help="measured seconds of each closed loop")
    parser.add_argument("--warmup", type=float, default=2,
                        help="unmeasured seconds before the capacity probe")
    parser.add_argument("--factor", type=float, default=2.0,
                        help="Poisson rate as a multiple of the capacity")
    parser.add_argument("--seconds", type=float, default=60, help="seconds of overload")
    parser.add_argument("--max-queue-rows", type=int, default=4096)
    parser.add_argument("--max-concurrency", type=int, default=0,
                        help="the service's limit before an immediate 503 (0: none)")
    parser.add_argument("--client", choices=load.CLIENTS, default="raw",
                        help="the generator's HTTP client")
    parser.add_argument("--out", type=Path, default=Path("docs/reliability"))
    report = run(parser.parse_args(argv))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mib"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
