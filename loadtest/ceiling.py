"""The in-process ceiling: the package in an ONNX Runtime CPU session with one thread, called
back to back from Python on prepared tensors, at the benchmark's batch sizes; and, for the raw
APIs, the package's feature transform plus the session (the service's work per batch, with no
HTTP, no parsing and no batching).

The benchmark driver runs this module in a subprocess pinned to the server's core:

    taskset -c 0 python -m ctrserve.loadtest.ceiling --package runs/demo/repo/demo/1 --rows 1,256
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort

from ctrserve.models.schema import RawBatch
from ctrserve.service.friendly import decode_score_request

from .payloads import RowPool

#: Different windows of the row pool each batch size cycles through.
WINDOWS = 16


def session_for(package: Path, threads: int = 1) -> ort.InferenceSession:
    """The session as the service builds it (all graph optimisations, CPU)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(package / "model.onnx"), options,
                                providers=["CPUExecutionProvider"])


def timed(call: Callable[[int], object], count: int, seconds: float) -> tuple[int, float]:
    """Calls ``call(i)`` for i cycling through ``range(count)`` (after a few warm-up calls)
    until ``seconds`` have passed: the calls made and the seconds they took."""
    for index in range(min(count, 4)):  # warm-up
        call(index)
    calls = 0
    started = time.perf_counter()
    while True:
        call(calls % count)
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return calls, elapsed


def measure(package: str | Path, sizes: list[int], seconds: float = 3.0,
            data: str | Path | None = None, threads: int = 1,
            with_transform: bool = True) -> list[dict]:
    """Rows per second and mean batch time for each size (session only, and with the
    transform)."""
    package = Path(package)
    pool = RowPool(package, rows=max(4096, 2 * max(sizes)), data=data)
    session = session_for(package, threads)
    with_dense = pool.transform.n_dense > 0
    results = []
    for rows in sizes:
        windows = [pool.window(i * rows * 7 % pool.size, rows) for i in range(WINDOWS)]
        feeds = [{"sparse": pool.sparse[w], **({"dense": pool.dense[w]} if with_dense else {})}
                 for w in windows]

        def run_session(i: int, feeds: list[dict[str, np.ndarray]] = feeds) -> object:
            return session.run(None, feeds[i])

        calls, elapsed = timed(run_session, WINDOWS, seconds)
        results.append({"what": "session", "rows": rows, "threads": threads, "calls": calls,
                        "seconds": elapsed, "rows_per_s": calls * rows / elapsed,
                        "batches_per_s": calls / elapsed, "ms_per_batch": 1e3 * elapsed / calls})
        if not with_transform:
            continue
        batches = decoded_batches(pool, windows)

        def transform_and_run(i: int, batches: list[RawBatch] = batches) -> None:
            transformed = pool.transform.transform(batches[i])
            feed = {"sparse": transformed.sparse}
            if with_dense:
                feed["dense"] = transformed.dense
            session.run(None, feed)

        calls, elapsed = timed(transform_and_run, WINDOWS, seconds)
        results.append({"what": "transform + session", "rows": rows, "threads": threads,
                        "calls": calls, "seconds": elapsed, "rows_per_s": calls * rows / elapsed,
                        "batches_per_s": calls / elapsed,
                        "ms_per_batch": 1e3 * elapsed / calls})
    return results


def decoded_batches(pool: RowPool, windows: list[np.ndarray]) -> list[RawBatch]:
    """The pool's rows at each of ``windows`` as the service has them before its transform:
    a columnar JSON body decoded by the friendly API's codec."""
    batches = []
    for window in windows:
        features = decode_score_request(pool.body("columns", window).data, pool.transform,
                                        1 << 30)
        batches.append(RawBatch(labels=None, dense=features.dense,
                                categorical=features.categorical))
    return batches


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True)
    parser.add_argument("--rows", default="1,256", help="batch sizes")
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size")
    parser.add_argument("--data", help="raw rows (Parquet) instead of synthesised ones")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-transform", action="store_true")
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.rows.split(",") if part.strip()]
    results = measure(args.package, sizes, args.seconds, args.data, args.threads,
                      not args.no_transform)
    print(json.dumps({"affinity": sorted(os.sched_getaffinity(0)), "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
