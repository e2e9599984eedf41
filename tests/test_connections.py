"""Connections that cannot exhaust the server, and request bodies in any encoding a client sends.

Real servers on free loopback ports (``tests/servers.py``). A half-open connection is a raw
socket that sends part of a request head and then nothing; the good traffic beside it opens a
new connection per request, so it needs the server to accept while the half-open ones are held.
Each test prints its figures (run with ``-s``); the assertions hold on a loaded 2-core machine.
"""

from __future__ import annotations

import gzip
import resource
import selectors
import socket
import statistics
import threading
import time
import zlib
from dataclasses import dataclass, field

import httpx
import numpy as np
import psutil
import pytest
import tritonclient.http as triton
from servers import HOST, ServiceProcess, request_rows

SCORE = "/v1/models/ctr/score"
#: The start of a request head that never ends.
PARTIAL_HEAD = b"POST /v1/models/ctr/score HTTP/1.1\r\nHost: ctrserve\r\nContent-Type: applic"
#: The server's soft open-file limit in the file-limit test (its hard limit is left as is).
SERVER_SOFT_FILE_LIMIT = 256
HALF_OPEN = 400
HEADER_TIMEOUT_S = 2.0
KEEPALIVE_TIMEOUT_S = 1


@dataclass
class Traffic:
    """Good requests' outcomes: latencies of the answered ones, counts of everything else."""

    latencies: list[float] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    def summary(self) -> str:
        if not self.latencies:
            return f"outcomes {self.outcomes}, none answered"
        ordered = sorted(self.latencies)
        p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
        return (f"outcomes {self.outcomes}; answered latency p50 "
                f"{statistics.median(ordered) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms, "
                f"max {ordered[-1] * 1000:.0f} ms")


def good_traffic(url: str, body: dict, seconds: float, clients: int = 2) -> Traffic:
    """``clients`` threads sending scoring requests for ``seconds``, each on a new connection
    (``httpx.post``), with a 5 s limit per request."""
    traffic = Traffic()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client() -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                response = httpx.post(url + SCORE, json=body, timeout=5)
                outcome = str(response.status_code)
            except httpx.HTTPError as error:
                outcome = type(error).__name__
            with lock:
                traffic.count(outcome)
                if outcome == "200":
                    traffic.latencies.append(time.monotonic() - started)
                else:
                    time.sleep(0.05)  # a refused client retries, but not in a tight loop

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 10)
    return traffic


def open_half_open(port: int, count: int, head: bytes = PARTIAL_HEAD,
                   ) -> list[tuple[socket.socket, float]]:
    """``count`` connections that sent ``head`` and then nothing, each with the time just before
    it connected (never after the server started its timer, however late this thread runs)."""
    opened = []
    for _ in range(count):
        connected = time.monotonic()
        connection = socket.create_connection((HOST, port), timeout=5)
        if head:
            connection.sendall(head)
        opened.append((connection, connected))
    return opened


def wait_closed(opened: list[tuple[socket.socket, float]], timeout: float) -> list[float]:
    """Waits up to ``timeout`` for the server to close each connection; the lifetimes (from
    connecting to the end of the stream) of those it closed. Closes every socket."""
    lifetimes = []
    with selectors.DefaultSelector() as selector:
        for connection, connected in opened:
            selector.register(connection, selectors.EVENT_READ, connected)
        deadline = time.monotonic() + timeout
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=0.1):
                try:
                    ended = key.fileobj.recv(4096) == b""  # type: ignore[union-attr]
                except OSError:  # reset by the server
                    ended = True
                if ended:
                    lifetimes.append(time.monotonic() - key.data)
                    selector.unregister(key.fileobj)
    for connection, _ in opened:
        connection.close()
    return lifetimes


def half_open_beside_traffic(url: str, body: dict, half_open: int, wait_s: float,
                             ) -> tuple[Traffic, list[float], float]:
    """Good traffic, and after 1 s ``half_open`` half-open connections held until the server
    closes them or ``wait_s`` passed: the traffic, the lifetimes of the connections the server
    closed, and how long opening them took."""
    port = int(url.rsplit(":", 1)[1])
    result: list[Traffic] = []
    runner = threading.Thread(target=lambda: result.append(good_traffic(url, body,
                                                                        wait_s + 2)))
    runner.start()
    time.sleep(1)
    started = time.monotonic()
    opened = open_half_open(port, half_open)
    opening_s = time.monotonic() - started
    lifetimes = wait_closed(opened, wait_s)
    runner.join(wait_s + 20)
    return result[0], lifetimes, opening_s


def describe_lifetimes(lifetimes: list[float], total: int) -> str:
    if not lifetimes:
        return f"0 of {total} closed by the server"
    return (f"{len(lifetimes)} of {total} closed by the server, after {min(lifetimes):.2f} to "
            f"{max(lifetimes):.2f} s")


def limit_file_descriptors(soft: int) -> str:
    """Code run in the server's process before it starts: its soft open-file limit."""
    return ("import resource\n_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
            f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, hard))")


@pytest.fixture(scope="module")
def one_row(trained) -> dict:
    return {"rows": request_rows(trained["rows_file"])[:1]}


@pytest.fixture(scope="module")
def timed(trained):
    """A server started with a soft open-file limit of 256, short header and keep-alive
    timeouts."""
    with ServiceProcess(trained["repo"], "--header-timeout-s", str(HEADER_TIMEOUT_S),
                        "--keepalive-timeout-s", str(KEEPALIVE_TIMEOUT_S), "--log-level", "info",
                        python_prefix=limit_file_descriptors(SERVER_SOFT_FILE_LIMIT)) as server:
        yield server


def test_the_open_file_limit_is_raised_to_the_hard_limit_once(timed):
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    soft, _ = psutil.Process(timed.process.pid).rlimit(psutil.RLIMIT_NOFILE)
    log = timed.log()
    print(f"server soft limit {soft}, hard {hard}; log: "
          f"{[line for line in log.splitlines() if 'RLIMIT_NOFILE' in line]}")
    assert soft == hard
    assert log.count("RLIMIT_NOFILE") == 1
    assert f"from {SERVER_SOFT_FILE_LIMIT} to {hard}" in log


def test_half_open_connections_are_closed_and_good_requests_keep_being_answered(timed,
                                                                                one_row):
    own_soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    half_open = min(HALF_OPEN, own_soft - 100)
    traffic, lifetimes, opening_s = half_open_beside_traffic(
        timed.url, one_row, half_open, wait_s=HEADER_TIMEOUT_S + 6)
    print(f"{half_open} half-open connections (opened in {opening_s:.2f} s), header timeout "
          f"{HEADER_TIMEOUT_S:g} s: {describe_lifetimes(lifetimes, half_open)}; good traffic: "
          f"{traffic.summary()}")
    assert set(traffic.outcomes) == {"200"}, traffic.outcomes
    assert len(traffic.latencies) >= 10
    assert len(lifetimes) == half_open
    # Closed by the header timer: not before it (less the clock's grain), not long after.
    assert min(lifetimes) > HEADER_TIMEOUT_S - 0.1
    assert max(lifetimes) < HEADER_TIMEOUT_S + opening_s + 3
    assert "Too many open files" not in timed.log()


def _alive_after(port: int, request: bytes, every_s: float, limit_s: float) -> float:
    """Sends ``request``, reads its answer, then sends a CR LF every ``every_s`` (nothing when
    0) until the server closes the connection: seconds from the answer to the close (at most
    ``limit_s``)."""
    with socket.create_connection((HOST, port), timeout=5) as connection:
        connection.sendall(request)
        answer = connection.recv(65536)
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        answered = time.monotonic()
        connection.settimeout(every_s or limit_s)
        while time.monotonic() - answered < limit_s:
            try:
                if connection.recv(4096) == b"":
                    break
            except TimeoutError:
                pass
            except OSError:
                break
            if every_s:
                try:
                    connection.sendall(b"\r\n")
                except OSError:
                    break
        return time.monotonic() - answered


def test_an_idle_connection_and_one_that_never_completes_its_next_head_are_closed(timed):
    port = int(timed.url.rsplit(":", 1)[1])
    live = b"GET /v2/health/live HTTP/1.1\r\nHost: ctrserve\r\n\r\n"
    idle_s = _alive_after(port, live, every_s=0, limit_s=15)
    trickling_s = _alive_after(port, live, every_s=0.3, limit_s=15)
    print(f"after a response: idle connection closed after {idle_s:.2f} s (keep-alive "
          f"{KEEPALIVE_TIMEOUT_S} s), one sending CR LF every 0.3 s after {trickling_s:.2f} s "
          f"(keep-alive + header timeout {KEEPALIVE_TIMEOUT_S + HEADER_TIMEOUT_S:g} s)")
    assert KEEPALIVE_TIMEOUT_S - 0.1 < idle_s < KEEPALIVE_TIMEOUT_S + 3
    assert (KEEPALIVE_TIMEOUT_S + HEADER_TIMEOUT_S - 0.5 < trickling_s
            < KEEPALIVE_TIMEOUT_S + HEADER_TIMEOUT_S + 3)


def test_a_keep_alive_connection_serves_several_requests(timed, one_row):
    with httpx.Client(base_url=timed.url, timeout=10) as client:
        statuses = [client.post(SCORE, json=one_row).status_code for _ in range(5)]
    assert statuses == [200] * 5


MAX_CONCURRENCY = 4


@pytest.fixture(scope="module")
def limited(trained):
    with ServiceProcess(trained["repo"], "--max-concurrency", str(MAX_CONCURRENCY),
                        "--header-timeout-s", "10") as server:
        yield server


def test_idle_connections_do_not_count_against_max_concurrency(limited, one_row):
    port = int(limited.url.rsplit(":", 1)[1])
    idle = open_half_open(port, 25, head=b"") + open_half_open(port, 25)
    try:
        traffic = good_traffic(limited.url, one_row, seconds=3)
    finally:
        for connection, _ in idle:
            connection.close()
    print(f"--max-concurrency {MAX_CONCURRENCY}, 50 idle or half-open connections: good "
          f"traffic {traffic.summary()}")
    assert set(traffic.outcomes) == {"200"}, traffic.outcomes


def test_max_concurrency_refuses_requests_past_the_limit_in_flight(limited, one_row):
    """Requests whose body is still arriving are in flight: with the limit's worth of them, the
    next request is refused at once; when they leave, requests are answered again."""
    port = int(limited.url.rsplit(":", 1)[1])
    head = (b"POST /v1/models/ctr/score HTTP/1.1\r\nHost: ctrserve\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{")
    in_flight = open_half_open(port, MAX_CONCURRENCY, head=head)
    try:
        time.sleep(0.5)  # let the server read their heads
        started = time.monotonic()
        refused = httpx.post(limited.url + SCORE, json=one_row, timeout=10)
        refusal_s = time.monotonic() - started
        probes = [httpx.get(limited.url + path, timeout=10).status_code
                  for path in ("/v2/health/live", "/v2/health/ready", "/metrics")]
    finally:
        for connection, _ in in_flight:
            connection.close()
    answered = None
    for _ in range(50):
        answered = httpx.post(limited.url + SCORE, json=one_row, timeout=10)
        if answered.status_code == 200:
            break
        time.sleep(0.1)
    print(f"{MAX_CONCURRENCY} requests in flight: the next one {refused.status_code} "
          f"{refused.json()} in {refusal_s * 1000:.0f} ms, Retry-After "
          f"{refused.headers.get('retry-after')}")
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    assert "requests in flight" in refused.json()["error"]
    assert probes == [200, 200, 200]  # probes and scrapes are not counted
    assert answered is not None and answered.status_code == 200


BODY_LIMIT = 1_000_000


@pytest.fixture(scope="module")
def plain(trained):
    with ServiceProcess(trained["repo"], "--max-body-bytes", str(BODY_LIMIT)) as server:
        yield server


@pytest.fixture(scope="module")
def v2_rows(trained) -> list[dict]:
    return request_rows(trained["rows_file"])[:32]


def _raw_inputs(rows: list[dict]) -> list[triton.InferInput]:
    """The rows' raw columns as v2 tensors: dense FP32 (NaN missing), categorical BYTES."""
    inputs = []
    for name in sorted({key for row in rows for key in row}):
        values = [row.get(name) for row in rows]
        if name.startswith("I"):
            data = np.array([np.nan if v is None else v for v in values], np.float32)
            tensor = triton.InferInput(name, [len(rows)], "FP32")
        else:
            data = np.array([b"" if v is None else str(v).encode() for v in values],
                            dtype=object)
            tensor = triton.InferInput(name, [len(rows)], "BYTES")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_tritonclient_compressed_requests_score_like_plain_ones(plain, v2_rows, algorithm):
    client = triton.InferenceServerClient(plain.url.removeprefix("http://"))
    try:
        inputs = _raw_inputs(v2_rows)
        expected = client.infer("ctr", inputs).as_numpy("probability")
        compressed = client.infer("ctr", inputs, request_compression_algorithm=algorithm
                                  ).as_numpy("probability")
    finally:
        client.close()
    print(f"{algorithm}: {len(compressed)} scores, max difference "
          f"{np.abs(compressed - expected).max():.2g}")
    np.testing.assert_array_equal(compressed, expected)


def test_a_gzip_body_on_the_friendly_api_scores_like_a_plain_one(plain, v2_rows):
    body = httpx.Request("POST", "http://x", json={"rows": v2_rows}).read()
    expected = httpx.post(plain.url + SCORE, content=body, timeout=30)
    compressed = httpx.post(plain.url + SCORE, content=gzip.compress(body), timeout=30,
                            headers={"content-encoding": "gzip",
                                     "content-type": "application/json"})
    identity = httpx.post(plain.url + SCORE, content=body, timeout=30,
                          headers={"content-encoding": "identity"})
    assert expected.status_code == compressed.status_code == identity.status_code == 200
    assert compressed.json() == expected.json() == identity.json()


def reset_peak_rss(pid: int) -> None:
    """Starts a process's peak resident memory (``VmHWM``) afresh from its current RSS."""
    with open(f"/proc/{pid}/clear_refs", "w") as handle:
        handle.write("5")


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_a_zip_bomb_is_refused_without_expanding_past_the_limit(plain, encoding):
    zeros = bytes(64 * 1024 * 1024)
    bomb = gzip.compress(zeros, 9) if encoding == "gzip" else zlib.compress(zeros, 9)
    del zeros
    before = psutil.Process(plain.process.pid).memory_info().rss
    reset_peak_rss(plain.process.pid)
    started = time.monotonic()
    response = httpx.post(plain.url + SCORE, content=bomb, timeout=30,
                          headers={"content-encoding": encoding})
    elapsed = time.monotonic() - started
    grown = peak_rss(plain.process.pid) - before
    print(f"{encoding} bomb: {len(bomb):,} bytes expanding to 64 MiB, limit {BODY_LIMIT:,}: "
          f"{response.status_code} {response.json()} in {elapsed * 1000:.0f} ms; server RSS "
          f"{before / 2**20:.1f} MiB, peak during the request {grown / 2**20:+.1f} MiB")
    assert response.status_code == 413
    assert "decompressed" in response.json()["error"]
    assert grown < 32 * 2**20


@pytest.mark.parametrize(("encoding", "body", "status", "message"), [
    ("br", b'{"rows": [{}]}', 415, "'br'"),
    ("gzip, br", b'{"rows": [{}]}', 415, "'br'"),
    ("gzip", b'{"rows": [{}]}', 400, "not valid gzip"),
    ("deflate", b'{"rows": [{}]}', 400, "not valid deflate"),
    ("gzip", gzip.compress(b'{"rows": [{}]}')[:-6], 400, "not valid gzip"),
    ("deflate", zlib.compress(b'{"rows": [{}]}') + b"trailing", 400, "not valid deflate"),
])
def test_a_body_not_in_an_encoding_the_server_reads_is_a_client_error(plain, encoding, body,
                                                                      status, message):
    response = httpx.post(plain.url + SCORE, content=body, timeout=30,
                          headers={"content-encoding": encoding})
    print(f"Content-Encoding {encoding!r}, {len(body)} bytes: {response.status_code} "
          f"{response.json()}")
    assert response.status_code == status
    assert message in response.json()["error"]


def test_encoded_bodies_of_several_layers_and_members_are_read(plain, v2_rows):
    body = httpx.Request("POST", "http://x", json={"rows": v2_rows}).read()
    expected = httpx.post(plain.url + SCORE, content=body, timeout=30).json()
    halves = gzip.compress(body[:100]) + gzip.compress(body[100:])  # two gzip members
    layered = gzip.compress(zlib.compress(body))  # deflate, then gzip
    answers = [
        httpx.post(plain.url + SCORE, content=halves, timeout=30,
                   headers={"content-encoding": "gzip"}),
        httpx.post(plain.url + SCORE, content=layered, timeout=30,
                   headers={"content-encoding": "deflate, gzip"}),
        httpx.post(plain.url + SCORE, content=gzip.compress(body), timeout=30,
                   headers={"content-encoding": "X-GZIP"}),
    ]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert all(answer.json() == expected for answer in answers)
