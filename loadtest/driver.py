"""``ctrserve bench serve``: the serving benchmark.

Starts the servers itself (the service with one worker and one ONNX Runtime thread, the
parse-only app, nginx) pinned to one core with ``taskset`` and runs the load generator on the
other (its own affinity), then measures, as asked with ``--experiments``:

- ``ceiling``: the package in an in-process ONNX Runtime session with one thread (same batch
  sizes, on the server's core), and the feature transform plus the session;
- ``generator``: the load generator against a server that does no work (nginx ``return 200``),
  so that it is shown not to be the bottleneck;
- ``closed``: a concurrency sweep of R-row requests for each API, batching on and off, and the
  parse-only server with the same bodies;
- ``single``: single-row requests from many clients on each API, batching on and off, and the
  parse-only server;
- ``open``: Poisson arrivals of ``--open-rows``-row requests at fractions of the max sustained
  rate (the closed-loop peak), batching on and off, latency from each scheduled send time; the
  max rate whose p99 meets ``--bound-ms``;
- ``grid``: throughput against the batcher's ``max_queue_delay_us`` and ``max_batch_rows``;
- ``profile``: py-spy samples of the service under load, grouped by where the time goes
  (``profiles.py``).

Writes ``results.json``, ``report.md`` and PNG plots to ``--out`` (``report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from . import load
from .options import EXPERIMENTS, BenchConfig, config_from
from .payloads import Body, RowPool
from .profiles import summarise_profile
from .report import write_report
from .servers import (
    CLOCK_TICKS,
    ParseOnlyServer,
    ServerProcess,
    ServiceServer,
    no_work_server,
    pinned,
)


class Bench:
    def __init__(self, config: BenchConfig) -> None:
        self.config = config
        self.log = config.log
        self.logs = config.out / "logs"
        self.results: dict = {"config": _config_dict(config), "experiments": {}}

    # -- helpers ------------------------------------------------------------------------------

    def service(self, *flags: str) -> ServiceServer:
        return ServiceServer(self.config.package, list(flags), self.config.server_cpu, self.logs)

    def measure(self, server: ServerProcess, bodies: list[Body], tags: dict[str, Any], *,
                concurrency: int | None = None, rate: float | None = None,
                duration_s: float | None = None) -> dict[str, Any]:
        """One load run against ``server``, a closed loop of ``concurrency`` clients or Poisson
        arrivals at ``rate``: the generator's result with the server's CPU use, and (for the
        service) its batches over the window."""
        c = self.config
        duration = duration_s or c.duration_s
        stats_before = _stats(server)
        steal_before = _steal_ticks(c.server_cpu)
        cpu_before, started = server.cpu_seconds(), time.monotonic()
        if concurrency is not None:
            result = load.run(load.closed_loop(server.url, bodies, concurrency, duration,
                                               c.warmup_s, c.timeout_s, c.client))
        elif rate is not None:
            result = load.run(load.open_loop(server.url, bodies, rate, duration, c.warmup_s,
                                             c.timeout_s, c.max_in_flight, c.seed, c.client))
        else:
            raise ValueError("measure needs concurrency (closed loop) or rate (open loop)")
        elapsed = time.monotonic() - started
        record = {**tags, **result.to_dict(),
                  "server_cpu": (server.cpu_seconds() - cpu_before) / elapsed,
                  # Share of the server core's time the hypervisor gave to others (VM steal).
                  "server_core_steal": (_steal_ticks(c.server_cpu) - steal_before)
                  / (CLOCK_TICKS * elapsed)}
        stats_after = _stats(server)
        if stats_before and stats_after:
            batches = stats_after["execution_count"] - stats_before["execution_count"]
            rows = stats_after["inference_count"] - stats_before["inference_count"]
            record["batches"] = batches
            record["rows_per_batch"] = rows / batches if batches else 0.0
            if batches:
                record["compute_ms_per_batch"] = 1e3 * (
                    stats_after["compute_seconds"] - stats_before["compute_seconds"]) / batches
                record["queue_ms_per_batch"] = 1e3 * (
                    stats_after["queue_seconds"] - stats_before["queue_seconds"]) / batches
        self.log(_line(record))
        time.sleep(min(0.5, c.warmup_s))  # let the server settle (connection teardown)
        return record

    # -- experiments ----------------------------------------------------------------------------

    def run(self) -> dict:
        c = self.config
        c.out.mkdir(parents=True, exist_ok=True)
        if c.client_cpu is not None:
            os.sched_setaffinity(0, {c.client_cpu})
        self.results["machine"] = machine_info(c)
        self.log(f"machine: {self.results['machine']['summary']}")
        self.pool = RowPool(c.package, rows=max(8192, 4 * c.open_rows), data=c.data,
                            seed=c.seed)
        self.results["model"] = {"name": self.pool.model, "package": str(c.package),
                                 "tables": len(self.pool.transform.categorical),
                                 "dense": self.pool.transform.n_dense,
                                 "rows_source": str(c.data) if c.data else "synthesised"}
        for name in EXPERIMENTS:
            if name in c.experiments:
                self.log(f"== {name}")
                started = time.monotonic()
                self.results["experiments"][name] = getattr(self, f"run_{name}")()
                self.log(f"== {name}: {time.monotonic() - started:.0f} s")
                self.save()
        self.results["machine"]["load_average_end"] = os.getloadavg()
        self.save()
        return self.results

    def save(self) -> None:
        (self.config.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def run_ceiling(self) -> list[dict]:
        c = self.config
        sizes = sorted({1, c.rows, c.open_rows})
        command = [sys.executable, "-m", "ctrserve.loadtest.ceiling", "--package",
                   str(c.package), "--rows", ",".join(map(str, sizes)),
                   "--seconds", str(c.ceiling_s)]
        if c.data:
            command += ["--data", str(c.data)]
        done = subprocess.run(pinned(command, c.server_cpu), capture_output=True, text=True,
                              check=True, timeout=600 + 10 * c.ceiling_s)
        results = json.loads(done.stdout.strip().splitlines()[-1])["results"]
        for record in results:
            self.log(f"ceiling {record['what']:>20} {record['rows']:>5} rows: "
                     f"{record['rows_per_s']:>10,.0f} rows/s, {record['ms_per_batch']:.3f} ms")
        return results

    def run_generator(self) -> list[dict]:
        c = self.config
        records = []
        with no_work_server(c.server_cpu, self.logs) as server:
            for rows, clients in ((1, c.single_clients), (c.rows, max(c.concurrency)),
                                  (c.open_rows, max(c.open_concurrency))):
                bodies = self.pool.bodies("v2-binary", rows, 64)
                records.append(self.measure(server, bodies,
                                            {"target": server.kind, "api": "v2-binary"},
                                            concurrency=clients))
        return records

    def run_closed(self) -> list[dict]:
        c = self.config
        records = []
        for batching in c.batching:
            with self.service(*([] if batching else ["--no-batching"])) as server:
                for api in c.apis:
                    bodies = self.pool.bodies(api, c.rows, 64)
                    for clients in c.concurrency:
                        records.append(self.measure(
                            server, bodies,
                            {"target": "service", "api": api, "batching": batching},
                            concurrency=clients))
        with ParseOnlyServer(c.package, c.server_cpu, self.logs) as server:
            for api in c.apis:
                bodies = self.pool.bodies(api, c.rows, 64)
                for clients in c.concurrency:
                    records.append(self.measure(server, bodies,
                                                {"target": "parse-only", "api": api},
                                                concurrency=clients))
        return records

    def run_single(self) -> list[dict]:
        c = self.config
        records = []
        for batching in c.batching:
            with self.service(*([] if batching else ["--no-batching"])) as server:
                for api in c.single_apis:
                    records.append(self.measure(
                        server, self.pool.bodies(api, 1, 256),
                        {"target": "service", "api": api, "batching": batching},
                        concurrency=c.single_clients))
        with ParseOnlyServer(c.package, c.server_cpu, self.logs) as server:
            for api in c.single_apis:
                records.append(self.measure(server, self.pool.bodies(api, 1, 256),
                                            {"target": "parse-only", "api": api},
                                            concurrency=c.single_clients))
        return records

    def run_open(self) -> dict:
        c = self.config
        bodies = self.pool.bodies("v2-binary", c.open_rows, 64)
        out: dict = {"api": "v2-binary", "rows": c.open_rows, "bound_ms": c.bound_ms,
                     "sustained": [], "poisson": []}
        for batching in c.batching:
            label = "on" if batching else "off"
            with self.service(*([] if batching else ["--no-batching"])) as server:
                tags = {"target": "service", "api": "v2-binary", "batching": batching}
                sweep = [self.measure(server, bodies, tags, concurrency=clients)
                         for clients in c.open_concurrency]
                out["sustained"] += sweep
                peak = max(r["req_per_s"] for r in sweep if not r["errors"])
                out[f"max_sustained_{label}"] = peak
                # The same offered rates for on and off (off alone: its own peak).
                reference = out.get("max_sustained_on", peak)
                runs = [self.measure(server, bodies, {**tags, "fraction": f},
                                     rate=f * reference) for f in c.fractions]
                runs += self._refine(server, bodies, tags, runs, reference)
                out["poisson"] += runs
                passing = [r for r in runs if _meets(r, c.bound_ms)]
                out[f"max_rate_meeting_bound_{label}"] = (
                    max(r["offered_rate"] for r in passing) if passing else 0.0)
        return out

    def _refine(self, server, bodies, tags, runs, reference) -> list[dict]:
        """Bisection between the highest passing rate and the lowest failing one above it."""
        c = self.config
        extra: list[dict[str, Any]] = []
        for _ in range(c.refine_steps):
            every = runs + extra
            passing = [r["offered_rate"] for r in every if _meets(r, c.bound_ms)]
            low = max(passing, default=0.0)
            failing = [r["offered_rate"] for r in every
                       if not _meets(r, c.bound_ms) and r["offered_rate"] > low]
            if not failing or not passing:
                break
            rate = (low + min(failing)) / 2
            extra.append(self.measure(server, bodies,
                                      {**tags, "fraction": rate / reference, "refine": True},
                                      rate=rate))
        return extra

    def run_grid(self) -> list[dict]:
        c = self.config
        records = []
        single = self.pool.bodies("v2-binary", 1, 256)
        queries = self.pool.bodies("v2-binary", c.open_rows, 64)
        for delay in c.grid_delays_us:
            for size in c.grid_batch_rows:
                flags = ("--max-queue-delay-us", str(delay), "--max-batch-rows", str(size))
                with self.service(*flags) as server:
                    tags = {"target": "service", "api": "v2-binary", "batching": True,
                            "max_queue_delay_us": delay, "max_batch_rows": size}
                    records.append(self.measure(server, single, tags,
                                                concurrency=c.single_clients,
                                                duration_s=c.grid_duration_s))
                    records.append(self.measure(server, queries, tags,
                                                concurrency=c.grid_concurrency,
                                                duration_s=c.grid_duration_s))
        return records

    def run_profile(self) -> list[dict]:
        c = self.config
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(spy, os.X_OK):
            self.log("py-spy is not installed: no profile")
            return []
        cases = [("v2-binary", c.rows, max(c.concurrency)), ("columns", c.rows,
                                                              max(c.concurrency)),
                 ("v2-binary", 1, c.single_clients), ("columns", 1, c.single_clients)]
        profiles = []
        with self.service() as server:
            for api, rows, clients in cases:
                path = self.logs / f"profile-{api}-{rows}.txt"
                command = [spy, "record", "-p", str(server.pid), "-d", str(int(c.profile_s)),
                           "-r", "200", "-f", "raw", "-o", str(path), "--nonblocking"]
                spy_process = subprocess.Popen(pinned(command, c.client_cpu),
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL)
                try:
                    record = self.measure(server, self.pool.bodies(api, rows, 64),
                                          {"target": "service", "api": api, "batching": True},
                                          concurrency=clients,
                                          duration_s=c.profile_s - c.warmup_s + 0.5)
                finally:
                    spy_process.wait(timeout=60 + c.profile_s)
                profiles.append({"api": api, "rows": rows, "concurrency": clients,
                                 "req_per_s": record["req_per_s"],
                                 "rows_per_s": record["rows_per_s"],
                                 "areas": summarise_profile(path)})
                self.log(f"profile {api} {rows} rows: {profiles[-1]['areas']}")
        return profiles


# -- small helpers ------------------------------------------------------------------------------


def _stats(server: ServerProcess) -> dict | None:
    if not isinstance(server, ServiceServer):
        return None
    try:
        with urllib.request.urlopen(f"{server.url}/v2/models/{server.model}/stats",
                                    timeout=10) as answer:
            return json.loads(answer.read())["model_stats"][0]
    except (OSError, ValueError, KeyError):
        return None


def _steal_ticks(cpu: int | None) -> int:
    """Clock ticks stolen by the hypervisor from one core (all cores when None), /proc/stat."""
    name = "cpu" if cpu is None else f"cpu{cpu}"
    try:
        with open("/proc/stat") as handle:
            for line in handle:
                fields = line.split()
                if fields[0] == name:
                    return int(fields[8]) if len(fields) > 8 else 0
    except OSError:
        pass
    return 0


def _meets(record: dict, bound_ms: float) -> bool:
    return (not record["errors"] and bool(record["latency_ms"])
            and record["latency_ms"]["p99"] <= bound_ms)


def _line(record: dict) -> str:
    where = record.get("target", "")
    if record.get("batching") is False:
        where += " (no batching)"
    load_text = (f"c={record['concurrency']}" if record["mode"] == "closed"
                 else f"rate={record['offered_rate']:.0f}/s")
    latency = record["latency_ms"]
    return (f"{where:<26} {record.get('api', ''):<10} {record['rows']:>6.0f} rows {load_text:<14}"
            f" {record['req_per_s']:>9,.0f} req/s {record['rows_per_s']:>10,.0f} rows/s"
            f"  p50 {latency.get('p50', float('nan')):7.2f}  p99 "
            f"{latency.get('p99', float('nan')):7.2f} ms  errors {record['errors'] or 0}"
            f"  server {record['server_cpu']:.2f} cores  client {record['client_cpu']:.2f}"
            f"  steal {record.get('server_core_steal', 0):.1%}")


def _config_dict(config: BenchConfig) -> dict:
    out = {}
    for key, value in vars(config).items():
        if key == "log":
            continue
        out[key] = str(value) if isinstance(value, Path) else value
    return out


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` ("unknown" where it says none)."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


def machine_info(config: BenchConfig) -> dict:
    import onnxruntime

    model = cpu_model()
    memory = 0
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
    cores = os.cpu_count() or 1
    gpu = shutil.which("nvidia-smi") is not None
    pinning = (f"server pinned to core {config.server_cpu}, load generator to core "
               f"{config.client_cpu} (taskset / sched_setaffinity)"
               if config.server_cpu is not None else "no pinning")
    return {
        "cores": cores, "cpu": model, "memory_bytes": memory, "gpu": gpu,
        "kernel": platform.release(), "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__,
        "load_average_start": os.getloadavg(), "pinning": pinning, "client": config.client,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "summary": (f"{cores} cores ({model}), {memory / 2**30:.0f} GiB, "
                    f"{'a GPU' if gpu else 'no GPU'}; {pinning}; load average at start "
                    f"{os.getloadavg()[0]:.2f}"),
    }


def main(args: argparse.Namespace) -> int:
    config = config_from(args)
    if not (config.package / "manifest.json").is_file():
        raise FileNotFoundError(f"{config.package}: not a model package (no manifest.json)")
    results = Bench(config).run()
    paths = write_report(results, config.out)
    for path in paths:
        print(f"wrote {path}")
    return 0
