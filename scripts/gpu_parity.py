"""Loads model packages the way ``ctrserve serve`` does, on CUDA and on CPU, and compares them:
per package, where ONNX Runtime placed the nodes of the CUDA session, the largest
|p_cuda - p_cpu| over the export's parity batches (random rows, edge ids, batches of 1, 7 and
4096; tolerance 1e-5), and the in-process rows/s of both ("checked" and "cpu") at a few batch
sizes, the CPU session with every usable CPU and the checked one with one thread. The
CUDA runtime's scores go through its I/O binding, as the server's do.

    python scripts/gpu_parity.py --out parity.json REPO/NAME/VERSION ...

Prints a report and writes it as JSON; exits 1 when a package does not load on CUDA or misses
the tolerance. A step of ``scripts/gpu_check.sh`` (``docs/gpu.md``); ``--provider cpu``
rehearses the same steps on a machine without a GPU (both sessions on CPU).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from ctrserve.export.package import load_package
from ctrserve.export.parity import TOLERANCE, parity_batches
from ctrserve.service.cuda import CudaOptions
from ctrserve.service.placement import describe
from ctrserve.service.runtime import ModelLoadError, ModelRuntime, load_runtime, usable_cpus

BATCH_ROWS = (1, 256, 4096)


def rows_per_second(runtime: ModelRuntime, rows: int, seconds: float) -> float:
    """Rows scored per second by ``runtime.predict`` on one random batch of ``rows``."""
    rng = np.random.default_rng(0)
    sizes = np.array(runtime.table_sizes)
    dense = rng.standard_normal((rows, runtime.n_dense)).astype(np.float32)
    sparse = (rng.random((rows, len(sizes))) * sizes).astype(np.int64)
    runtime.predict(dense, sparse)
    calls, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        runtime.predict(dense, sparse)
        calls += 1
    return calls * rows / elapsed


def check(directory: Path, provider: str, device: int, seconds: float) -> dict:
    package = load_package(directory)
    cpu = load_runtime(package, "cpu", usable_cpus()[0])
    try:
        gpu = load_runtime(package, provider, 1, CudaOptions(device))
    except ModelLoadError as error:
        return {"package": str(directory), "passed": False, "error": str(error)}
    worst = 0.0
    for _, dense, sparse in parity_batches(cpu.table_sizes, cpu.n_dense):
        difference = gpu.predict(dense, sparse).astype(np.float64) - cpu.predict(dense, sparse)
        worst = max(worst, float(np.abs(difference).max()))
    return {
        "package": str(directory), "provider": gpu.provider, "device": gpu.device,
        "max_abs_diff": worst, "tolerance": TOLERANCE,
        "passed": gpu.provider == ("CPUExecutionProvider" if provider == "cpu"
                                   else "CUDAExecutionProvider") and worst <= TOLERANCE,
        "placement": gpu.placement.to_dict(), "lookups": gpu.placement.lookups(),
        "rows_per_second": {str(rows): {"cpu": rows_per_second(cpu, rows, seconds),
                                        "checked": rows_per_second(gpu, rows, seconds)}
                            for rows in BATCH_ROWS},
    }


def report(result: dict) -> str:
    if "error" in result:
        return f"{result['package']}: FAILED to load: {result['error']}"
    verdict = "ok" if result["passed"] else "FAILED"
    speeds = "; ".join(f"{rows} rows: {rates['checked']:,.0f}/s (CPU {rates['cpu']:,.0f}/s)"
                       for rows, rates in result["rows_per_second"].items())
    return (f"{result['package']}: {verdict}, on {result['provider']} ({result['device']}), "
            f"max |p - p_cpu| {result['max_abs_diff']:.3g} (tolerance {result['tolerance']:g}), "
            f"{result['lookups']} lookups\n{describe(result['placement'])}\nin-process: {speeds}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("packages", nargs="+", type=Path)
    parser.add_argument("--provider", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--device", type=int, default=0, help="CUDA device id")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="measured seconds per batch size and provider")
    parser.add_argument("--out", type=Path, required=True, help="JSON report to write")
    args = parser.parse_args(argv)
    results = []
    for directory in args.packages:
        results.append(check(directory, args.provider, args.device, args.seconds))
        print(report(results[-1]), flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    failed = [r["package"] for r in results if not r["passed"]]
    print(f"{len(results) - len(failed)} of {len(results)} packages pass"
          + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
