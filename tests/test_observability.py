"""Observability against the real referees: every refusal counted by reason (a real redis-server
stopped and restarted under a stream of ranking requests), ``promtool check metrics`` on a
scrape after traffic with every status (one worker and two), the alert rules checked and
unit-tested by promtool and loaded and evaluated by Prometheus itself, and the Grafana
dashboard's datasource variable and panels."""

import asyncio
import json
import re
import socket
import subprocess
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import HOST, ServiceProcess, free_port, request_rows
from stack import DASHBOARD, PROMETHEUS_CONFIG, ROOT, dashboard_panels, start_prometheus, tool
from test_redis import RedisServer, _load_features, _rank_body, ranked  # noqa: F401 - fixture

RANK = "/v1/models/rank/rank"
RANK_ROUTE = "/v1/models/{name}/rank"
SCORE = "/v1/models/ctr/score"
SCORE_ROUTE = "/v1/models/{name}/score"
READY_ROUTE = "/v2/health/ready"
ALERTS = PROMETHEUS_CONFIG.parent / "alerts.yml"
ALERT_TESTS = PROMETHEUS_CONFIG.parent / "alerts.test.yml"


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Every sample of an exposition as {(name, sorted labels): value}."""
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def total(scraped: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in scraped.items() if n == name and wanted <= set(ls))


# -- every refusal counted: Redis down and back under a stream of ranking requests ------------

async def _rank_stream(url: str, body: dict, clients: int, phase: list[str],
                       seen: dict[str, list[int]], deadline: float) -> None:
    """``clients`` loops sending ranking requests until ``phase[0]`` is "done" (or the deadline),
    each status noted under the phase it was sent in."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async def one_client() -> None:
            while phase[0] != "done" and time.monotonic() < deadline:
                sent_in = phase[0]
                response = await client.post(RANK, json=body)
                seen.setdefault(sent_in, []).append(response.status_code)
                if response.status_code == 503:
                    assert response.headers["retry-after"] == "1"
                    assert "feature store" in response.json()["error"]
                    await asyncio.sleep(0.005)  # a client that backs off a little
        await asyncio.gather(*(one_client() for _ in range(clients)))


def _until(condition, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


def test_a_redis_outage_counts_every_refusal_and_logs_one_outage_and_one_recovery(
        ranked, tmp_path):  # noqa: F811 - the fixture imported above
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    try:
        _load_features(redis_server.url, ranked["root"])
        body = _rank_body(ranked, 3, [1, 2, 5])
        with ServiceProcess(ranked["repo"], "--redis-url", redis_server.url,
                            "--redis-timeout-ms", "2000") as server:
            phase = ["up"]
            seen: dict[str, list[int]] = {}

            def answered(name: str) -> int:
                return seen.get(name, []).count(200)

            def drive() -> None:
                _until(lambda: answered("up") >= 20, 30)
                phase[0] = "down"
                redis_server.stop()
                _until(lambda: seen.get("down", []).count(503) >= 20, 30)
                time.sleep(1.5)  # through a few backoffs
                redis_server.start()
                phase[0] = "restarted"
                _until(lambda: answered("restarted") >= 20, 30)
                phase[0] = "done"

            async def run() -> None:
                stream = asyncio.create_task(_rank_stream(
                    server.url, body, 2, phase, seen, time.monotonic() + 120))
                await asyncio.to_thread(drive)
                await stream

            asyncio.run(run())
            scraped = samples(httpx.get(server.url + "/metrics", timeout=30).text)
            log = server.log_path.read_text()
    finally:
        redis_server.stop()
    statuses = [s for codes in seen.values() for s in codes]
    refused = statuses.count(503)
    print(f"ranking stream: {len(statuses)} requests, {statuses.count(200)} answered, "
          f"{refused} refused (503); by phase: "
          + ", ".join(f"{k}: {len(v)}" for k, v in seen.items()))
    assert set(statuses) <= {200, 503} and refused >= 20
    assert seen["up"].count(503) == 0
    # Counted one to one, with the request's own count.
    assert total(scraped, "ctrserve_rejections_total", model="rank",
                 reason="feature_store") == refused
    assert total(scraped, "ctrserve_requests_total", model="rank", route=RANK_ROUTE,
                 status="503") == refused
    assert total(scraped, "ctrserve_requests_total", model="rank", route=RANK_ROUTE,
                 status="200") == statuses.count(200)
    # Failed reads are fewer than the refusals (the backoff refuses without trying), and
    # there was at least one.
    errors = total(scraped, "ctrserve_feature_store_errors_total")
    assert 1 <= errors <= refused
    assert {dict(labels)["kind"] for (name, labels) in scraped
            if name == "ctrserve_feature_store_errors_total"} == {"timeout", "connection",
                                                                   "error"}
    # One line when it went down, one when it came back, naming the requests refused.
    outage = [line for line in log.splitlines() if "feature store (Redis) outage" in line]
    recovery = [line for line in log.splitlines() if "feature store (Redis) recovered" in line]
    assert len(outage) == 1 and len(recovery) == 1, log[-3000:]
    print(outage[0], recovery[0], sep="\n")
    logged = int(re.search(r"; (\d+) ranking requests were refused", recovery[0]).group(1))
    assert 1 <= logged <= refused, (logged, refused)


# -- promtool check metrics after every status ------------------------------------------------

def _slow_body(port: int) -> bytes:
    """Headers promising 100 bytes, then nothing: the reply to a body that never arrives."""
    with socket.create_connection((HOST, port), timeout=10) as connection:
        connection.sendall(f"POST {SCORE} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                           "\r\nContent-Length: 100\r\n\r\n".encode())
        connection.settimeout(10)
        reply = b""
        for _ in range(100):  # until the reply's head is in, each read within 10 s
            chunk = connection.recv(4096)
            reply += chunk
            if not chunk or b"\r\n\r\n" in reply:
                break
    return reply


def _traffic_with_every_status(url: str, rows: list[dict]) -> dict[int, int]:
    """Requests that get every status the service answers; the count of each."""
    port = int(url.rsplit(":", 1)[1])
    sixteen = {"rows": rows[:16]}  # one full batch: scored at once
    responses = [
        httpx.post(url + SCORE, json=sixteen),                                       # 200
        httpx.post(url + "/v2/models/ctr/infer", json={"inputs": [
            {"name": "I1", "datatype": "FP32", "shape": [16], "data": [1.0] * 16}]}),  # 200
        httpx.post(url + SCORE, json={"rows": [{"nope": 1}]}),                       # 400
        httpx.post(url + "/v2/repository/index"),                                    # 401
        httpx.post(url + "/v1/models/nosuch/score", json=sixteen),                   # 404
        httpx.get(url + "/no/such/path"),                                            # 404
        httpx.get(url + SCORE),                                                      # 405
        httpx.post(url + SCORE, json={"rows": rows[:21]}),                           # 413
        httpx.post(url + SCORE, content=b"x" * 30_000),                              # 413
        httpx.post(url + SCORE, content=b"{}", headers={"Content-Encoding": "br"}),  # 415
    ]
    # One connection, so one worker: a single row times out waiting for its batch, and stays
    # queued until the batch's deadline; 20 rows more overflow the queue.
    with httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1)) as one:
        responses.append(one.post(SCORE, json={"rows": rows[:1]}))                  # 504
        responses.append(one.post(SCORE, json={"rows": rows[:20]}))                 # 503
    assert responses[6].headers["allow"] == "POST"
    assert responses[-1].headers["retry-after"] == "1"
    slow = _slow_body(port)
    assert slow.startswith(b"HTTP/1.1 408"), slow[:200]
    counts: dict[int, int] = {408: 1}
    for response in responses:
        counts[response.status_code] = counts.get(response.status_code, 0) + 1
    assert counts == {200: 2, 400: 1, 401: 1, 404: 2, 405: 1, 408: 1, 413: 2, 415: 1, 503: 1,
                      504: 1}, [(r.request.url.path, r.status_code, r.text[:80])
                                for r in responses]
    return counts


@pytest.mark.parametrize("workers", [1, 2])
def test_promtool_accepts_the_metrics_after_every_status(trained, workers):
    """Small limits make each status cheap to reach: a batch of 16 rows runs at once, a single
    row waits 5 s for more and times out after 1 s (504), more than 20 rows are too many (413)
    or, behind that single row, overflow the queue (503)."""
    promtool = tool("promtool", "Debian package prometheus")
    rows = request_rows(trained["rows_file"])
    with ServiceProcess(trained["repo"], "--workers", str(workers), "--admin-token", "t0ken",
                        "--max-batch-rows", "16", "--max-queue-delay-us", "5000000",
                        "--request-timeout-ms", "1000", "--max-queue-rows", "20",
                        "--max-request-rows", "20", "--max-body-bytes", "20000",
                        "--body-timeout-s", "1") as server:
        counts = _traffic_with_every_status(server.url, rows)
        text = httpx.get(server.url + "/metrics", timeout=30).text
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert not (checked.stdout + checked.stderr).strip()
    scraped = samples(text)
    by_route_status = {(dict(ls)["route"], dict(ls)["status"]): v for (n, ls), v in scraped.items()
                       if n == "ctrserve_requests_total" and dict(ls)["route"] != READY_ROUTE}
    # Every status counted, all under the route the path matches: the body limits' 408, 413 and
    # 415 too; only a path no route has is "unmatched". (The readiness polls of the start are
    # left out.)
    assert {int(status) for _, status in by_route_status} == set(counts)
    for status in ("408", "413", "415", "503", "504", "405"):
        assert by_route_status.get((SCORE_ROUTE, status)), (status, by_route_status)
    assert by_route_status[("unmatched", "404")] == 1
    assert sum(by_route_status.values()) == sum(counts.values())
    # Each refusal counted by its reason, once.
    assert total(scraped, "ctrserve_rejections_total", reason="queue_full") == counts[503]
    assert total(scraped, "ctrserve_rejections_total", reason="timeout") == counts[504]
    assert total(scraped, "ctrserve_rejections_total") == counts[503] + counts[504]
    # Nothing in flight once everything was answered; the 60 ms bucket; the renamed gauge.
    assert total(scraped, "ctrserve_requests_in_flight") == 0
    assert total(scraped, "ctrserve_request_seconds_bucket", route=SCORE_ROUTE, le="0.06") >= 2
    manifest = json.loads((trained["repo"] / "ctr" / "1" / "manifest.json").read_text())
    assert total(scraped, "ctrserve_model_embedding_bytes", model="ctr") == manifest["bytes"][
        "embeddings"]
    assert total(scraped, "ctrserve_model_load_failures_total", model="ctr") == 0
    assert ("ctrserve_model_load_failures_total", (("model", "ctr"),)) in scraped


# -- alert rules ------------------------------------------------------------------------------

def test_promtool_checks_and_unit_tests_the_alert_rules():
    promtool = tool("promtool", "Debian package prometheus")
    checked = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run([promtool, "test", "rules", ALERT_TESTS.name], capture_output=True,
                            text=True, timeout=120, cwd=ALERT_TESTS.parent)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout
    # Every alert has a firing case in the unit tests, and every metric it reads is exported.
    rules = [rule for group in _yaml(ALERTS)["groups"] for rule in group["rules"]]
    tests = _yaml(ALERT_TESTS)["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case["exp_alerts"]}
    assert fired == {rule["alert"] for rule in rules}
    exported = set(re.findall(r'"(ctrserve_\w+)"', (ROOT / "service" / "metrics.py").read_text()))
    for rule in rules:
        for metric in re.findall(r"ctrserve_\w+", rule["expr"]):
            assert re.sub(r"_(bucket|sum|count)$", "", metric) in exported, metric
    # Prometheus loads them from the configuration compose mounts beside them.
    assert _yaml(PROMETHEUS_CONFIG)["rule_files"] == [ALERTS.name]
    compose = (ROOT / "docker-compose.yml").read_text()
    assert f"./deploy/prometheus/{ALERTS.name}:/etc/prometheus/{ALERTS.name}:ro" in compose


def _yaml(path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_prometheus_loads_and_evaluates_the_alert_rules(trained, tmp_path):
    """The repository's prometheus.yml and alerts.yml in a real Prometheus scraping a live
    replica and an address where none answers: every rule evaluates without error, the dead
    replica's alert goes pending, the live one raises none."""
    dead = f"{HOST}:{free_port()}"
    with ServiceProcess(trained["repo"]) as server:
        live = f"{HOST}:{server.port}"
        port = free_port()
        prometheus = start_prometheus(tmp_path / "prometheus", port, [live, dead])
        url = f"http://{HOST}:{port}"
        try:
            def pending() -> set[tuple[str, str]]:
                alerts = httpx.get(url + "/api/v1/alerts", timeout=10).json()["data"]["alerts"]
                return {(a["labels"]["alertname"], a["labels"].get("instance", "")) for a in alerts}

            _until(lambda: ("CtrserveReplicaDown", dead) in pending(), 60)
            groups = httpx.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            alerts = pending()
        finally:
            prometheus.stop()
    rules = [rule for group in groups for rule in group["rules"]]
    assert {rule["name"] for rule in rules} == {
        rule["alert"] for group in _yaml(ALERTS)["groups"] for rule in group["rules"]}
    assert all(rule["health"] == "ok" for rule in rules), [
        (rule["name"], rule.get("lastError")) for rule in rules]
    assert alerts == {("CtrserveReplicaDown", dead)}


# -- the Grafana dashboard --------------------------------------------------------------------

def test_the_dashboard_takes_its_datasource_from_a_variable_and_has_the_new_panels():
    board = json.loads(DASHBOARD.read_text())
    text = DASHBOARD.read_text()
    variable = board["templating"]["list"][0]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource", "datasource", "prometheus")
    uids = set(re.findall(r'"uid":\s*"([^"]*)"', text)) - {board["uid"]}
    assert uids == {"${datasource}"}
    exprs = {panel["title"]: " ".join(t["expr"] for t in panel["targets"])
             for panel in dashboard_panels()}
    assert "ctrserve_feature_store_errors_total" in exprs["Feature store errors by kind"]
    assert "ctrserve_missing_entities_total" in exprs["Missing entities by model and entity"]
    assert "ctrserve_model_load_failures_total" in exprs["Model load failures"]
    assert "ctrserve_requests_in_flight" in exprs["Requests in flight per replica"]
    assert 'le="0.06"' in exprs["Scoring requests within the 60 ms goal"]
    assert "ctrserve_model_embedding_bytes" in " ".join(exprs.values())
    assert "ctrserve_embedding_bytes_total" not in text
