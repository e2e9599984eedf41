"""Overload benchmark for ``docs/reliability.md``: offer about twice what the service sustains,
for a bounded time, and count what happens to every request.

1. Capacity: a closed loop of ``--clients`` clients sending ``--rows``-row requests for
   ``--probe-s`` seconds; the answered rate is the sustained capacity.
2. Overload: Poisson arrivals at ``--factor`` x capacity for ``--seconds`` (each request's
   latency is timed from its scheduled send, so queueing cannot hide), while the server's RSS is
   sampled every second.
3. Recovery: the closed loop again; its rate and p99 should match step 1.

Server and load generator are pinned to different cores (``taskset``) when there are two.

    python -m ctrserve.loadtest.overload --repo runs/demo/repo --model demo --out docs/reliability
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pyarrow.parquet as pq


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS"))


def _body(data: Path, rows: int) -> bytes:
    table = pq.ParquetFile(data).read_row_group(0).slice(0, rows).drop(["label"])
    columns = {name: [None if v is None or v != v else v for v in table[name].to_pylist()]
               for name in table.column_names}
    return json.dumps({"columns": columns}).encode()


def _percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {}
    values = np.array(latencies) * 1000
    return {f"p{q:g}": float(np.percentile(values, q)) for q in (50, 90, 99, 99.9)}


async def _send(session: aiohttp.ClientSession, url: str, body: bytes,
                outcomes: dict[str, list[float]], scheduled: float) -> None:
    try:
        async with session.post(url, data=body) as response:
            await response.read()
            kind = str(response.status)
    except aiohttp.ClientError as error:
        kind = type(error).__name__
    outcomes.setdefault(kind, []).append(time.perf_counter() - scheduled)


async def closed_loop(url: str, body: bytes, clients: int, seconds: float) -> dict:
    outcomes: dict[str, list[float]] = {}
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client() -> None:
            while time.perf_counter() < deadline:
                await _send(session, url, body, outcomes, time.perf_counter())

        await asyncio.gather(*(client() for _ in range(clients)))
    return {"seconds": seconds, "outcomes": outcomes,
            "rate": len(outcomes.get("200", [])) / seconds}


async def open_loop(url: str, body: bytes, rate: float, seconds: float, pid: int) -> dict:
    outcomes: dict[str, list[float]] = {}
    rss: list[tuple[float, int]] = []
    rng = random.Random(0)
    started = time.perf_counter()
    tasks = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        next_send = started
        next_sample = started
        while next_send - started < seconds:
            now = time.perf_counter()
            if now >= next_sample:
                rss.append((now - started, _rss(pid)))
                next_sample += 1.0
            if now < next_send:
                await asyncio.sleep(min(next_send - now, 0.01))
                continue
            task = asyncio.create_task(_send(session, url, body, outcomes, next_send))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_send += rng.expovariate(rate)
        await asyncio.gather(*tasks)
    return {"seconds": seconds, "offered_rate": rate, "outcomes": outcomes, "rss": rss}


def _summary(result: dict) -> dict:
    outcomes = result["outcomes"]
    return {
        "counts": {kind: len(v) for kind, v in sorted(outcomes.items())},
        "accepted_latency_ms": _percentiles(outcomes.get("200", [])),
        "rejected_latency_ms": _percentiles(outcomes.get("503", [])),
    }


def run(args: argparse.Namespace) -> dict:
    port = _free_port()
    pin_server = ["taskset", "-c", "0"] if (os.cpu_count() or 1) >= 2 else []
    if pin_server:
        os.sched_setaffinity(0, {1})
    command = [*pin_server, sys.executable, "-m", "ctrserve", "serve", "--repo", str(args.repo),
               "--model", args.model, "--port", str(port), "--log-level", "warning",
               "--max-queue-rows", str(args.max_queue_rows)]
    if args.max_concurrency:
        command += ["--max-concurrency", str(args.max_concurrency)]
    server = subprocess.Popen(command)
    url = f"http://127.0.0.1:{port}/v1/models/{args.model}/score"
    try:
        for _ in range(600):
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                time.sleep(0.1)
        time.sleep(2)
        body = _body(args.data, args.rows)
        before = asyncio.run(closed_loop(url, body, args.clients, args.probe_s))
        rate = before["rate"] * args.factor
        overload = asyncio.run(open_loop(url, body, rate, args.seconds, server.pid))
        after = asyncio.run(closed_loop(url, body, args.clients, args.probe_s))
    finally:
        server.terminate()
        server.wait(timeout=60)
    report = {
        "machine": f"{os.cpu_count()} cores, server on core 0, load generator on core 1",
        "rows_per_request": args.rows, "max_queue_rows": args.max_queue_rows,
        "max_concurrency": args.max_concurrency,
        "capacity_req_s": before["rate"], "offered_req_s": rate, "factor": args.factor,
        "before": _summary(before), "overload": _summary(overload),
        "after": {**_summary(after), "rate": after["rate"]},
        "rss_mib": [(round(t, 1), round(b / 2**20, 1)) for t, b in overload["rss"]],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "overload.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, default=Path("runs/demo/repo"))
    parser.add_argument("--model", default="demo")
    parser.add_argument("--data", type=Path, default=Path("runs/demo/data/data.parquet"))
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--probe-s", type=float, default=15)
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--max-queue-rows", type=int, default=4096)
    parser.add_argument("--max-concurrency", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("docs/reliability"))
    report = run(parser.parse_args(argv))
    print(json.dumps({k: v for k, v in report.items() if k != "rss_mib"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
