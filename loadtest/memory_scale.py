"""Memory at real scale: what each embedding scheme buys a server with Criteo Kaggle's 26 real
table sizes (33.8M ids; 2.16 GB of fp32 tables at D=16).

For every variant a DLRM (D=16, bottom 13-512-256-64-16, top 512-256-1) with generated weights
(memory does not depend on training; PEP gets a random mask keeping the stated share of the
values) is exported as a package with the usual checks (``export.memory_bench`` builds the
checkpoint; tables under 2,000 rows stay full). Then the service serves it, pinned to one core
with one ONNX Runtime thread, and the table records: package bytes, the time from starting the
process to ready (the package's checksums, the session, the warm-up), the model's load time
from the service's metrics, the service's resident memory when ready and after load, and the
latency of Poisson arrivals of 256-row v2 binary requests at a fixed rate (the generator on the
other core), and the closed-loop peak.

Benchmark only (not in CI); it needs the training extra (torch) to build packages:

    python -m ctrserve.loadtest.memory_scale --work runs/bench-memory --out docs/benchmarks/memory

``--phase build`` only builds packages, ``--phase serve`` only measures built ones; packages are
deleted afterwards unless ``--keep``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from . import load
from .payloads import RowPool
from .servers import ServiceServer

MiB = 1 << 20

#: slug -> (label, scheme settings, PEP keep share)
VARIANTS: dict[str, tuple[str, dict, float]] = {
    "full": ("full", {"scheme": "full"}, 1.0),
    "int8": ("int8 (row-wise)", {"scheme": "int8"}, 1.0),
    "qr4": ("QR 4 collisions", {"scheme": "qr", "collisions": 4}, 1.0),
    "qr16": ("QR 16 collisions", {"scheme": "qr", "collisions": 16}, 1.0),
    "pep90": ("PEP, 90% fewer non-zeros", {"scheme": "pep"}, 0.10),
    "pep99": ("PEP, 99% fewer non-zeros", {"scheme": "pep"}, 0.01),
    "lma8": ("LMA 8x", {"scheme": "lma", "compression": 8}, 1.0),
    "lma15": ("LMA 15x (16x is out of reach)", {"scheme": "lma", "compression": 15}, 1.0),
    "robe16": ("ROBE-Z 16x", {"scheme": "robe", "compression": 16}, 1.0),
    "robe1000": ("ROBE-Z 1000x", {"scheme": "robe", "compression": 1000}, 1.0),
}


def build(slug: str, work: Path) -> dict:
    from ctrserve.export.exporter import export_checkpoint
    from ctrserve.export.memory_bench import build_checkpoint
    from ctrserve.models.embeddings.scheme_settings import settings_from_dict
    from ctrserve.models.generate import CRITEO_CARDINALITIES

    _, settings, keep = VARIANTS[slug]
    package = work / "repo" / slug / "1"
    if (package / "manifest.json").is_file():
        return {"slug": slug, "built": "already"}
    checkpoint = work / f"checkpoint-{slug}"
    started = time.monotonic()
    scheme = settings_from_dict({**settings, "min_rows": 2000})
    build_checkpoint(scheme, list(CRITEO_CARDINALITIES), keep, checkpoint)
    built = time.monotonic()
    export_checkpoint(checkpoint, work / "repo", slug, version=1, overwrite=True,
                      log=lambda _: None)
    exported = time.monotonic()
    shutil.rmtree(checkpoint, ignore_errors=True)
    gc.collect()
    return {"slug": slug, "build_s": built - started, "export_s": exported - built}


def _metric(url: str, name: str) -> float | None:
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as answer:
        text = answer.read().decode()
    match = re.search(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def serve(slug: str, work: Path, rate: float, rows: int, duration: float, warmup: float,
          server_cpu: int | None, logs: Path) -> dict:
    label = VARIANTS[slug][0]
    package = work / "repo" / slug / "1"
    manifest = json.loads((package / "manifest.json").read_text())
    pool = RowPool(package, rows=8192)
    bodies = pool.bodies("v2-binary", rows, 64)
    record = {
        "slug": slug, "variant": label,
        "embedding_bytes": manifest["bytes"]["embeddings"],
        "full_embedding_bytes": manifest["bytes"]["full_embeddings"],
        "package_bytes": sum(f["bytes"] for f in manifest["files"].values()),
        "vocabulary_bytes": manifest["files"]["transform/vocabulary.npz"]["bytes"],
    }
    del pool
    gc.collect()
    server = ServiceServer(package, (), server_cpu, logs)
    server.start()
    try:
        record["start_to_ready_s"] = server.wait_ready(timeout=1800)
        record["model_load_s"] = _metric(server.url, "ctrserve_model_load_seconds_sum")
        record["rss_ready_bytes"] = server.resident_bytes()
        result = load.run(load.open_loop(server.url, bodies, rate, duration, warmup))
        record["fixed_load"] = result.to_dict()
        record["rss_after_load_bytes"] = server.resident_bytes()
        peak = load.run(load.closed_loop(server.url, bodies, 8, duration / 2, warmup))
        record["closed_peak"] = peak.to_dict()
        record["rss_after_peak_bytes"] = server.resident_bytes()
    finally:
        server.stop()
    print(json.dumps({k: v for k, v in record.items() if k not in ("fixed_load",
                                                                   "closed_peak")}),
          flush=True)
    return record


def markdown(records: list[dict], info: dict) -> str:
    full = next((r for r in records if r["slug"] == "full"), None)
    lines = [
        "| variant | embedding MiB | ratio | package MiB | of which vocabulary MiB | "
        "start to ready s | model load s | RSS ready MiB | RSS after load MiB | "
        f"p50 ms | p99 ms | p99.9 ms (Poisson {info['rate']:g} req/s x {info['rows']} rows) | "
        "peak rows/s (8 clients) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        latency = r["fixed_load"]["latency_ms"]
        errors = r["fixed_load"]["errors"]
        note = f" ({sum(errors.values())} errors)" if errors else ""
        lines.append(
            f"| {r['variant']} | {r['embedding_bytes'] / MiB:,.1f} | "
            f"{r['full_embedding_bytes'] / r['embedding_bytes']:.2f}x | "
            f"{r['package_bytes'] / MiB:,.1f} | {r['vocabulary_bytes'] / MiB:,.1f} | "
            f"{r['start_to_ready_s']:.1f} | {r['model_load_s'] or 0:.1f} | "
            f"{r['rss_ready_bytes'] / MiB:,.0f} | {r['rss_after_load_bytes'] / MiB:,.0f} | "
            f"{latency.get('p50', 0):.1f} | {latency.get('p99', 0):.1f} | "
            f"{latency.get('p99.9', 0):.1f}{note} | {r['closed_peak']['rows_per_s']:,.0f} |")
    if full:
        lines += ["", "RSS after load relative to full: " + ", ".join(
            f"{r['variant']} {r['rss_after_load_bytes'] / full['rss_after_load_bytes']:.2f}"
            for r in records if r is not full) + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="runs/bench-memory", help="packages go here")
    parser.add_argument("--out", default="docs/benchmarks/memory")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {','.join(VARIANTS)}")
    parser.add_argument("--phase", choices=("build", "serve", "all"), default="all")
    parser.add_argument("--rate", type=float, default=50.0, help="Poisson requests per second")
    parser.add_argument("--rows", type=int, default=256, help="rows per request")
    parser.add_argument("--duration", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--server-cpu", type=int, default=0)
    parser.add_argument("--client-cpu", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help="keep the packages")
    args = parser.parse_args(argv)
    work, out = Path(args.work), Path(args.out)
    slugs = [s.strip() for s in args.variants.split(",") if s.strip()]
    unknown = [s for s in slugs if s not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants: {', '.join(unknown)}")
    work.mkdir(parents=True, exist_ok=True)
    if args.phase in ("build", "all"):
        for slug in slugs:
            print(json.dumps(build(slug, work)), flush=True)
    if args.phase in ("serve", "all"):
        os.sched_setaffinity(0, {args.client_cpu})
        info = {"rate": args.rate, "rows": args.rows, "duration_s": args.duration,
                "server_cpu": args.server_cpu, "client_cpu": args.client_cpu,
                "load_average_start": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        records = [serve(slug, work, args.rate, args.rows, args.duration, args.warmup,
                         args.server_cpu, work / "logs") for slug in slugs]
        info["load_average_end"] = os.getloadavg()
        out.mkdir(parents=True, exist_ok=True)
        (out / "memory.json").write_text(json.dumps({"info": info, "records": records},
                                                    indent=1) + "\n")
        (out / "memory.md").write_text(markdown(records, info))
        print(f"wrote {out / 'memory.md'}")
        if not args.keep:
            for slug in slugs:
                shutil.rmtree(work / "repo" / slug, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
