"""``ctrserve bench peers``: the service beside the servers a user would pick instead, in one run.

Every server serves the same package's ``model.onnx`` on loopback, and one load generator (in
this process, with aiohttp's client by default) sends every one of them the same rows. Nothing
is pinned: the servers and the generator share the machine's CPUs, as they would. In turn:

- ``ceiling``: the package in an in-process ONNX Runtime session with one thread per usable
  CPU, called back to back (``ceiling.py``): no HTTP;
- ``echo``: the naive endpoint's ``/echo``: FastAPI decoding the request and answering, no
  inference (the framework's floor);
- ``naive``: FastAPI and ONNX Runtime, one session run per request (``peer_servers``);
- ``mlserver``: MLServer with adaptive batching, ``bentoml``: BentoML with adaptive batching
  (``peer_servers``; BentoML takes its own body, the same rows);
- ``service``: ``ctrserve serve`` at its defaults (and any ``--service-variant``).

With ``--rounds N`` the targets are measured N times in turn and the report takes each figure's
median over the rounds: on a machine whose other load drifts over minutes, figures measured
minutes apart are compared from the same rounds.

The peers run in their own pinned venvs (``peer_venvs.py``), the service in this interpreter.
Each server is started in its own process group, must be ready within a bounded wait, and is
stopped by process group. Its scenarios: R-row requests from C clients and single-row requests
from many clients, closed loop, each server's CPU use under Poisson arrivals of single-row
requests at a low rate, and, for the service, Poisson arrivals of R-row requests at a fraction
of its own closed-loop peak (latency from each scheduled send). With ``--memory-package`` the
service serves a full-table package at Criteo's sizes with one worker, then with two, under the
same load, and the proportional set sizes of their processes are compared. With ``--profile``
the service's batch and single-row scenarios run once more under py-spy, every worker sampled,
and the samples are grouped by area (``profiles.py``): where its time goes.

Requests are the Open Inference Protocol v2 JSON tensors ``dense`` FP32 [R, n_dense] and
``sparse`` INT64 [R, tables] (``payloads.v2_json_body``). Writes ``results.json`` and
``report.md`` (``peer_report.py``), and every server's log under ``logs/``.
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
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from ctrserve.service.runtime import usable_cpus

from . import load
from .driver import cpu_model
from .payloads import Body, RowPool
from .peer_options import PeersConfig, config_from
from .peer_report import write_report
from .peer_venvs import peer_python, versions
from .profiles import summarise_profile
from .servers import (
    HOST,
    ServerProcess,
    ServiceServer,
    free_port,
    proportional_bytes,
    resident_bytes,
    server_pids,
)

#: The folder of the peers' own server code (each runs with it on its ``PYTHONPATH``).
PEER_SERVERS = Path(__file__).resolve().parent / "peer_servers"
#: The standard package: Criteo's 26 categorical and 13 dense columns, tables of this many rows.
TABLES, TABLE_ROWS = 26, 1000
#: MLServer's adaptive batching: up to this many requests, waiting up to this long (s).
MLSERVER_BATCH_SIZE, MLSERVER_BATCH_TIME_S = 64, 0.005
#: Different bodies each scenario cycles through.
BODIES = 64


class PeerServer(ServerProcess):
    """A peer's server: its kind names its log (``logs/KIND-PORT.log``)."""

    def __init__(self, kind: str, command: list[str], ready_path: str, env: dict[str, str],
                 log_dir: Path, port: int) -> None:
        self.kind, self.ready_path = kind, ready_path
        super().__init__(command, None, env, log_dir, port)


def build_package(work: Path, log=print) -> Path:
    """The standard package (26 full tables of ``TABLE_ROWS`` rows, D=16, bottom MLP
    13-512-256-64-16, top 512-256-1, generated weights: speed does not depend on training),
    exported to ``work/repo/ctr/1`` unless it is there. Needs the train extra (torch)."""
    from ctrserve.export.exporter import export_checkpoint
    from ctrserve.export.memory_bench import build_checkpoint
    from ctrserve.models.embeddings.scheme_settings import FullSettings

    package = work / "repo" / "ctr" / "1"
    if (package / "manifest.json").is_file():
        return package
    log(f"building the standard package in {package}")
    checkpoint = work / "checkpoint"
    build_checkpoint(FullSettings(), [TABLE_ROWS] * TABLES, 1.0, checkpoint)
    export_checkpoint(checkpoint, work / "repo", "ctr", version=1, overwrite=True,
                      log=lambda _: None)
    return package


def bento_body(pool: RowPool, index: np.ndarray) -> Body:
    """BentoML's body for the rows at ``index``: each row its dense values (to 5 decimals, as
    in the v2 body), then its ids."""
    dense = np.round(pool.dense[index].astype(np.float64), 5)
    features = np.hstack([dense, pool.sparse[index].astype(np.float64)])
    return Body("/predict", orjson.dumps({"features": features.tolist()}),
                {"Content-Type": "application/json"}, len(index))


class PeerBench:
    def __init__(self, config: PeersConfig) -> None:
        self.config = config
        self.log = config.log
        self.logs = config.out / "logs"
        self.cpus = usable_cpus()[0]
        self.results: dict[str, Any] = {"config": _config_dict(config), "targets": {}}

    # -- servers ----------------------------------------------------------------------------

    def python_of(self, peer: str) -> str:
        given = self.config.peer_python.get(peer)
        return given or str(peer_python(peer, self.config.venvs, self.log))

    def peer_env(self) -> dict[str, str]:
        return {"PEER_MODEL": str(self.package / "model.onnx"),
                "PEER_ORT_THREADS": str(self.cpus), "PEER_DENSE": str(self.n_dense),
                "PYTHONPATH": str(PEER_SERVERS)}

    def naive_server(self) -> ServerProcess:
        port = free_port()
        command = [self.python_of("naive"), "-m", "uvicorn", "naive_app:app", "--host", HOST,
                   "--port", str(port), "--no-access-log", "--log-level", "warning"]
        return PeerServer("naive", command, "/ready", self.peer_env(), self.logs, port)

    def mlserver_server(self) -> ServerProcess:
        directory = self.logs / "mlserver"
        directory.mkdir(parents=True, exist_ok=True)
        port = free_port()
        (directory / "settings.json").write_text(json.dumps({
            "host": HOST, "http_port": port, "grpc_port": free_port(),
            "metrics_port": free_port(), "parallel_workers": 0,
            "metrics_dir": str(directory / "metrics"), "debug": False}))
        (directory / "model-settings.json").write_text(json.dumps({
            "name": self.model, "implementation": "mlserver_runtime.OnnxRuntime",
            "max_batch_size": MLSERVER_BATCH_SIZE, "max_batch_time": MLSERVER_BATCH_TIME_S}))
        mlserver = Path(self.python_of("mlserver")).parent / "mlserver"
        return PeerServer("mlserver", [str(mlserver), "start", str(directory)],
                          f"/v2/models/{self.model}/ready", self.peer_env(), self.logs, port)

    def bentoml_server(self) -> ServerProcess:
        port = free_port()
        bentoml = Path(self.python_of("bentoml")).parent / "bentoml"
        env = {**self.peer_env(), "BENTOML_HOME": str(self.logs / "bentoml-home"),
               "BENTOML_DO_NOT_TRACK": "true"}
        return PeerServer("bentoml", [str(bentoml), "serve", "bento_service:CTR",
                                      "--working-dir", str(PEER_SERVERS), "--host", HOST,
                                      "--port", str(port)], "/readyz", env, self.logs, port)

    # -- measuring --------------------------------------------------------------------------

    def measure(self, server: ServerProcess, bodies: list[Body], tags: dict[str, Any], *,
                clients: int | None = None, rate: float | None = None) -> dict[str, Any]:
        """One scenario against ``server``: the generator's result, and the cores the server's
        processes used over it."""
        c = self.config
        cpu_before, started = server.cpu_seconds(), time.monotonic()
        if clients is not None:
            result = load.run(load.closed_loop(server.url, bodies, clients, c.duration_s,
                                               c.warmup_s, c.timeout_s, c.client))
        elif rate is not None:
            result = load.run(load.open_loop(server.url, bodies, rate, c.duration_s,
                                             c.warmup_s, c.timeout_s, client=c.client))
        else:
            raise ValueError("measure needs clients (closed loop) or rate (open loop)")
        record = {**tags, **result.to_dict(),
                  "server_cpu": (server.cpu_seconds() - cpu_before)
                  / (time.monotonic() - started)}
        self.log(_line(record))
        time.sleep(min(0.5, c.warmup_s))  # connections torn down before the next scenario
        return record

    def scenarios(self, server: ServerProcess, batch: list[Body], single: list[Body],
                  tags: dict[str, Any]) -> list[dict[str, Any]]:
        c = self.config
        return [
            self.measure(server, batch, {**tags, "scenario": "batch"}, clients=c.clients),
            self.measure(server, single, {**tags, "scenario": "single"},
                         clients=c.single_clients),
            self.measure(server, single, {**tags, "scenario": "idle"}, rate=c.idle_rate),
        ]

    # -- the run ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        c = self.config
        c.out.mkdir(parents=True, exist_ok=True)
        self.package = c.package or build_package(c.work, self.log)
        self.pool = RowPool(self.package, rows=max(8192, 4 * c.rows))
        self.model = self.pool.model
        self.n_dense = self.pool.transform.n_dense
        step = self.pool.size // BODIES
        windows = [self.pool.window(i * step, c.rows) for i in range(BODIES)]
        singles = [self.pool.window(i * step // 4, 1) for i in range(4 * BODIES)]
        self.v2 = ([self.pool.body("v2-json", w) for w in windows],
                   [self.pool.body("v2-json", w) for w in singles])
        self.results["machine"] = machine_info(self.cpus)
        self.results["model"] = {"name": self.model, "package": str(self.package),
                                 "tables": len(self.pool.transform.categorical),
                                 "dense": self.n_dense}
        self.log(f"machine: {self.results['machine']['summary']}")
        steal_before = _steal()
        for number in range(c.rounds):
            for target in c.targets:
                if target == "ceiling" and number:
                    continue
                self.log(f"== {target}" + (f" (round {number + 1} of {c.rounds})"
                                           if c.rounds > 1 else ""))
                self.add(target, getattr(self, f"run_{target}")(), number)
                self.save()
        if c.memory_package is not None:
            self.log("== memory")
            self.results["memory"] = self.run_memory(c.memory_package)
        if "ceiling" in c.targets:
            self.log("== ceiling again (drift)")
            self.results["ceiling_end"] = self.run_ceiling()
        self.results["machine"]["load_average_end"] = os.getloadavg()
        self.results["machine"]["steal_share"] = _steal_share(steal_before, _steal())
        self.save()
        return self.results

    def add(self, target: str, entry: dict[str, Any], number: int) -> None:
        """A target's outcome of round ``number``: its runs tagged with the round, added to
        those of the earlier rounds."""
        groups = (entry["variants"].values() if target == "service"
                  else [entry] if "runs" in entry else [])
        for group in groups:
            for run in group["runs"]:
                run["round"] = number
        known = self.results["targets"].get(target)
        if known is None:
            self.results["targets"][target] = entry
        elif target == "service":
            for label, variant in entry["variants"].items():
                known["variants"][label]["runs"] += variant["runs"]
        else:
            known["runs"] += entry["runs"]

    def save(self) -> None:
        (self.config.out / "results.json").write_text(json.dumps(self.results, indent=1) + "\n")

    def run_ceiling(self) -> dict[str, Any]:
        c = self.config
        command = [sys.executable, "-m", "ctrserve.loadtest.ceiling", "--package",
                   str(self.package), "--rows", f"1,{c.rows}", "--threads", str(self.cpus),
                   "--seconds", str(c.ceiling_s), "--no-transform"]
        done = subprocess.run(command, capture_output=True, text=True, check=True,
                              timeout=600 + 10 * c.ceiling_s)
        results = json.loads(done.stdout.strip().splitlines()[-1])["results"]
        for record in results:
            self.log(f"ceiling {record['rows']:>5} rows, {self.cpus} threads: "
                     f"{record['rows_per_s']:>10,.0f} rows/s")
        return {"threads": self.cpus, "results": results}

    def run_echo(self) -> dict[str, Any]:
        batch, single = ([replace(body, path="/echo") for body in bodies] for bodies in self.v2)
        with self.naive_server() as server:
            runs = self.scenarios(server, batch, single, {"target": "echo"})
        return {"versions": versions(self.python_of("naive")), "runs": runs}

    def run_naive(self) -> dict[str, Any]:
        with self.naive_server() as server:
            runs = self.scenarios(server, *self.v2, {"target": "naive"})
        return {"threads": self.cpus, "versions": versions(self.python_of("naive")),
                "runs": runs}

    def run_mlserver(self) -> dict[str, Any]:
        with self.mlserver_server() as server:
            runs = self.scenarios(server, *self.v2, {"target": "mlserver"})
        return {"threads": self.cpus, "versions": versions(self.python_of("mlserver")),
                "max_batch_size": MLSERVER_BATCH_SIZE, "max_batch_time_s": MLSERVER_BATCH_TIME_S,
                "runs": runs}

    def run_bentoml(self) -> dict[str, Any]:
        step = self.pool.size // BODIES
        batch = [bento_body(self.pool, self.pool.window(i * step, self.config.rows))
                 for i in range(BODIES)]
        single = [bento_body(self.pool, self.pool.window(i * step // 4, 1))
                  for i in range(4 * BODIES)]
        with self.bentoml_server() as server:
            runs = self.scenarios(server, batch, single, {"target": "bentoml"})
        return {"threads": self.cpus, "versions": versions(self.python_of("bentoml")),
                "runs": runs}

    def run_service(self) -> dict[str, Any]:
        c = self.config
        variants = {"defaults": [], **c.service_variants}
        out: dict[str, Any] = {"versions": versions(sys.executable), "variants": {}}
        for label, flags in variants.items():
            with ServiceServer(self.package, flags, log_dir=self.logs, defaults=True) as server:
                tags = {"target": "service", "variant": label}
                runs = self.scenarios(server, *self.v2, tags)
                if label == "defaults":
                    runs += self.poisson(server, tags, runs[0])
                    if c.profile:
                        runs += [self.profiled(server, bodies, {**tags, "scenario": name},
                                               clients)
                                 for name, bodies, clients in (
                                     ("profile-batch", self.v2[0], c.clients),
                                     ("profile-single", self.v2[1], c.single_clients))]
            out["variants"][label] = {"flags": flags, "runs": runs}
        return out

    def poisson(self, server: ServerProcess, tags: dict[str, Any],
                batch_run: dict[str, Any]) -> list[dict[str, Any]]:
        """The closed-loop peak of R-row requests over ``peak_clients`` (the batch scenario's
        count measured already), then Poisson arrivals at ``open_fraction`` of it."""
        c = self.config
        batch = self.v2[0]
        sweep = [batch_run] + [self.measure(server, batch, {**tags, "scenario": "peak"},
                                            clients=clients)
                               for clients in c.peak_clients if clients != c.clients]
        peak = max(run["req_per_s"] for run in sweep if not run["errors"])
        poisson = self.measure(server, batch, {**tags, "scenario": "poisson", "peak": peak,
                                               "fraction": c.open_fraction},
                               rate=c.open_fraction * peak)
        return [*sweep[1:], poisson]

    def profiled(self, server: ServerProcess, bodies: list[Body], tags: dict[str, Any],
                 clients: int) -> dict[str, Any]:
        """A closed-loop scenario with py-spy sampling every worker of the service (warm-up
        included); the record carries the samples' shares by area (none without py-spy)."""
        c = self.config
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not os.access(spy, os.X_OK):
            self.log("py-spy is not installed (the bench extra): no profile")
            return {**self.measure(server, bodies, tags, clients=clients), "profile": {}}
        paths, spies = [], []
        for pid in worker_pids(server.pid):
            paths.append(self.logs / f"{tags['scenario']}-{pid}.txt")
            spies.append(subprocess.Popen(
                [spy, "record", "-p", str(pid), "-d", str(int(c.warmup_s + c.duration_s)),
                 "-r", "100", "-f", "raw", "-o", str(paths[-1]), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        try:
            record = self.measure(server, bodies, tags, clients=clients)
        finally:
            for spy_process in spies:
                spy_process.wait(timeout=60 + c.warmup_s + c.duration_s)
        merged = self.logs / f"{tags['scenario']}.txt"
        merged.write_text("".join(path.read_text() for path in paths if path.is_file()))
        record["profile"] = summarise_profile(merged)
        self.log(f"{tags['scenario']}: " + ", ".join(
            f"{area} {share:.0%}" for area, share in record["profile"].items()))
        return record

    def run_memory(self, package: Path) -> dict[str, Any]:
        """One worker, then two, serving ``package`` under the same closed-loop load of R-row
        requests (v2 binary: the generator's cost is not the point here); each process's
        proportional and resident set sizes after the load."""
        c = self.config
        pool = RowPool(package, rows=8192)
        bodies = pool.bodies("v2-binary", c.rows, BODIES)
        del pool
        out: dict[str, Any] = {"package": str(package), "duration_s": c.memory_duration_s}
        for workers in (1, 2):
            with ServiceServer(package, ["--workers", str(workers)], log_dir=self.logs,
                               defaults=True) as server:
                result = load.run(load.closed_loop(server.url, bodies, c.clients,
                                                   c.memory_duration_s, c.warmup_s,
                                                   c.timeout_s, "raw"))
                workers_now = worker_pids(server.pid)
                processes: list[dict[str, Any]] = [
                    {"pid": pid, "role": ("worker" if pid in workers_now else
                                          "supervisor" if pid == server.pid else "other"),
                     "pss_bytes": proportional_bytes(pid), "rss_bytes": resident_bytes(pid)}
                    for pid in server_pids(server.pid)]
            out[f"workers_{workers}"] = {"processes": processes, "rows_per_s": result.rows_per_s,
                                         "errors": result.errors}
            self.log(f"memory, {workers} worker(s): " + ", ".join(
                f"{p['role']} {p['pid']} PSS {p['pss_bytes'] / 2**20:,.0f} MiB"
                for p in processes))
        return out


def worker_pids(leader: int) -> list[int]:
    """The service's worker processes: those multiprocessing spawned (several workers; not its
    resource tracker), else the process itself."""
    spawned = []
    for pid in server_pids(leader):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"spawn_main" in handle.read():
                    spawned.append(pid)
        except OSError:
            continue
    return spawned or [leader]


def _line(record: dict[str, Any]) -> str:
    load_text = (f"c={record['concurrency']}" if record["mode"] == "closed"
                 else f"rate={record['offered_rate']:.0f}/s")
    latency = record["latency_ms"]
    name = record["target"] + (f" ({record['variant']})" if "variant" in record else "")
    return (f"{name:<24} {record['rows']:>5.0f} rows {load_text:<11}"
            f" {record['req_per_s']:>8,.0f} req/s {record['rows_per_s']:>9,.0f} rows/s"
            f"  p50 {latency.get('p50', float('nan')):7.2f}  p99 "
            f"{latency.get('p99', float('nan')):7.2f} ms  errors {sum(record['errors'].values())}"
            f"  server {record['server_cpu']:.2f} cores  client {record['client_cpu']:.2f}")


def _steal() -> tuple[int, int]:
    """(steal ticks, all ticks) of the machine so far (the first line of ``/proc/stat``)."""
    with open("/proc/stat") as handle:
        ticks = [int(v) for v in handle.readline().split()[1:]]
    return ticks[7], sum(ticks)


def _steal_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """The share of CPU time the hypervisor gave to others between two ``_steal()`` readings."""
    return (after[0] - before[0]) / max(1, after[1] - before[1])


def machine_info(cpus: int) -> dict[str, Any]:
    import onnxruntime

    model = cpu_model()
    load_average = os.getloadavg()
    return {
        "cores": os.cpu_count(), "usable_cpus": cpus, "cpu": model,
        "kernel": platform.release(), "python": platform.python_version(),
        "onnxruntime": onnxruntime.__version__, "load_average_start": load_average,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "summary": (f"{os.cpu_count()} cores ({model}), {cpus} usable, shared by the servers "
                    f"and the load generator (no pinning); load average at start "
                    f"{load_average[0]:.2f}"),
    }


def _config_dict(config: PeersConfig) -> dict[str, Any]:
    return {key: str(value) if isinstance(value, Path) else value
            for key, value in vars(config).items() if key != "log"}


def main(args: argparse.Namespace) -> int:
    config = config_from(args)
    if config.package is not None and not (config.package / "manifest.json").is_file():
        raise FileNotFoundError(f"{config.package}: not a model package (no manifest.json)")
    results = PeerBench(config).run()
    for path in write_report(results, config.out):
        print(f"wrote {path}")
    return 0
