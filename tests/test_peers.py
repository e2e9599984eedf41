"""The peer comparison (``ctrserve bench peers``): a smoke run against the naive endpoint and the
service in the project's own environment (no package index), the naive endpoint answering what
the service answers, the report's verdicts, the command on an install without the bench extra,
the servers' processes stopped whatever session they moved to, and the service's defaults it
relies on (a worker per CPU, connections spread over them)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from test_loadtest import WITHOUT_BENCH_EXTRA

from ctrserve.loadtest.payloads import RowPool
from ctrserve.loadtest.peer_report import goal_table, markdown
from ctrserve.loadtest.peers import PEER_SERVERS
from ctrserve.loadtest.servers import HOST, ServerProcess, ServiceServer, free_port, server_pids
from ctrserve.service.runtime import usable_cpus
from ctrserve.service.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[1]
MiB = 1 << 20


def _package(trained: dict) -> Path:
    return trained["repo"] / "ctr" / "1"


def _naive(package: Path, log_dir: Path) -> ServerProcess:
    port = free_port()
    server = ServerProcess(
        [sys.executable, "-m", "uvicorn", "naive_app:app", "--host", HOST, "--port", str(port),
         "--log-level", "warning"],
        env={"PEER_MODEL": str(package / "model.onnx"), "PEER_ORT_THREADS": "1",
             "PYTHONPATH": str(PEER_SERVERS)}, log_dir=log_dir, port=port)
    server.ready_path = "/ready"
    return server


def test_the_naive_endpoint_answers_what_the_service_answers(trained, tmp_path):
    package = _package(trained)
    pool = RowPool(package, rows=512, data=trained["rows_file"])
    bodies = [pool.body("v2-json", pool.window(start, rows)) for start, rows in ((0, 1),
                                                                                 (7, 40))]
    with _naive(package, tmp_path) as naive, ServiceServer(package, log_dir=tmp_path) as served:
        for body in bodies:
            answers = [httpx.post(server.url + body.path, content=body.data,
                                  headers=body.headers, timeout=30) for server in (naive, served)]
            assert [a.status_code for a in answers] == [200, 200], answers[1].text
            probabilities = [a.json()["outputs"][0]["data"] for a in answers]
            assert len(probabilities[0]) == body.rows
            np.testing.assert_allclose(*probabilities, atol=1e-5)
        echo = bodies[1]
        answer = httpx.post(naive.url + "/echo", content=echo.data, headers=echo.headers)
        assert answer.json()["outputs"][0]["data"] == [0.0] * echo.rows


def test_bench_peers_smoke_against_the_naive_endpoint_and_the_service(trained, tmp_path):
    out = tmp_path / "peers"
    command = [sys.executable, "-m", "ctrserve", "bench", "peers", "--package",
               str(_package(trained)), "--out", str(out), "--targets",
               "ceiling,echo,naive,service", "--peer-python", f"naive={sys.executable}",
               "--rows", "16", "--clients", "2", "--single-clients", "8", "--idle-rate", "20",
               "--peak-clients", "2,4", "--duration", "0.8", "--warmup", "0.3",
               "--ceiling-seconds", "0.2", "--service-variant", "one worker=--workers 1",
               "--profile"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    targets = results["targets"]
    assert list(targets) == ["ceiling", "echo", "naive", "service"]
    assert {r["rows"] for r in targets["ceiling"]["results"]} == {1, 16}
    runs = [*targets["echo"]["runs"], *targets["naive"]["runs"]]
    for variant in targets["service"]["variants"].values():
        runs += variant["runs"]
    for run in runs:
        assert run["sent"] == run["ok"] + sum(run["errors"].values()), run
        assert run["errors"] == {} and run["ok"] > 0, run
        assert run["server_cpu"] > 0
    defaults = {r["scenario"]: r for r in targets["service"]["variants"]["defaults"]["runs"]}
    assert set(defaults) == {"batch", "single", "idle", "peak", "poisson", "profile-batch",
                             "profile-single"}
    assert isinstance(defaults["profile-single"]["profile"], dict)  # empty without py-spy
    assert defaults["batch"]["rows"] == 16 and defaults["single"]["concurrency"] == 8
    assert defaults["idle"]["offered_rate"] == 20
    peak = max(defaults["batch"]["req_per_s"], defaults["peak"]["req_per_s"])
    assert defaults["poisson"]["offered_rate"] == pytest.approx(0.8 * peak)
    assert set(targets["service"]["variants"]) == {"defaults", "one worker"}

    report = (out / "report.md").read_text()
    for heading in ("## Side by side", "## Goals", "## Every scenario"):
        assert heading in report
    assert "| ctrserve, defaults |" in report and "naive FastAPI + ONNX Runtime" in report
    assert "ctrserve `--workers 1` (one worker)" in report
    goals = [line for line in report.splitlines() if line.startswith("| ") and "x " in line
             and line.endswith(("| met |", "| **missed** |", "| not measured |"))]
    naive = [line for line in goals if "the naive endpoint" in line]
    assert len(naive) == 2 and not any(line.endswith("not measured |") for line in naive)
    assert sum(line.endswith("| - | not measured |") for line in goals) == 3  # MLServer, memory
    assert len(list((out / "logs").glob("naive-*.log"))) == 2  # echo and naive, started apart


def test_bench_peers_without_the_bench_extra_names_what_to_install(tmp_path):
    out = tmp_path / "peers"
    done = subprocess.run([sys.executable, "-c", WITHOUT_BENCH_EXTRA, "bench", "peers", "--out",
                           str(out)], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "ctrserve bench peers: error: aiohttp not installed (the bench extra): "
        "pip install 'ctrserve[bench]'"]
    assert not out.exists()  # stopped before anything ran


def _run(target: str, scenario: str, rows: int, req_per_s: float, p99: float = 20.0,
         server_cpu: float = 0.5, variant: str | None = None, **extra) -> dict:
    run = {"target": target, "scenario": scenario, "rows": rows, "req_per_s": req_per_s,
           "rows_per_s": rows * req_per_s, "latency_ms": {"p99": p99}, "errors": {},
           "server_cpu": server_cpu, "client_cpu": 0.5, "mode": "closed", "concurrency": 8,
           **extra}
    if variant:
        run["variant"] = variant
    return run


def test_the_report_judges_each_goal_from_the_figures():
    config = {"rows": 256, "clients": 8, "single_clients": 64, "idle_rate": 200.0,
              "open_fraction": 0.8, "bound_ms": 60.0, "client": "aiohttp", "warmup_s": 2.0,
              "duration_s": 12.0}
    service = [_run("service", "batch", 256, 800, variant="defaults"),
               _run("service", "single", 1, 7000, p99=75.0, variant="defaults"),
               _run("service", "idle", 1, 200, server_cpu=0.1, variant="defaults"),
               _run("service", "poisson", 256, 640, p99=41.0, variant="defaults",
                    offered_rate=640.0, peak=800.0, fraction=0.8)]
    results = {
        "config": config,
        "targets": {
            "naive": {"versions": {}, "threads": 2, "runs": [  # two rounds: their medians
                _run("naive", "batch", 256, 500), _run("naive", "single", 1, 6000),
                _run("naive", "batch", 256, 700, p99=30.0), _run("naive", "single", 1, 6000)]},
            "service": {"versions": {}, "variants": {"defaults": {"flags": [],
                                                                   "runs": service}}},
        },
        "memory": {"package": "p", "duration_s": 1.0, "workers_1": {"processes": [
            {"pid": 1, "role": "worker", "pss_bytes": 1000 * MiB, "rss_bytes": 1000 * MiB}]},
            "workers_2": {"processes": [
                {"pid": 2, "role": "supervisor", "pss_bytes": 40 * MiB, "rss_bytes": 60 * MiB},
                {"pid": 3, "role": "other", "pss_bytes": 6 * MiB, "rss_bytes": 9 * MiB},
                {"pid": 4, "role": "worker", "pss_bytes": 550 * MiB, "rss_bytes": 990 * MiB},
                {"pid": 5, "role": "worker", "pss_bytes": 560 * MiB, "rss_bytes": 990 * MiB}]}},
    }
    rows = {line.split(" | ")[0][2:]: line for line in goal_table(results)[2:]}
    assert rows["256 rows x 8 clients: >= 1.15x the naive endpoint"].endswith(
        "| 1.33x (204,800 against 153,600 rows/s) | met |")
    assert rows["1 row x 64 clients: >= 1.3x the naive endpoint"].endswith("| **missed** |")
    assert rows["256 rows x 8 clients: >= 1.8x MLServer"].endswith("| - | not measured |")
    assert rows["p99 <= 60 ms in every closed-loop scenario"].endswith(
        "| batch 20.0 ms, single 75.0 ms | **missed** |")
    assert rows["server CPU at 200 single-row req/s <= 0.15 cores"].endswith("| met |")
    assert "p99 41.0 ms at 640.0 req/s (80% of the peak 800.0 req/s) | met |" in rows[
        "Poisson arrivals of 256-row requests at 80% of the service's closed-loop peak: "
        "p99 <= 60 ms"]
    # The workers only: the supervisor is not a worker.
    assert rows["a full-table package at Criteo's sizes: two workers' PSS summed <= 1.2x one "
                "worker's"].endswith("| 1.11x (1,110 MiB against 1,000 MiB) | met |")
    results["machine"] = {"date": "d", "summary": "s", "onnxruntime": "1", "python": "3"}
    results["model"] = {"package": "p", "tables": 5, "dense": 2}
    assert "| ctrserve, defaults | 204,800 (20) | 7,000 (75) | 0.10 |" in markdown(results)


LEAVES_ITS_GROUP = textwrap.dedent("""
    import http.server, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"],
                             start_new_session=True)
    print(child.pid, flush=True)
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])),
                           http.server.SimpleHTTPRequestHandler).serve_forever()
""")


def test_a_server_is_stopped_with_the_processes_that_left_its_group(tmp_path):
    port = free_port()
    server = ServerProcess([sys.executable, "-c", LEAVES_ITS_GROUP, str(port)],
                           log_dir=tmp_path, port=port)
    with server:
        pids = server_pids(server.pid)
        child = int(server.log().split()[0])
        assert child in pids and server.pid in pids
        assert server.cpu_seconds() >= 0 and server.resident_bytes() > 0
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    state = Path(f"/proc/{child}/stat").read_text().split()[2] if Path(
        f"/proc/{child}").exists() else "gone"
    assert state in ("gone", "Z")


def test_the_defaults_run_a_worker_per_cpu_and_spread_connections_over_them(trained, tmp_path):
    assert ServiceSettings().workers == usable_cpus()[0]
    with ServiceServer(_package(trained), ["--workers", "2"], log_dir=tmp_path,
                       defaults=True) as server:
        workers = [pid for pid in server_pids(server.pid) if pid != server.pid]
        # 32 keep-alive connections open at once, as a load generator's: each stays with the
        # worker that accepted it, and the kernel hands them to both workers' sockets.
        connections = [socket.create_connection((HOST, server.port)) for _ in range(32)]
        try:
            owners = [_worker_of(connection, server.port) for connection in connections]
            again = [_worker_of(connection, server.port) for connection in connections]
        finally:
            for connection in connections:
                connection.close()
    assert owners == again
    counts = {pid: owners.count(pid) for pid in set(owners)}
    assert len(counts) == 2 and set(counts) <= {str(pid) for pid in workers}
    assert min(counts.values()) >= 4, counts


def _worker_of(connection: socket.socket, port: int) -> str:
    """The PID of the worker that answers a request on this keep-alive connection."""
    connection.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        answer += connection.recv(65536)
    head = answer.split(b"\r\n\r\n")[0].decode().lower()
    return next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                if line.startswith("x-worker-pid:"))
