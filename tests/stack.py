"""The docker compose stack's pieces started natively for tests: nginx and Prometheus with the
repository's own configuration (deploy/), templated for loopback ports, and redis-server; the
compose file's features job; the dashboard's queries, with Grafana's variables substituted; and
the page docs/dashboard.md.

Every process runs on a free loopback port with its files in a temporary directory, every wait
is bounded, and every process is stopped by its PID.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from servers import HOST, free_port, stop_group

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
NGINX_TEMPLATE = DEPLOY / "nginx" / "ctrserve.conf.template"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "ctrserve.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
K8S = DEPLOY / "k8s"

#: Panels whose queries return data only where a GPU is (NVML gauges).
GPU_ONLY_PANELS = {"GPU memory"}
#: Panels whose queries return data only once a ranking request names an entity the feature
#: store lacks (the native run's ranking finds every entity).
MISSING_ENTITY_PANELS = {"Missing entities by model and entity"}


def tool(name: str, package: str) -> str:
    """The path of a program the tests need: from the virtual environment or the PATH. Absent,
    the test fails under CI (scripts/setup.sh installs it) and is skipped elsewhere."""
    beside = Path(sys.executable).with_name(name)
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        message = f"{name} is missing ({package}; scripts/setup.sh installs it)"
        if os.environ.get("CI"):
            raise RuntimeError(message)
        pytest.skip(message)
    return found


class Daemon:
    """A server process in its own session, its output in a log file; stopped by PID."""

    def __init__(self, name: str, command: list[str], directory: Path) -> None:
        self.name = name
        self.log_path = directory / f"{name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(command, stdout=self._log, stderr=subprocess.STDOUT,
                                        cwd=directory, start_new_session=True)

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-4000:]

    def wait_for(self, ready, timeout: float = 30) -> None:
        """Until ``ready()`` is true, at most ``timeout`` seconds, while the process runs."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.process.returncode}):\n"
                                   f"{self.log()}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} was not ready within {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        stop_group(self.process, timeout=15)
        self._log.close()


# -- redis-server ----------------------------------------------------------------------------

def start_redis(directory: Path) -> tuple[Daemon, str]:
    import redis

    server = tool("redis-server", "Debian package redis-server")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    daemon = Daemon("redis", [server, "--port", str(port), "--bind", HOST, "--save", "",
                              "--appendonly", "no", "--dir", str(directory)], directory)
    client = redis.Redis(host=HOST, port=port, socket_timeout=1)
    try:
        daemon.wait_for(lambda: client.ping(), timeout=20)
    except BaseException:
        daemon.stop()
        raise
    finally:
        client.close()
    return daemon, f"redis://{HOST}:{port}/0"


# -- the features job ------------------------------------------------------------------------

def features_job_script() -> str:
    """The shell script of the compose service `features`, as its shell gets it (``$$`` is
    compose's escape of ``$``)."""
    command = yaml.safe_load(COMPOSE.read_text())["services"]["features"]["command"]
    assert command[:2] == ["sh", "-c"], command
    return command[2].replace("$$", "$")


def run_features_job(repo: Path, redis_url: str) -> subprocess.CompletedProcess:
    """The features job run natively: the model volume is ``repo``, Redis the native one, and
    ``ctrserve`` the one beside this Python."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "PATH": path, "CTRSERVE_REPO": str(repo),
           "CTRSERVE_REDIS_URL": redis_url}
    return subprocess.run(["sh", "-c", features_job_script()], env=env, capture_output=True,
                          text=True, timeout=180)


# -- nginx -----------------------------------------------------------------------------------

def render_nginx(listen: str, backends: list[str]) -> str:
    """The template with its two variables filled: the `server ${CTRSERVE_BACKEND} resolve`
    line once per replica's address, without `resolve` (under compose Docker's DNS names every
    replica and nginx asks it again; an address needs no resolving, and Debian's nginx 1.22
    has no `resolve`)."""
    lines = []
    for line in NGINX_TEMPLATE.read_text().splitlines():
        if "${CTRSERVE_BACKEND}" in line:
            assert "${CTRSERVE_BACKEND} resolve " in line, line
            lines.extend(line.replace("${CTRSERVE_BACKEND} resolve", backend)
                         for backend in backends)
        else:
            lines.append(line.replace("${CTRSERVE_LB_LISTEN}", listen))
    text = "\n".join(lines) + "\n"
    left = re.findall(r"\$\{\w+\}", text)
    assert not left, f"unfilled template variables: {left}"
    return text


def nginx_main_config(directory: Path, snippet: Path) -> str:
    """A minimal nginx.conf around the snippet (the nginx image's own nginx.conf plays this part
    under compose): pid, error log and temp paths in ``directory``, one worker."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(f"    {kind}_temp_path {directory / kind};"
                     for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return (f"{user}worker_processes 1;\npid {directory / 'nginx.pid'};\n"
            f"error_log {directory / 'error.log'} warn;\n"
            "events { worker_connections 1024; }\n"
            f"http {{\n{temp}\n    include {snippet};\n}}\n")


def start_nginx(directory: Path, port: int, backends: list[str]) -> Daemon:
    nginx = tool("nginx", "Debian package nginx")
    directory.mkdir(parents=True, exist_ok=True)
    snippet = directory / "ctrserve.conf"
    snippet.write_text(render_nginx(f"{HOST}:{port}", backends))
    config = directory / "nginx.conf"
    config.write_text(nginx_main_config(directory, snippet))
    command = [nginx, "-p", str(directory), "-e", str(directory / "error.log"), "-c",
               str(config)]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    daemon = Daemon("nginx", [*command, "-g", "daemon off;"], directory)
    try:
        daemon.wait_for(lambda: httpx.get(f"http://{HOST}:{port}/v2/health/live",
                                          timeout=2).status_code == 200, timeout=20)
    except BaseException:
        daemon.stop()
        raise
    return daemon


# -- Prometheus ------------------------------------------------------------------------------

def render_prometheus(replicas: list[str], own_address: str, scrape_interval: str) -> dict:
    """deploy/prometheus/prometheus.yml with the `ctrserve` job's DNS lookup replaced by the
    replicas' addresses and a shorter scrape interval; every other setting as in the file."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["scrape_timeout"] = scrape_interval
    config["global"]["evaluation_interval"] = scrape_interval  # the alert rules
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    ctrserve = jobs["ctrserve"]
    assert "dns_sd_configs" in ctrserve, "the ctrserve job should find replicas through DNS"
    del ctrserve["dns_sd_configs"]
    ctrserve["static_configs"] = [{"targets": replicas}]
    jobs["prometheus"]["static_configs"] = [{"targets": [own_address]}]
    return config


def start_prometheus(directory: Path, port: int, replicas: list[str],
                     scrape_interval: str = "1s") -> Daemon:
    prometheus = tool("prometheus", "Debian package prometheus")
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    address = f"{HOST}:{port}"
    rendered = render_prometheus(replicas, address, scrape_interval)
    for rule_file in rendered.get("rule_files", []):  # beside the configuration, as under compose
        shutil.copy(PROMETHEUS_CONFIG.parent / rule_file, directory / rule_file)
    config.write_text(yaml.safe_dump(rendered))
    daemon = Daemon("prometheus", [
        prometheus, f"--config.file={config}", f"--storage.tsdb.path={directory / 'data'}",
        f"--web.listen-address={address}", "--log.level=warn"], directory)
    try:
        daemon.wait_for(lambda: httpx.get(f"http://{address}/-/ready",
                                          timeout=2).status_code == 200, timeout=30)
    except BaseException:
        daemon.stop()
        raise
    return daemon


def query(url: str, expr: str) -> list[dict]:
    """An instant query through Prometheus's HTTP API: the result vector."""
    response = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (expr, body)
    assert body["data"]["resultType"] == "vector", (expr, body["data"]["resultType"])
    return body["data"]["result"]


def scalar(url: str, expr: str) -> float | None:
    result = query(url, expr)
    return float(result[0]["value"][1]) if result else None


def wait_for_value(url: str, expr: str, expected: float, timeout: float = 30) -> float | None:
    """Polls ``expr`` until it equals ``expected`` (a scrape took the latest counts), at most
    ``timeout`` seconds; returns the last value seen."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        seen = scalar(url, expr)
        if seen == expected:
            return seen
        time.sleep(0.25)
    return seen


# -- the dashboard ---------------------------------------------------------------------------

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """The panels that query (rows left out), rows' nested panels included."""
    panels = []
    for panel in dashboard()["panels"]:
        if panel["type"] == "row":
            panels.extend(panel.get("panels", []))
        else:
            panels.append(panel)
    return panels


def substitute(expr: str, variables: dict[str, str]) -> str:
    """Grafana's variables (``$name`` and ``${name}``) replaced, longest names first."""
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace("${" + name + "}", variables[name]).replace("$" + name,
                                                                         variables[name])
    assert "$" not in expr, f"a variable is left in {expr!r}"
    return expr


def run_dashboard(url: str, variables: dict[str, str]) -> list[dict]:
    """Every target of every panel, run as an instant query: panel, legend, query, result."""
    results = []
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = substitute(target["expr"], variables)
            results.append({"panel": panel["title"], "description": panel.get("description", ""),
                            "unit": panel["fieldConfig"]["defaults"].get("unit", ""),
                            "legend": target.get("legendFormat", ""), "expr": target["expr"],
                            "query": expr, "result": query(url, expr)})
    return results


def finite_values(result: list[dict]) -> list[float]:
    values = [float(sample["value"][1]) for sample in result]
    return [v for v in values if math.isfinite(v)]


# -- docs/dashboard.md -----------------------------------------------------------------------

def _format(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return str(value)
    if unit == "bytes":
        return f"{value:,.0f} B ({value / 2**20:,.2f} MiB)" if value >= 2**20 else f"{value:,.0f} B"
    if unit == "s":
        return f"{value * 1000:,.3f} ms"
    if unit == "percentunit":
        return f"{value * 100:.2f}%"
    if unit == "reqps":
        return f"{value:.3f} req/s"
    return f"{value:.4g}"


def _series(sample: dict, legend: str) -> str:
    labels = sample["metric"]
    if legend:
        text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), legend)
        return text.strip() or "(no labels)"
    return ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "(no labels)"


def write_dashboard_doc(path: Path, results: list[dict], run: dict) -> None:
    """The panels, their queries and the values they showed in the native run."""
    lines = [
        "# The ctrserve dashboard",
        "",
        "The Grafana dashboard `deploy/grafana/dashboards/ctrserve.json` (provisioned by docker "
        "compose, with the Prometheus datasource of `deploy/grafana/provisioning/`): each panel, "
        "its queries, and the value each query returned in a native run of the stack "
        "(`tests/test_stack.py`: two `ctrserve serve` replicas, nginx with "
        "`deploy/nginx/ctrserve.conf.template`, redis-server and Prometheus with "
        "`deploy/prometheus/prometheus.yml`, on loopback). Every panel takes its datasource from "
        "the dashboard's `datasource` variable, which starts on the default Prometheus "
        "datasource.",
        "",
        "Produced by (2 cores, no GPU):",
        "",
        "```bash",
        "CTRSERVE_DASHBOARD_DOC=docs/dashboard.md .venv/bin/python -m pytest -q "
        "tests/test_stack.py -k native_stack",
        "```",
        "",
        "The run: " + run["description"],
        "",
        "Grafana's variables were set as follows: "
        + ", ".join(f"`${name}` = `{value}`" for name, value in run["variables"].items())
        + ". Values are instant queries at the end of the run. A rate over a series that "
        "appeared during the window counts from its first sample, so a counter created by its "
        "one and only event (the 400 and 503 series) shows a rate of 0.",
        "",
    ]
    panel = None
    for item in results:
        if item["panel"] != panel:
            panel = item["panel"]
            lines += [f"## {panel}", ""]
            if item["description"]:
                lines += [item["description"], ""]
            if panel in GPU_ONLY_PANELS:
                lines += ["GPU only: NVML gauges, empty on this machine (no GPU).", ""]
            if panel in MISSING_ENTITY_PANELS:
                lines += ["Empty in this run: no ranking request named an entity the feature "
                          "store lacks.", ""]
        lines += ["```promql", item["expr"], "```", ""]
        values = [(_series(s, item["legend"]), float(s["value"][1])) for s in item["result"]]
        if not values:
            lines += ["No data.", ""]
            continue
        shown = values[:8]
        lines += [f"- {name}: {_format(value, item['unit'])}" for name, value in shown]
        if len(values) > len(shown):
            lines.append(f"- ... and {len(values) - len(shown)} more series")
        lines.append("")
    path.write_text("\n".join(lines).rstrip() + "\n")
