"""The Kubernetes and KServe manifests of ``deploy/`` against the schemas of the APIs that take
them, and against the service they describe.

Referees: KServe's own CRD schemas (release v0.20.0) and the Kubernetes v1.33.0 JSON schemas,
both committed under ``tests/data/`` with their sources and checked against their recorded
sha256; jsonschema validates every document, strictly (a field the API does not know is an
error, as ``kubectl apply --validate=strict`` makes it); promtool parses every PromQL query the
autoscaling reads; prometheus-adapter's own configuration types (``pkg/config/config.go``, read
strictly by the adapter) give the keys its rules may use. Then what ties the manifests to the
service: the ports, the probes, the drain on shutdown against ``server.STOP_TIMEOUT_S``, the
metric the HPA reads among those the service exports, and what KServe's storage initializer
leaves in ``/mnt/models`` served by a real server. Last, the locust file's guard: loopback only,
unless a staging host is named.

What needs a cluster (KServe's controllers, Knative, KEDA, the adapter answering the custom
metrics API) is not proven here: docs/kubernetes.md says what is.
"""

import copy
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import httpx
import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from servers import ServiceProcess, request_rows
from stack import ROOT, tool

from ctrserve.export.package import FORMAT_VERSION
from ctrserve.service import metrics
from ctrserve.service.server import STOP_TIMEOUT_S

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KSERVE = DEPLOY / "kserve"
KSERVE_SCHEMAS = ROOT / "tests" / "data" / "kserve"
KUBERNETES_SCHEMAS = ROOT / "tests" / "data" / "kubernetes"
MANIFESTS = sorted([*K8S.glob("*.yaml"), *K8S.glob("gpu/*.yaml"), *KSERVE.glob("*.yaml")])
KSERVE_GROUP = "serving.kserve.io"
#: The keys of prometheus-adapter's rules, from its configuration types
#: (kubernetes-sigs/prometheus-adapter, pkg/config/config.go: DiscoveryRule, ResourceMapping,
#: GroupResource, NameMapping, RegexFilter); the adapter reads them with yaml.UnmarshalStrict,
#: so any other key stops it.
ADAPTER_RULE_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["seriesQuery"],
    "properties": {
        "seriesQuery": {"type": "string"},
        "seriesFilters": {"type": "array", "items": {
            "type": "object", "additionalProperties": False,
            "properties": {"is": {"type": "string"}, "isNot": {"type": "string"}}}},
        "resources": {"type": "object", "additionalProperties": False, "properties": {
            "template": {"type": "string"},
            "overrides": {"type": "object", "additionalProperties": {
                "type": "object", "additionalProperties": False, "required": ["resource"],
                "properties": {"group": {"type": "string"}, "resource": {"type": "string"}}}}}},
        "name": {"type": "object", "additionalProperties": False,
                 "properties": {"matches": {"type": "string"}, "as": {"type": "string"}}},
        "metricsQuery": {"type": "string"},
        "labelValueReplacements": {"type": "array"},
    },
}
ADAPTER_CONFIG_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["rules"],
    "properties": {"rules": {"type": "array", "items": ADAPTER_RULE_SCHEMA},
                   "externalRules": {"type": "array", "items": ADAPTER_RULE_SCHEMA},
                   "resourceRules": {"type": "object"}},
}


# -- the schemas -------------------------------------------------------------------------------

def _recorded_sha256(folder: Path) -> dict[str, str]:
    """The sha256 of each schema file, from the table of the folder's README."""
    return dict(re.findall(r"^\| `([^`]+)` \| `([0-9a-f]{64})` \|", (folder / "README.md")
                           .read_text(), flags=re.M))


def _upstream_text(folder: Path, name: str) -> str:
    """A committed schema file, decompressed, refused unless it is the recorded upstream file."""
    data = gzip.decompress((folder / f"{name}.gz").read_bytes())
    assert hashlib.sha256(data).hexdigest() == _recorded_sha256(folder)[name], name
    return data.decode()


@cache
def _kubernetes_registry() -> Registry:
    definitions = json.loads(_upstream_text(KUBERNETES_SCHEMAS, "_definitions.json"))
    return Resource.from_contents(definitions) @ Registry()


def _kubernetes_schema_name(api_version: str, kind: str) -> str:
    """The schema file of a kind: ``deployment-apps-v1.json`` for apps/v1 Deployment."""
    group, _, version = api_version.rpartition("/")
    group = group.split(".")[0]
    return f"{kind.lower()}-{group}-{version}.json" if group else f"{kind.lower()}-{version}.json"


@cache
def _kubernetes_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads(_upstream_text(KUBERNETES_SCHEMAS,
                                       _kubernetes_schema_name(api_version, kind)))
    return jsonschema.Draft202012Validator(schema, registry=_kubernetes_registry())


def _closed(schema: dict) -> dict:
    """A CRD schema in which every object refuses fields it does not declare, as the API server's
    strict field validation does: objects with properties and neither additionalProperties nor
    x-kubernetes-preserve-unknown-fields get ``additionalProperties: false``."""
    schema = copy.deepcopy(schema)

    def close(node: object) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for child in node.values():
                close(child)
        elif isinstance(node, list):
            for child in node:
                close(child)

    close(schema)
    return schema


@cache
def _kserve_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """The CRD's schema of ``kind`` at its served version, with ``metadata`` checked as the
    Kubernetes ObjectMeta it is (the CRD leaves it to the API server)."""
    group, _, version = api_version.partition("/")
    plural = {"ClusterServingRuntime": "clusterservingruntimes", "ServingRuntime":
              "servingruntimes", "InferenceService": "inferenceservices"}[kind]
    # libyaml's loader: the InferenceService CRD is 2 MB of YAML
    crd = yaml.load(_upstream_text(KSERVE_SCHEMAS, f"{group}_{plural}.yaml"),
                    Loader=yaml.CSafeLoader)
    assert crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = _closed(served["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {
        "$ref": "https://kubernetes.io/api/_definitions.json#/$defs/"
                "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"}
    return jsonschema.Draft202012Validator(schema, registry=_kubernetes_registry())


def _validator(document: dict) -> jsonschema.Draft202012Validator:
    api_version, kind = document["apiVersion"], document["kind"]
    if api_version.startswith(f"{KSERVE_GROUP}/"):
        return _kserve_validator(api_version, kind)
    return _kubernetes_validator(api_version, kind)


def _problems(document: dict) -> list[str]:
    return [f"{'.'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}"
            for error in _validator(document).iter_errors(document)]


def _documents(path: Path) -> list[dict]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def _all_documents() -> dict[tuple[str, str], dict]:
    """Every document of deploy/k8s, deploy/k8s/gpu and deploy/kserve by (file, kind/name)."""
    return {(path.relative_to(DEPLOY).as_posix(),
             f"{document['kind']}/{document['metadata']['name']}"): document
            for path in MANIFESTS for document in _documents(path)}


def _one(relative: str, kind: str) -> dict:
    (document,) = [d for d in _documents(DEPLOY / relative) if d["kind"] == kind]
    return document


def test_the_committed_schemas_are_the_recorded_upstream_files():
    for folder in (KSERVE_SCHEMAS, KUBERNETES_SCHEMAS):
        recorded = _recorded_sha256(folder)
        committed = {path.name.removesuffix(".gz") for path in folder.glob("*.gz")}
        assert committed == set(recorded), folder
        for name in recorded:
            _upstream_text(folder, name)


def test_every_manifest_validates_against_its_api_schema():
    documents = _all_documents()
    kinds = {key[1].split("/")[0] for key in documents}
    assert {"ClusterServingRuntime", "InferenceService", "Deployment", "Service",
            "HorizontalPodAutoscaler", "PodDisruptionBudget", "StatefulSet", "ConfigMap",
            "ServiceAccount"} <= kinds
    problems = {f"{file} {name}": found for (file, name), document in documents.items()
                if (found := _problems(document))}
    assert not problems, json.dumps(problems, indent=2)


def test_the_schemas_refuse_a_misspelt_field_and_a_wrong_type():
    """The referee referees: a field the API lacks, at any depth, and a wrong type fail."""
    deployment = _one("k8s/deployment.yaml", "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = container[
        "readinessProbe"]
    assert any("readinesProbe" in problem for problem in _problems(misspelt))
    runtime = copy.deepcopy(_one("kserve/cluster-serving-runtime.yaml", "ClusterServingRuntime"))
    runtime["spec"]["supportedModelFormat"] = []  # the field is supportedModelFormats
    assert any("supportedModelFormat" in problem for problem in _problems(runtime))
    service = _one("kserve/inference-service.yaml", "InferenceService")
    wrong = copy.deepcopy(service)
    wrong["spec"]["predictor"]["scaleMetric"] = "queue"  # not among KServe's metrics
    wrong["metadata"]["labels"] = {"app": 1}  # ObjectMeta: label values are strings
    found = _problems(wrong)
    assert any("scaleMetric" in problem for problem in found), found
    assert any("labels" in problem for problem in found), found


# -- KServe: the runtime and the service it describes -----------------------------------------

def test_the_serving_runtime_describes_the_service():
    runtime = _one("kserve/cluster-serving-runtime.yaml", "ClusterServingRuntime")
    spec = runtime["spec"]
    assert "v2" in spec["protocolVersions"]
    (model_format,) = spec["supportedModelFormats"]
    assert model_format == {"name": "ctrserve", "version": str(FORMAT_VERSION),
                            "autoSelect": True, "priority": 1}
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the container KServe mounts models into
    env = {item["name"]: item["value"] for item in container["env"]}
    port = int(env["CTRSERVE_PORT"])
    assert env["CTRSERVE_REPO"] == "/mnt/models" and env["CTRSERVE_HOST"] == "0.0.0.0"
    assert [p["containerPort"] for p in container["ports"]] == [port] == [8080]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": port}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": port}
    assert spec["annotations"]["prometheus.kserve.io/port"] == str(port)
    assert container["command"] == ["ctrserve", "serve"]

    for relative in ("kserve/inference-service.yaml", "kserve/inference-service-raw.yaml"):
        predictor = _one(relative, "InferenceService")["spec"]["predictor"]
        model = predictor["model"]
        assert model["runtime"] == runtime["metadata"]["name"]
        assert model["modelFormat"]["name"] == model_format["name"]
        assert model["protocolVersion"] == "v2"
        # A directory, with its slash: KServe's storage initializer takes every key that
        # starts with the path (ctr/1 would take ctr/10/ too).
        assert model["storageUri"].startswith("s3://") and model["storageUri"].endswith("/")
        assert predictor["serviceAccountName"] == _one("kserve/s3-credentials.yaml",
                                                       "ServiceAccount")["metadata"]["name"]
        assert predictor["minReplicas"] >= 2
    serverless = _one("kserve/inference-service.yaml", "InferenceService")["spec"]["predictor"]
    assert serverless["scaleMetric"] == "concurrency" and serverless["scaleTarget"] > 0


def test_what_the_storage_initializer_leaves_in_mnt_models_serves(trained, tmp_path):
    """storageUri naming one package leaves its files at the root of /mnt/models: the server
    serves it under the name and version its manifest says, with no other step."""
    mnt_models = tmp_path / "mnt" / "models"
    shutil.copytree(trained["repo"] / "ctr" / "1", mnt_models)
    rows = request_rows(trained["rows_file"])[:3]
    with ServiceProcess(mnt_models) as server:
        scored = httpx.post(f"{server.url}/v1/models/ctr/score", json={"rows": rows}, timeout=30)
        assert scored.status_code == 200, scored.text
        assert scored.json()["version"] == 1 and len(scored.json()["probabilities"]) == 3
        index = httpx.post(f"{server.url}/v2/repository/index", json={}, timeout=10).json()
        assert [(row["name"], row["version"], row["state"]) for row in index] == [
            ("ctr", "1", "READY")]
        assert httpx.get(f"{server.url}/v2/models/ctr", timeout=10).json()["versions"] == ["1"]


# -- plain manifests: drain, spread, disruptions, GPU, Redis ---------------------------------

def _pod_spec(relative: str) -> dict:
    return _one(relative, "Deployment")["spec"]["template"]["spec"]


@pytest.mark.parametrize("relative", ["k8s/deployment.yaml", "k8s/gpu/deployment.yaml"])
def test_a_replica_drains_within_its_grace_period(relative):
    """On deletion the pod leaves the Service's endpoints while preStop pauses (it still
    answers what arrives meanwhile); SIGTERM then starts the graceful shutdown, which waits up
    to the server's STOP_TIMEOUT_S for the workers. The grace period must cover both."""
    spec = _pod_spec(relative)
    (container,) = spec["containers"]
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause_s = int(command[1])
    assert pause_s >= 5 and spec["terminationGracePeriodSeconds"] >= pause_s + STOP_TIMEOUT_S
    keys = {(c["topologyKey"], c["whenUnsatisfiable"]) for c in spec["topologySpreadConstraints"]}
    assert keys == {("topology.kubernetes.io/zone", "ScheduleAnyway"),
                    ("kubernetes.io/hostname", "ScheduleAnyway")}
    labels = _one(relative, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for constraint in spec["topologySpreadConstraints"]:
        assert constraint["labelSelector"]["matchLabels"].items() <= labels.items()


def test_the_gpu_variant_replaces_the_cpu_deployment():
    cpu, gpu = _one("k8s/deployment.yaml", "Deployment"), _one("k8s/gpu/deployment.yaml",
                                                                 "Deployment")
    assert gpu["metadata"]["name"] == cpu["metadata"]["name"]  # the HPA, PDB, Service apply
    assert gpu["spec"]["selector"] == cpu["spec"]["selector"]
    (container,) = gpu["spec"]["template"]["spec"]["containers"]
    (cpu_container,) = cpu["spec"]["template"]["spec"]["containers"]
    assert container["command"][-2:] == ["--provider", "cuda"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["image"].endswith(":gpu")
    for key in ("readinessProbe", "livenessProbe", "startupProbe", "lifecycle", "ports",
                "volumeMounts", "securityContext"):
        assert container[key] == cpu_container[key], key
    cpu_env = {item["name"] for item in cpu_container["env"]}
    assert cpu_env <= {item["name"] for item in container["env"]}
    tolerations = gpu["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations


def test_disruptions_redis_and_the_service_fit_the_deployment():
    deployment = _one("k8s/deployment.yaml", "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budget = _one("k8s/pdb.yaml", "PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = _one("k8s/hpa.yaml", "HorizontalPodAutoscaler")
    assert budget["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {item["name"]: item.get("value") for item in container["env"]}
    redis_service = _one("k8s/redis.yaml", "Service")
    redis_set = _one("k8s/redis.yaml", "StatefulSet")
    assert env["CTRSERVE_REDIS_URL"] == (f"redis://{redis_service['metadata']['name']}:"
                                         f"{redis_service['spec']['ports'][0]['port']}/0")
    redis_labels = redis_set["spec"]["template"]["metadata"]["labels"]
    assert redis_service["spec"]["selector"].items() <= redis_labels.items()
    # The ctrserve Service and budget must not take the Redis pod for a replica.
    for selector in (_one("k8s/service.yaml", "Service")["spec"]["selector"],
                     budget["spec"]["selector"]["matchLabels"]):
        assert not selector.items() <= redis_labels.items()


# -- autoscaling on requests in flight ---------------------------------------------------------

def _exported_metric_names() -> set[str]:
    return {family.name for family in metrics.REGISTRY.collect()}


def _adapter_rules() -> dict:
    config_map = _one("k8s/prometheus-adapter.yaml", "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])


def _check_promql(queries: dict[str, str], tmp_path: Path) -> None:
    """promtool parses each query, as the expression of a recording rule."""
    promtool = tool("promtool", "Debian package prometheus")
    rules = {"groups": [{"name": "queries", "rules": [
        {"record": f"check:{name}", "expr": query} for name, query in queries.items()]}]}
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                             text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_hpa_scales_on_a_metric_the_service_exports(tmp_path):
    hpa = _one("k8s/hpa.yaml", "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == _one("k8s/deployment.yaml",
                                                         "Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["target"]["type"] == "AverageValue"
    name = metric["pods"]["metric"]["name"]
    assert name in _exported_metric_names()

    config = _adapter_rules()
    jsonschema.validate(config, ADAPTER_CONFIG_SCHEMA)
    (rule,) = [r for r in config["rules"] if r["name"]["as"] == name]
    assert re.fullmatch(rule["name"]["matches"], name)
    assert rule["seriesQuery"].startswith(name + "{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    # The queries as the adapter sends them (its template filled in) and KEDA's, parsed.
    filled = (rule["metricsQuery"].replace("<<.Series>>", name)
              .replace("<<.LabelMatchers>>", 'namespace="default",pod=~"ctrserve-.*"')
              .replace("<<.GroupBy>>", "pod"))
    assert "<<" not in filled
    keda = _one("kserve/inference-service-raw.yaml", "InferenceService")
    (scaling,) = keda["spec"]["predictor"]["autoScaling"]["metrics"]
    keda_query = scaling["external"]["metric"]["query"]
    assert name in keda_query
    _check_promql({"series": rule["seriesQuery"], "adapter": filled, "keda": keda_query},
                  tmp_path)


# -- the locust file: loopback unless a staging host is named ---------------------------------

def _locust(trained: dict, tmp_path: Path, *flags: str,
            env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, Path]:
    stats = tmp_path / f"locust-{len(list(tmp_path.glob('locust-*')))}"
    command = [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
               "--headless", "-u", "1", "-r", "1", "--run-time", "2s", "--stop-timeout", "2",
               "--only-summary", "--loglevel", "WARNING", "--host", "http://staging.invalid:8000",
               "--json-file", str(stats), *flags]
    environment = {**os.environ, "CTRSERVE_LOCUST_PACKAGE": str(trained["repo"] / "ctr" / "1"),
                   "CTRSERVE_LOCUST_DATA": str(trained["rows_file"]), **(env or {})}
    done = subprocess.run(command, env=environment, capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    return done, stats.with_suffix(".json")


def test_the_locust_file_targets_a_staging_host_only_when_it_is_named(trained, tmp_path):
    other, _ = _locust(trained, tmp_path, "--allow-host", "other.invalid")
    assert other.returncode != 0 and "only targets loopback" in other.stdout + other.stderr
    for flags, env in ((("--allow-host", "staging.invalid"), None),
                       ((), {"CTRSERVE_LOCUST_ALLOW_HOST": "staging.invalid"})):
        allowed, stats = _locust(trained, tmp_path, *flags, env=env)
        output = allowed.stdout + allowed.stderr
        assert "only targets loopback" not in output, output[-3000:]
        # It sent requests to the named host (which does not resolve: each one failed).
        entries = json.loads(stats.read_text())
        sent = sum(entry["num_requests"] for entry in entries)
        assert sent > 0 and sum(entry["num_failures"] for entry in entries) == sent, output
