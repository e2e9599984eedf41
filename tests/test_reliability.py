"""Reliability and security against a real server: fuzzed routes, bad input, overload, SIGTERM
and SIGKILL under load, and model names that try to leave the repository. Each test prints its
counts (run with ``-s`` to see them)."""

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from servers import HOST, ServiceProcess, request_rows

from ctrserve.service.errors import ServiceError
from ctrserve.service.features import RawColumns
from ctrserve.service.v2_codec import ModelSchema, decode_infer_request

SCORE = "/v1/models/ctr/score"
TOKEN = "fuzz-s3cret-token"


@pytest.fixture(scope="module")
def guarded(trained):
    """A server with an admin token (so fuzzing cannot unload the model) and small limits."""
    with ServiceProcess(trained["repo"], "--admin-token", TOKEN, "--max-request-rows", "500",
                        "--max-body-bytes", "200000", "--body-timeout-s", "1") as server:
        yield server


def test_fuzzed_routes_never_answer_5xx(guarded):
    schema = schemathesis.openapi.from_url(guarded.url + "/openapi.json")
    counts: dict[str, dict[int, int]] = {}

    def fuzz(operation) -> None:
        seen = counts.setdefault(operation.label, {})

        @settings(max_examples=200, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def call(case) -> None:
            # The served model and version: random names would all stop at a 404.
            if "name" in (case.path_parameters or {}):
                case.path_parameters["name"] = "ctr"
            if "version" in (case.path_parameters or {}):
                case.path_parameters["version"] = "1"
            response = case.call(base_url=guarded.url, timeout=30)
            seen[response.status_code] = seen.get(response.status_code, 0) + 1
            assert response.status_code < 500, (case.path, case.body, response.text)

        call()

    for result in schema.get_all_operations():
        fuzz(result.ok())
    for label, statuses in sorted(counts.items()):
        print(f"fuzz {label}: {sum(statuses.values())} cases, "
              f"statuses {dict(sorted(statuses.items()))}")
    assert len(counts) >= 10
    with_inputs = [label for label in counts if "{" in label]
    assert all(sum(counts[label].values()) >= 200 for label in with_inputs)
    # The bodies reached the model: some were scored, some refused as the client's mistake.
    score = counts["POST /v1/models/{name}/score"]
    assert score.get(200, 0) > 0 and score.get(400, 0) > 0
    assert httpx.get(guarded.url + "/v2/health/ready").status_code == 200


#: schemathesis's configuration for the all-checks runs. The path parameters are the served
#: model and version, so that bodies reach the model. A body the schema allows may still be
#: refused (400) on the routes listed: JSON Schema cannot say which columns or inputs a model
#: has, that columns have one length or that a v2 tensor's shape matches its data, and its
#: "integer" admits 2.0, which the server refuses as a version; every other check, and this one
#: on every other route, runs as schemathesis defines it.
SCHEMATHESIS_CONFIG = """
[parameters]
"path.name" = "ctr"
"path.version" = "1"

[generation]
database = "none"

[[operations]]
include-path-regex = "/(score|infer|rank|load)$"
checks.positive_data_acceptance.expected-statuses = ["2xx", "400", "401", "404"]
"""
SCHEMATHESIS_EXAMPLES = 20


def _schemathesis(url: str, directory, *flags: str) -> subprocess.CompletedProcess:
    """``schemathesis run --checks all`` (every phase: examples, coverage, fuzzing, stateful)
    against the server's own /openapi.json, run in ``directory`` (its caches go there)."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "schemathesis.toml"
    config.write_text(SCHEMATHESIS_CONFIG)
    command = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "run",
               f"{url}/openapi.json", "--checks", "all", "--max-examples",
               str(SCHEMATHESIS_EXAMPLES), "--workers", "1", "--no-color", *flags]
    return subprocess.run(command, cwd=directory, capture_output=True, text=True, timeout=600)


def _summary(run: subprocess.CompletedProcess) -> str:
    """schemathesis's counts: operations tested, cases generated and passed."""
    return "schemathesis: " + ", ".join(
        line.strip() for line in run.stdout.splitlines()
        if re.match(r"\s*(Tested: \d+|\d+ generated)", line))


@pytest.mark.parametrize("seed", [1, 2])
def test_schemathesis_all_checks_pass_on_every_operation(guarded, tmp_path, seed):
    """Every operation of the document, without the admin token: the statuses, media types,
    headers and bodies of the answers are the declared ones, 405s carry Allow, invalid data is
    refused and valid data accepted."""
    run = _schemathesis(guarded.url, tmp_path, "--seed", str(seed))
    print(_summary(run))
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
    operations = len(httpx.get(guarded.url + "/openapi.json").json()["paths"])
    assert re.search(rf"Tested: {operations}\b", run.stdout), run.stdout[-3000:]
    assert httpx.get(guarded.url + "/v2/health/ready").status_code == 200


def test_schemathesis_all_checks_pass_on_the_repository_routes_with_the_token(trained,
                                                                              tmp_path):
    """The repository routes with the admin token (on a copy of the repository: they unload
    and load the model)."""
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    with ServiceProcess(repo, "--admin-token", TOKEN, "--max-body-bytes", "200000",
                        "--body-timeout-s", "1") as server:
        run = _schemathesis(server.url, tmp_path / "schemathesis", "--seed", "1",
                            "--header", f"Authorization: Bearer {TOKEN}",
                            "--include-path-regex", "^/v2/repository/")
    print(_summary(run))
    assert run.returncode == 0, run.stdout[-12000:] + run.stderr[-2000:]
    assert re.search(r"Tested: 3\b", run.stdout), run.stdout[-3000:]


@pytest.mark.parametrize("body,status,message", [
    (b'{"rows": [{"I1": NaN}]}', 400, "not valid JSON"),
    (b'{"rows": [{"I1": Infinity}]}', 400, "not valid JSON"),
    (b'{"rows": [{"I1": 1e400}]}', 400, "not valid JSON: number is infinity"),
    (b'{"rows": [{"C1": 99999999999999999999999}]}', 400, "column 'C1'"),
    (b'{"rows": [{"C1": -5}]}', 200, ""),
    (b'{"rows": []}', 200, ""),
    (b'{"rows": [{}]}', 200, ""),
    (b'{"rows": [{"I1": 2, "unknown": 1}]}', 400, "unknown column 'unknown'"),
    (b'{"rows": [' + b",".join([b"{}"] * 501) + b"]}", 413, "501 rows"),
    (b'{"rows": [{"C3": "' + b"x" * 250_000 + b'"}]}', 413, "limit"),
])
def test_explicit_bad_input(guarded, body, status, message):
    response = httpx.post(guarded.url + SCORE, content=body, timeout=30)
    assert response.status_code == status, response.text
    if message:
        assert message in response.json()["error"]
    elif status == 200:
        assert len(response.json()["probabilities"]) == body.count(b"{") - 1


def test_a_slow_body_is_cut_off(guarded):
    """Headers, then a body trickling in a byte every 0.3 s: 408 after the 1 s body deadline."""
    port = int(guarded.url.rsplit(":", 1)[1])
    with socket.create_connection((HOST, port), timeout=10) as connection:
        connection.sendall(b"POST /v1/models/ctr/score HTTP/1.1\r\nHost: x\r\n"
                           b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
        started = time.monotonic()
        reply = b""
        for _ in range(40):
            try:
                connection.sendall(b" ")
            except OSError:
                break
            connection.settimeout(0.3)
            try:
                reply += connection.recv(4096)
            except TimeoutError:
                continue
            if reply:
                break
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert time.monotonic() - started < 5


def test_model_names_cannot_leave_the_repository(trained, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    outside = tmp_path / "outside"
    shutil.copytree(trained["repo"] / "ctr", outside / "evil")
    (repo / "evil").symlink_to(outside / "evil")
    (repo / "ctr" / "9").symlink_to(outside / "evil" / "1")
    token = {"Authorization": f"Bearer {TOKEN}"}
    log_server = ServiceProcess(repo, "--admin-token", TOKEN, "--log-level", "info")
    with log_server as server:
        attempts = {
            "dotdot score": httpx.post(server.url + "/v1/models/%2E%2E/score", json={"rows": []}),
            "dotdot load": httpx.post(server.url + "/v2/repository/models/%2E%2E/load",
                                      headers=token),
            "encoded slash": httpx.post(server.url + "/v2/repository/models/..%2Fetc/load",
                                        headers=token),
            "symlinked model": httpx.post(server.url + "/v2/repository/models/evil/load",
                                          headers=token),
            "symlinked version": httpx.post(server.url + "/v2/repository/models/ctr/load",
                                            headers=token, json={"parameters": {"version": 9}}),
            "no token": httpx.post(server.url + "/v2/repository/models/ctr/unload"),
            "wrong token": httpx.post(server.url + "/v2/repository/models/ctr/unload",
                                      headers={"Authorization": "Bearer nope"}),
        }
        index = httpx.post(server.url + "/v2/repository/index", headers=token).json()
        still = httpx.post(server.url + SCORE, json={"rows": [{}]})
    for name, response in attempts.items():
        print(f"{name}: {response.status_code} {response.text[:100]}")
    assert {r.status_code for n, r in attempts.items() if "token" not in n} <= {404}
    assert attempts["no token"].status_code == attempts["wrong token"].status_code == 401
    assert [entry["name"] for entry in index] == ["ctr"]
    assert 9 not in index[0]["versions_on_disk"] or index[0]["version"] == "1"
    assert still.status_code == 200 and still.json()["version"] == 1
    assert TOKEN not in log_server.log_path.read_text()


async def _hammer(url: str, body: dict, clients: int, seconds: float) -> dict[str, list]:
    """``clients`` loops posting ``body`` for ``seconds``; outcomes by kind, with latencies."""
    outcomes: dict[str, list] = {}
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:
        async def loop() -> None:
            for _ in range(100_000):
                if time.monotonic() > deadline:
                    return
                started = time.monotonic()
                try:
                    response = await client.post(SCORE, json=body)
                    kind = str(response.status_code)
                except httpx.ConnectError:
                    kind = "refused"
                    await asyncio.sleep(0.05)
                except httpx.HTTPError as error:
                    kind = type(error).__name__
                outcomes.setdefault(kind, []).append(time.monotonic() - started)

        await asyncio.gather(*(loop() for _ in range(clients)))
    return outcomes


def _counts(outcomes: dict[str, list]) -> dict[str, int]:
    return {kind: len(times) for kind, times in sorted(outcomes.items())}


def test_overload_is_shed_at_once_and_the_service_recovers(trained):
    body = {"rows": request_rows(trained["rows_file"])[:64]}
    with ServiceProcess(trained["repo"], "--max-queue-rows", "512",
                        "--max-queue-delay-us", "2000") as server:
        outcomes = asyncio.run(_hammer(server.url, body, clients=48, seconds=6))
        after = httpx.post(server.url + SCORE, json=body, timeout=30)
        depth = httpx.get(server.url + "/metrics").text
    counts = _counts(outcomes)
    print(f"overload, 48 clients x 64 rows for 6 s, queue of 512 rows: {counts}")
    assert set(counts) <= {"200", "503"}
    assert counts.get("503", 0) > 0 and counts.get("200", 0) > 0
    # Refusals do not wait in the queue: the median refusal is answered sooner than the median
    # answer (relative, so that a loaded machine slowing both does not decide it).
    rejected, answered = sorted(outcomes["503"]), sorted(outcomes["200"])
    print(f"median refusal {rejected[len(rejected) // 2]:.3f} s, median answer "
          f"{answered[len(answered) // 2]:.3f} s")
    assert rejected[len(rejected) // 2] < answered[len(answered) // 2]
    assert after.status_code == 200
    assert re.search(r'ctrserve_queue_rows\{model="ctr"\} 0\.0', depth)


def test_sigterm_under_load_answers_every_accepted_request(trained):
    body = {"rows": request_rows(trained["rows_file"])[:16]}
    server = ServiceProcess(trained["repo"], "--log-level", "info")
    with server:
        loop_thread = threading.Thread(target=lambda: results.update(
            asyncio.run(_hammer(server.url, body, clients=16, seconds=4))))
        results: dict = {}
        loop_thread.start()
        time.sleep(1.5)
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(timeout=30)
        loop_thread.join(timeout=60)
    counts = _counts(results)
    match = re.search(r"(\d+) accepted, (\d+) answered", server.log_path.read_text())
    print(f"SIGTERM after 1.5 s under 16 clients: client outcomes {counts}; server: "
          f"{match.group(0) if match else 'no ledger line'}")
    # uvicorn re-raises the signal once its graceful shutdown is done.
    assert server.process.returncode in (0, -signal.SIGTERM)
    assert match and match.group(1) == match.group(2)
    assert int(match.group(2)) >= counts.get("200", 0) > 0
    unexpected = set(counts) - {"200", "503", "refused", "RemoteProtocolError", "ReadError"}
    assert not unexpected
    # A request the server never read (its connection closed as the server stopped) is not an
    # accepted one; every accepted one was answered, and all answers the clients saw were 200s.
    assert counts.get("200", 0) == int(match.group(2))


def test_a_killed_worker_loses_only_its_in_flight_requests(trained):
    body = {"rows": request_rows(trained["rows_file"])[:8]}
    with ServiceProcess(trained["repo"], "--workers", "2") as server:
        pids = {httpx.post(server.url + SCORE, json=body).headers["x-worker-pid"]
                for _ in range(30)}
        assert len(pids) == 2
        victim = int(sorted(pids)[0])
        results: dict = {}
        loop_thread = threading.Thread(target=lambda: results.update(
            asyncio.run(_hammer(server.url, body, clients=8, seconds=5))))
        loop_thread.start()
        time.sleep(1.5)
        os.kill(victim, signal.SIGKILL)
        loop_thread.join(timeout=60)
        later = [httpx.post(server.url + SCORE, json=body, timeout=30) for _ in range(20)]
    counts = _counts(results)
    failed = sum(n for kind, n in counts.items() if kind != "200")
    print(f"SIGKILL of one of 2 workers under 8 clients: {counts}")
    assert failed <= 8  # at most the requests in flight on the killed worker
    assert counts["200"] > 50
    assert all(r.status_code == 200 for r in later)


V2_SCHEMA = ModelSchema(n_dense=2, tables=("C1", "C2"), table_rows=np.array([5, 7], np.uint64),
                        dense_columns=("I1", "I2"), categorical_kinds={"C1": "int", "C2": "hex"})
V2_NAMES = st.sampled_from(["sparse", "dense", "I1", "I2", "C1", "C2", "nope"])
V2_TYPES = st.sampled_from(["INT64", "FP32", "FP64", "INT32", "BYTES", "BOOL", "FP16", "X"])


@st.composite
def binary_infer_bodies(draw) -> tuple[bytes, str | None]:
    """Triton binary requests, mostly well formed, with sizes, shapes, types and payloads that
    may disagree with each other."""
    inputs, payload = [], b""
    for _ in range(draw(st.integers(0, 4))):
        shape = draw(st.lists(st.integers(-2, 6), min_size=0, max_size=3))
        data = draw(st.binary(max_size=96))
        size = draw(st.one_of(st.just(len(data)), st.integers(-4, 120)))
        spec = {"name": draw(V2_NAMES), "datatype": draw(V2_TYPES), "shape": shape,
                "parameters": {"binary_data_size": size}}
        if draw(st.booleans()):
            spec["data"] = draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=8))
        inputs.append(spec)
        payload += data
    header = json.dumps({"inputs": inputs, "id": draw(st.text(max_size=4))}).encode()
    header += draw(st.binary(max_size=3))  # sometimes trailing junk
    length = draw(st.one_of(st.just(str(len(header))), st.integers(-5, len(header) + 200)
                            .map(str), st.none(), st.text(max_size=3)))
    return header + payload + draw(st.binary(max_size=8)), length


@settings(max_examples=2000, deadline=None, database=None, phases=[Phase.generate])
@given(body=binary_infer_bodies())
def test_the_binary_v2_codec_refuses_what_it_cannot_read_with_a_client_error(body):
    try:
        decoded = decode_infer_request(*body, V2_SCHEMA, 1000)
    except ServiceError as error:
        assert 400 <= error.status < 500, error.message
        return
    features = decoded.features
    if isinstance(features, RawColumns):
        assert all(len(v) == features.rows for v in features.categorical.values())
    else:
        assert features.sparse.shape == (features.rows, 2)
        assert (features.sparse >= 0).all() and (features.sparse < [5, 7]).all()


@pytest.mark.parametrize("damage", ["deleted model file", "truncated model file",
                                    "unknown format_version"])
def test_a_damaged_new_version_leaves_the_old_one_serving(trained, tmp_path, damage):
    from ctrserve.export.exporter import export_checkpoint

    repo = tmp_path / "repo"
    shutil.copytree(trained["repo"], repo)
    new = export_checkpoint(trained["checkpoint"], repo, "ctr", version=2, log=lambda _: None)
    if damage == "deleted model file":
        (new / "model.onnx").unlink()
    elif damage == "truncated model file":
        (new / "model.onnx").write_bytes((new / "model.onnx").read_bytes()[:1000])
    else:
        manifest = json.loads((new / "manifest.json").read_text())
        (new / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    body = {"rows": request_rows(trained["rows_file"])[:4]}
    with ServiceProcess(repo, env={"CTRSERVE_VERSIONS": '{"ctr": 1}'}) as server:
        refused = httpx.post(server.url + "/v2/repository/models/ctr/load",
                             json={"parameters": {"version": 2}}, timeout=60)
        served = [httpx.post(server.url + SCORE, json=body) for _ in range(5)]
    print(f"{damage}: load answered {refused.status_code} {refused.json()['error'][:120]}")
    assert refused.status_code == 400 and "version 2 failed to load" in refused.json()["error"]
    assert [(r.status_code, r.json()["version"]) for r in served] == [(200, 1)] * 5
