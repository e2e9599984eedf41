"""Load tests and the serving benchmark, in smoke versions: the driver and the overload run for a
few seconds against real servers, locust headless in a subprocess (importing locust here would
monkey-patch the test process through gevent), the generator's loops against a deliberately slow
server, and ``ctrserve bench serve`` on an install without the bench extra."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from servers import ServiceProcess

from ctrserve.loadtest import load
from ctrserve.loadtest.payloads import RowPool, candidate_counts
from ctrserve.loadtest.profiles import summarise_profile
from ctrserve.loadtest.servers import ServerProcess, free_port
from ctrserve.models.schema import RawBatch
from ctrserve.service.friendly import decode_score_request
from ctrserve.service.v2_codec import HEADER_LENGTH, ModelSchema, decode_infer_request

ROOT = Path(__file__).resolve().parents[1]


def _package(trained: dict) -> Path:
    return trained["repo"] / "ctr" / "1"


def _ordered(latency: dict) -> bool:
    keys = ["p50", "p90", "p99", "p99.9", "max"]
    return all(latency[a] <= latency[b] for a, b in itertools.pairwise(keys))


def test_every_api_body_carries_the_same_rows(trained):
    pool = RowPool(_package(trained), rows=512, data=trained["rows_file"])
    index = pool.window(290, 20)  # wraps around the 300 rows of the file
    binary = pool.body("v2-binary", index)
    schema = ModelSchema.of(pool.transform)
    decoded = decode_infer_request(binary.data, binary.headers[HEADER_LENGTH], schema, 1000)
    assert decoded.binary_output and binary.rows == 20
    np.testing.assert_array_equal(decoded.features.sparse, pool.sparse[index])
    np.testing.assert_array_equal(decoded.features.dense, pool.dense[index])
    for api in ("columns", "rows"):
        body = pool.body(api, index)
        features = decode_score_request(body.data, pool.transform, 1000)
        transformed = pool.transform.transform(RawBatch(
            labels=None, dense=features.dense, categorical=features.categorical))
        np.testing.assert_array_equal(transformed.sparse, pool.sparse[index])
        np.testing.assert_allclose(transformed.dense, pool.dense[index])
    synthesised = RowPool(_package(trained), rows=2000)
    assert (synthesised.sparse != 1).mean() > 0.9  # values the vocabulary knows, not OOV
    assert 0 < (synthesised.sparse == 0).mean() < 0.2  # a few missing
    counts = candidate_counts(np.random.default_rng(0), 20000)
    assert 240 < counts.mean() < 300 and np.median(counts) < counts.mean()  # long tail


SLOW_SERVER = textwrap.dedent("""
    import asyncio, sys
    lock = None
    refuse_every_other = sys.argv[2] == "refuse-every-other"
    answered = 0
    async def handle(reader, writer):
        global answered
        while True:
            head = await reader.readuntil(b"\\r\\n\\r\\n")
            length = 0
            for line in head.split(b"\\r\\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            answered += 1
            if refuse_every_other and answered % 2 == 0:  # at once, as a shedding server does
                writer.write(b"HTTP/1.1 503 Service Unavailable\\r\\nContent-Length: 0\\r\\n\\r\\n")
                continue
            async with lock:  # one request at a time, 50 ms each: 20 requests/s at most
                await asyncio.sleep(0.05)
            writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\n\\r\\n{}")
    async def main():
        global lock
        lock = asyncio.Lock()
        server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
        await server.serve_forever()
    asyncio.run(main())
""")


class _SlowServer(ServerProcess):
    """One request at a time, 50 ms each; with ``refuse_every_other``, every second request is
    answered 503 at once instead."""

    kind = "slow"

    def __init__(self, log_dir: Path, refuse_every_other: bool = False) -> None:
        port = free_port()
        mode = "refuse-every-other" if refuse_every_other else "answer-all"
        super().__init__([sys.executable, "-c", SLOW_SERVER, str(port), mode], None, None,
                         log_dir, port)


def test_open_loop_times_latency_from_the_schedule_not_the_send(trained, tmp_path):
    pool = RowPool(_package(trained), rows=64)
    bodies = pool.bodies("v2-binary", 4, 8)
    with _SlowServer(tmp_path) as server:
        closed = load.run(load.closed_loop(server.url, bodies, 1, 1.0, 0.2))
        # Twice what the server can do: the queue grows for the whole run, and the latency
        # seen from each scheduled send time shows it.
        opened = load.run(load.open_loop(server.url, bodies, 40.0, 2.0, 0.0))
    assert closed.errors == {} and 45 < closed.latency_ms["p50"] < 150
    assert 16 <= closed.req_per_s <= 21
    assert opened.sent == opened.ok + opened.error_count and opened.errors == {}
    assert opened.req_per_s < 25  # the server's capacity, not the offered 40/s
    assert opened.latency_ms["p99"] > 10 * closed.latency_ms["p50"]  # > 0.5 s of queueing
    assert _ordered(opened.latency_ms) and opened.send_lag_ms["p99"] < 100


def test_refusals_are_counted_and_timed_apart_from_answers(trained, tmp_path):
    pool = RowPool(_package(trained), rows=64)
    bodies = pool.bodies("v2-binary", 4, 8)
    with _SlowServer(tmp_path, refuse_every_other=True) as server:
        closed = load.run(load.closed_loop(server.url, bodies, 1, 1.0, 0.2))
        opened = load.run(load.open_loop(server.url, bodies, 20.0, 2.0, 0.0))
    for result in (closed, opened):
        assert set(result.errors) == {"http_503"} and result.ok >= 5, result
        assert result.sent == result.ok + result.errors["http_503"]
        assert abs(result.ok - result.errors["http_503"]) <= 0.2 * result.sent + 1
        assert result.latency_ms["p50"] >= 50  # answered after the server's 50 ms
        assert result.error_latency_ms["http_503"]["p50"] < 25  # refused at once
        assert _ordered(result.error_latency_ms["http_503"])


def test_overload_run_counts_every_request_and_samples_memory(trained, tmp_path):
    out = tmp_path / "overload"
    command = [sys.executable, "-m", "ctrserve.loadtest.overload", "--package",
               str(_package(trained)), "--data", str(trained["rows_file"]), "--rows", "16",
               "--clients", "4", "--probe-s", "1", "--warmup", "0.3", "--factor", "4",
               "--seconds", "2", "--max-concurrency", "8", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "overload.json").read_text())
    assert report["offered_req_s"] == pytest.approx(4 * report["capacity_req_s"])
    assert set(report["before"]["counts"]) == {"200"}  # 4 clients stay under the limit of 8
    # Recovery: answered again (the first requests may still meet the overload's connections).
    assert report["after"]["counts"]["200"] > 0 and report["after"]["rate"] > 0
    for phase in ("before", "overload", "after"):
        assert _ordered(report[phase]["accepted_latency_ms"])
    overload = report["overload"]
    scheduled = sum(overload["counts"].values())  # every request has exactly one outcome
    expected = 2 * report["offered_req_s"]
    assert abs(scheduled - expected) < 4 * expected**0.5 + 5, (scheduled, expected)
    assert overload["counts"]["200"] > 0 and overload["counts"].get("http_503", 0) > 0
    assert overload["rejected_latency_ms"]["p50"] > 0
    assert len(report["rss_mib"]) == 2  # one sample a second
    assert report["rss_mib"][0][0] < report["rss_mib"][1][0] < 2
    assert all(mib > 20 for _, mib in report["rss_mib"])  # the service's group, in MiB


#: Runs the ``ctrserve`` command with the bench extra's modules made unimportable (a ``None``
#: entry in ``sys.modules`` makes ``import`` raise ModuleNotFoundError), as on a base install.
WITHOUT_BENCH_EXTRA = textwrap.dedent("""
    import sys
    for name in ("aiohttp", "locust", "matplotlib"):
        sys.modules[name] = None
    from ctrserve.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_bench_serve_without_the_bench_extra_names_what_to_install(trained, tmp_path):
    command = [sys.executable, "-c", WITHOUT_BENCH_EXTRA, "bench", "serve"]
    helped = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60,
                            cwd=ROOT)
    assert helped.returncode == 0 and "--package" in helped.stdout, helped.stderr
    out = tmp_path / "bench"
    done = subprocess.run([*command, "--package", str(_package(trained)), "--out", str(out)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "ctrserve bench serve: error: aiohttp and matplotlib not installed (the bench extra): "
        "pip install 'ctrserve[bench]'"]
    assert not out.exists()  # stopped before anything ran


def test_bench_serve_smoke_against_real_servers(trained, tmp_path):
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "ctrserve", "bench", "serve", "--package",
               str(_package(trained)), "--data", str(trained["rows_file"]), "--out", str(out),
               "--experiments", "ceiling,generator,closed,open", "--batching", "on",
               "--rows", "32", "--open-rows", "27", "--apis", "v2-binary,columns",
               "--concurrency", "4", "--single-clients", "16", "--open-concurrency", "4",
               "--fractions", "0.5", "--refine-steps", "0", "--duration", "0.8",
               "--warmup", "0.3", "--ceiling-seconds", "0.2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    experiments = results["experiments"]
    if (os.cpu_count() or 1) >= 2:
        assert "pinned to core 0" in results["machine"]["pinning"]

    ceiling = {(r["what"], r["rows"]): r["rows_per_s"] for r in experiments["ceiling"]}
    assert set(ceiling) == {(w, n) for w in ("session", "transform + session")
                            for n in (1, 27, 32)}
    assert all(v > 0 for v in ceiling.values())

    runs = [*experiments["generator"], *experiments["closed"],
            *experiments["open"]["sustained"], *experiments["open"]["poisson"]]
    for record in runs:
        assert record["sent"] == record["ok"] + sum(record["errors"].values()), record
        assert record["errors"] == {} and record["ok"] > 0, record
        assert _ordered(record["latency_ms"]), record
        assert record["rows_per_s"] == pytest.approx(record["req_per_s"] * record["rows"])
        assert 0 <= record["server_core_steal"] <= 1 and record["server_cpu"] > 0
    targets = {(r["target"], r["api"], r["rows"]) for r in experiments["closed"]}
    assert targets == {(t, a, 32) for t in ("service", "parse-only")
                       for a in ("v2-binary", "columns")}
    served = [r for r in runs if r.get("target") == "service"]
    assert all(r["batches"] > 0 and r["rows_per_batch"] >= 1 for r in served)
    assert experiments["generator"][0]["target"] in ("nginx", "null-server")
    poisson = experiments["open"]["poisson"][0]
    assert poisson["offered_rate"] == pytest.approx(
        0.5 * experiments["open"]["max_sustained_on"])
    assert poisson["send_lag_ms"]["p99"] >= 0

    report = (out / "report.md").read_text()
    assert "## Goals" in report and "pinned to core" in report
    assert "ms for 27-row requests at 80%" not in report  # 0.8 was not among the fractions
    for name in ("latency_vs_load.png", "throughput_vs_concurrency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_locust_headless_runs_the_mix_against_a_real_server(trained, tmp_path):
    stats = tmp_path / "locust"  # locust adds .json
    env = {**os.environ, "CTRSERVE_LOCUST_PACKAGE": str(_package(trained)),
           "CTRSERVE_LOCUST_DATA": str(trained["rows_file"])}
    locust = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
              "--headless", "-u", "6", "-r", "6", "--run-time", "3s", "--stop-timeout", "5",
              "--only-summary", "--loglevel", "WARNING"]
    with ServiceProcess(trained["repo"], "--max-queue-delay-us", "2000") as server:
        done = subprocess.run([*locust, "--host", server.url, "--json-file", str(stats)],
                              env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "rank entities off" in done.stdout
    by_name = {entry["name"]: entry
               for entry in json.loads(stats.with_suffix(".json").read_text())}
    assert set(by_name) == {"rank candidates (columns)", "single row (rows)", "v2 binary"}
    for entry in by_name.values():
        assert entry["num_requests"] > 0 and entry["num_failures"] == 0, entry

    refused = subprocess.run([*locust, "--host", "http://example.invalid:8000"], env=env,
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode != 0
    assert "only targets loopback" in refused.stdout + refused.stderr


def test_profiles_are_grouped_by_the_innermost_known_frame(tmp_path):
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "run (asyncio/runners.py:1);_compute (ctrserve/service/batcher.py:2);"
        "run (onnxruntime/capi/onnxruntime_inference_collection.py:3) 6\n"
        "run (asyncio/runners.py:1);_compute (ctrserve/service/batcher.py:2);"
        "transform (ctrserve/models/transform.py:9) 3\n"
        "run (asyncio/runners.py:1);handle (uvicorn/protocols/http/httptools_impl.py:5) 1\n")
    areas = summarise_profile(raw)
    assert areas == {"ONNX Runtime session": 0.6, "feature transform": 0.3,
                     "HTTP server and framework": 0.1}


def test_decode_cost_times_decoding_and_the_transform_per_request_size(trained):
    from ctrserve.loadtest.decode_cost import measure

    results = measure(_package(trained), [1, 64], seconds=0.05)
    assert [(r["what"], r["rows"]) for r in results] == [
        ("decode", 1), ("transform", 1), ("decode", 64), ("transform", 64)]
    assert all(r["us_per_request"] > 0 for r in results)
    decode = {r["rows"]: r["us_per_request"] for r in results if r["what"] == "decode"}
    assert decode[64] > decode[1]  # decoding grows with the rows
