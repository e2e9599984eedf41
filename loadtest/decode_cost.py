"""What the friendly JSON API costs per request before inference, in-process: decoding a
columnar body into the batcher's raw columns, then the feature transform of those columns. Run
pinned to one core, at the request sizes of interest:

    taskset -c 0 python -m ctrserve.loadtest.decode_cost --package runs/demo/repo/demo/1 \\
        --data runs/demo/data/data.parquet --rows 1,256
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ctrserve.models.schema import RawBatch
from ctrserve.service.friendly import decode_score_request

from .ceiling import WINDOWS, decoded_batches, timed
from .payloads import RowPool


def measure(package: str | Path, sizes: list[int], seconds: float = 3.0,
            data: str | Path | None = None) -> list[dict]:
    """Microseconds per request of decoding and of the transform, for each request size."""
    pool = RowPool(Path(package), rows=max(4096, 2 * max(sizes)), data=data)
    results = []
    for rows in sizes:
        windows = [pool.window(i * rows * 7 % pool.size, rows) for i in range(WINDOWS)]
        bodies = [pool.body("columns", window).data for window in windows]
        batches = decoded_batches(pool, windows)

        def decode(i: int, bodies: list[bytes] = bodies) -> object:
            return decode_score_request(bodies[i], pool.transform, 1 << 30)

        def transform(i: int, batches: list[RawBatch] = batches) -> object:
            return pool.transform.transform(batches[i])

        for what, call in (("decode", decode), ("transform", transform)):
            calls, elapsed = timed(call, WINDOWS, seconds)
            results.append({"what": what, "rows": rows, "us_per_request": 1e6 * elapsed / calls})
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--package", required=True)
    parser.add_argument("--rows", default="1,256", help="rows per request")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument("--data", help="raw rows (Parquet) instead of synthesised ones")
    args = parser.parse_args(argv)
    sizes = [int(part) for part in args.rows.split(",") if part.strip()]
    for record in measure(args.package, sizes, args.seconds, args.data):
        print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
