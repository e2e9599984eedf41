"""Prometheus metrics, correct with one or several uvicorn workers.

With several workers ``PROMETHEUS_MULTIPROC_DIR`` is set (``server.py`` does it) and every
process writes its samples there; ``/metrics`` merges them. Multiprocess mode cannot run gauge
callbacks or Info metrics, so every gauge here is a plain gauge set explicitly (on events, or on
a one-second timer for the process RSS) with a ``multiprocess_mode`` saying how the workers'
values combine: per process (``liveall``, a ``pid`` label), summed (``livesum``) or the highest
(``livemax``, for "is served" flags and byte counts that every worker reports alike).

Buckets: latencies from 100 us to 10 s (in-process inference of a small batch takes ~100 us,
a queue-full overload seconds), with a bound at 60 ms, the serving goal's p99 (MLPerf DLRMv2's
latency bound), so that the share of requests within it is read from one bucket; rows per batch
in powers of two from 1 to 65536.

Refusals: whatever refuses a request because of the service's state (a full queue, no result in
time, a model not served, the feature store not answering, too many requests in flight) writes
its reason into the request's scope under ``REFUSAL_REASON``; ``MetricsMiddleware`` counts it in
``ctrserve_rejections_total`` beside the request's own count, with the same model label, so the
two agree one to one. The batcher adds ``bad_value`` (a value the transform rejects, 400). Every
label child that a dashboard or an alert takes a rate of is created at 0 when its model or store
appears, so the first event shows as an increase.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from fastapi.routing import iter_route_contexts
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)
from starlette.routing import BaseRoute, Match, Route

from ctrserve.models.transform import MISSING_ID, OOV_ID

from .settings import MULTIPROCESS_DIR

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.06, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = tuple(float(2**k) for k in range(17))

REQUESTS = Counter("ctrserve_requests_total", "HTTP requests by model, route and status",
                   ["model", "route", "status"])
IN_FLIGHT = Gauge("ctrserve_requests_in_flight",
                  "HTTP requests received and not yet answered (the scrape itself left out)",
                  multiprocess_mode="livesum")
REQUEST_SECONDS = Histogram("ctrserve_request_seconds", "End-to-end request latency",
                            ["model", "route"], buckets=LATENCY_BUCKETS)
QUEUE_SECONDS = Histogram("ctrserve_queue_wait_seconds",
                          "Time a request's rows waited for their batch to start",
                          ["model", "version"], buckets=LATENCY_BUCKETS)
COMPUTE_SECONDS = Histogram("ctrserve_compute_seconds", "ONNX Runtime time per batch",
                            ["model", "version"], buckets=LATENCY_BUCKETS)
TRANSFORM_SECONDS = Histogram("ctrserve_transform_seconds", "Feature transform time per batch",
                              ["model", "version"], buckets=LATENCY_BUCKETS)
BATCH_ROWS = Histogram("ctrserve_batch_rows", "Rows per batch", ["model", "version"],
                       buckets=ROW_BUCKETS)
QUEUE_ROWS = Gauge("ctrserve_queue_rows", "Rows waiting for a batch", ["model"],
                   multiprocess_mode="livesum")
REJECTIONS = Counter("ctrserve_rejections_total", "Requests refused, by reason",
                     ["model", "reason"])
#: ``ctrserve_rejections_total``'s reasons: the ``reason`` of the refusals in ``errors.py``,
#: ``concurrency`` (``limits.ConcurrencyLimitMiddleware``) and ``bad_value`` (a raw value the
#: feature transform rejects, counted by the batcher).
REJECTION_REASONS = ("queue_full", "timeout", "bad_value", "unavailable", "feature_store",
                     "concurrency")
#: The key of the ASGI scope where a refusal leaves its reason for ``MetricsMiddleware``.
REFUSAL_REASON = "ctrserve.refusal_reason"
LOAD_SECONDS = Histogram("ctrserve_model_load_seconds", "Time to load and warm up a version",
                         ["model"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
LOAD_FAILURES = Counter("ctrserve_model_load_failures_total", "Versions that failed to load",
                        ["model"])
MODEL_ACTIVE = Gauge("ctrserve_model_active",
                     "1 for the version each model serves (0 once replaced or unloaded)",
                     ["model", "version", "provider"], multiprocess_mode="livemax")
EMBEDDING_BYTES = Gauge("ctrserve_embedding_bytes",
                        "Bytes a table needs at inference (everything counted)",
                        ["model", "version", "table", "scheme"], multiprocess_mode="livemax")
MODEL_EMBEDDING_BYTES = Gauge("ctrserve_model_embedding_bytes",
                              "Bytes all tables of a model version need at inference",
                              ["model", "version"], multiprocess_mode="livemax")
FULL_EMBEDDING_BYTES = Gauge("ctrserve_full_embedding_bytes",
                             "Bytes the uncompressed fp32 tables would need",
                             ["model", "version"], multiprocess_mode="livemax")
COMPRESSION_RATIO = Gauge("ctrserve_compression_ratio",
                          "Full-table bytes over stored embedding bytes",
                          ["model", "version"], multiprocess_mode="livemax")
PROCESS_RSS = Gauge("ctrserve_process_resident_bytes", "Resident memory of each worker",
                    multiprocess_mode="liveall")
GPU_MEMORY_USED = Gauge("ctrserve_gpu_memory_used_bytes",
                        "GPU memory this worker process holds (NVML, by PID)", ["gpu"],
                        multiprocess_mode="liveall")
GPU_UTILIZATION = Gauge("ctrserve_gpu_utilization_ratio",
                        "Share of time this worker's kernels kept the GPU's SMs busy, in the "
                        "last NVML sample (NVML, by PID)", ["gpu"], multiprocess_mode="liveall")
GPU_MEMORY_TOTAL = Gauge("ctrserve_gpu_memory_total_bytes", "GPU memory (NVML)", ["gpu"],
                         multiprocess_mode="livemax")
SCORED_ROWS = Counter("ctrserve_scored_rows_total", "Rows scored", ["model", "version"])
PROBABILITY_SUM = Counter("ctrserve_probability_sum_total",
                          "Sum of the predicted probabilities (divide by scored rows: the mean)",
                          ["model", "version"])
MISSING_VALUES = Counter("ctrserve_feature_missing_total", "Missing values seen, by column",
                         ["model", "column"])
OOV_VALUES = Counter("ctrserve_feature_oov_total",
                     "Categorical values outside the vocabulary, by column", ["model", "column"])


def render() -> tuple[bytes, str]:
    """The exposition text of every worker's metrics."""
    if os.environ.get(MULTIPROCESS_DIR):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST


def process_exited() -> None:
    """Drops this worker's live gauges (multiprocess mode)."""
    if os.environ.get(MULTIPROCESS_DIR):
        multiprocess.mark_process_dead(os.getpid())


def resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def update_process_gauges() -> None:
    PROCESS_RSS.set(resident_bytes())
    for index, used, utilization, total in _gpu_usage():
        GPU_MEMORY_USED.labels(str(index)).set(used)
        GPU_UTILIZATION.labels(str(index)).set(utilization)
        GPU_MEMORY_TOTAL.labels(str(index)).set(total)


#: Per GPU, the time stamp (us) of the newest NVML utilisation sample already read.
_utilization_seen_us: dict[int, int] = {}


@functools.cache
def _nvml() -> Any:
    """NVML (``nvidia-ml-py``, the gpu extra), initialised once; None without it or a driver."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def _gpu_usage() -> list[tuple[int, int, float, int]]:
    """(index, bytes this process holds, its SM utilisation 0..1, device memory) for every GPU
    this process holds memory on, through NVML. NVML knows processes by their PIDs in the host's
    PID namespace: in a container that has its own, no process matches and nothing is reported
    (``docs/gpu.md``: run the container with the host's PID namespace, or use dcgm-exporter)."""
    nvml = _nvml()
    if nvml is None:
        return []
    pid, usage = os.getpid(), []
    try:
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            used = sum(process.usedGpuMemory or 0
                       for process in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
                       if process.pid == pid)
            if used:
                usage.append((index, used, _sm_utilization(nvml, handle, index, pid),
                              int(nvml.nvmlDeviceGetMemoryInfo(handle).total)))
    except nvml.NVMLError:
        return usage
    return usage


def _sm_utilization(nvml: Any, handle: Any, index: int, pid: int) -> float:
    """This process's SM utilisation on GPU ``index`` in the newest sample NVML took since the
    last look (0 when none: no kernel of any process ran)."""
    try:
        samples = nvml.nvmlDeviceGetProcessUtilization(handle, _utilization_seen_us.get(index, 0))
    except nvml.NVMLError:  # NOT_FOUND: no sample since the last look
        return 0.0
    if samples:
        _utilization_seen_us[index] = max(sample.timeStamp for sample in samples)
    ours = [sample for sample in samples if sample.pid == pid]
    return max(ours, key=lambda sample: sample.timeStamp).smUtil / 100 if ours else 0.0


def model_loaded(name: str, version: int, provider: str, manifest: dict,
                 seconds: float) -> None:
    LOAD_SECONDS.labels(name).observe(seconds)
    LOAD_FAILURES.labels(name)  # at 0: a later failed load shows as an increase
    MODEL_ACTIVE.labels(name, str(version), provider).set(1)
    for table in manifest["tables"]:
        EMBEDDING_BYTES.labels(name, str(version), table["table"], table["scheme"]).set(
            table["bytes"])
    sizes = manifest["bytes"]
    MODEL_EMBEDDING_BYTES.labels(name, str(version)).set(sizes["embeddings"])
    FULL_EMBEDDING_BYTES.labels(name, str(version)).set(sizes["full_embeddings"])
    COMPRESSION_RATIO.labels(name, str(version)).set(
        sizes["full_embeddings"] / max(1, sizes["embeddings"]))


def model_released(name: str, version: int, provider: str, manifest: dict) -> None:
    """Zeroes a released version's series (multiprocess files keep a removed series' last
    value, so it is set to 0 rather than removed)."""
    MODEL_ACTIVE.labels(name, str(version), provider).set(0)
    for table in manifest["tables"]:
        EMBEDDING_BYTES.labels(name, str(version), table["table"], table["scheme"]).set(0)
    for gauge in (MODEL_EMBEDDING_BYTES, FULL_EMBEDDING_BYTES, COMPRESSION_RATIO):
        gauge.labels(name, str(version)).set(0)


class BatchMetrics:
    """The per-batch series of one model version, with their label children resolved once."""

    def __init__(self, name: str, version: int, columns: list[str],
                 dense_columns: list[str]) -> None:
        labels = (name, str(version))
        self.queue = QUEUE_SECONDS.labels(*labels)
        self.compute = COMPUTE_SECONDS.labels(*labels)
        self.transform = TRANSFORM_SECONDS.labels(*labels)
        self.rows = BATCH_ROWS.labels(*labels)
        self.scored = SCORED_ROWS.labels(*labels)
        self.probability_sum = PROBABILITY_SUM.labels(*labels)
        self.queue_rows = QUEUE_ROWS.labels(name)
        self.missing = [MISSING_VALUES.labels(name, c) for c in columns]
        self.oov = [OOV_VALUES.labels(name, c) for c in columns]
        self.dense_missing = [MISSING_VALUES.labels(name, c) for c in dense_columns]
        #: Every reason's child, created at 0 so that a model's first refusal is an increase;
        #: the batcher counts ``bad_value`` here, the app's error handler the refusals.
        self.rejections = {reason: REJECTIONS.labels(name, reason)
                           for reason in REJECTION_REASONS}

    def batch(self, rows: int, transform_seconds: float, compute_seconds: float,
              probabilities: np.ndarray) -> None:
        self.rows.observe(rows)
        self.transform.observe(transform_seconds)
        self.compute.observe(compute_seconds)
        self.scored.inc(rows)
        self.probability_sum.inc(float(probabilities.sum(dtype=np.float64)))

    def data_quality(self, sparse: np.ndarray, dense_missing: np.ndarray | None,
                     vocabulary_columns: np.ndarray) -> None:
        """Counts the missing id per column and the out-of-vocabulary id in vocabulary columns;
        ``dense_missing``: NaN counts per dense column of the raw rows."""
        missing = np.count_nonzero(sparse == MISSING_ID, axis=0)
        oov = np.count_nonzero(sparse == OOV_ID, axis=0)
        for index, count in enumerate(missing):
            if count:
                self.missing[index].inc(int(count))
            if vocabulary_columns[index] and oov[index]:
                self.oov[index].inc(int(oov[index]))
        if dense_missing is not None:
            for index, count in enumerate(dense_missing):
                if count:
                    self.dense_missing[index].inc(int(count))


def model_label(name: str, known_model: Callable[[str], bool]) -> str:
    """The ``model`` label of a request for ``name``: the name where the repository has it, else
    empty (a client's made-up names must not create series)."""
    return name if name and known_model(name) else ""


#: A route's template and its ``matches(scope)``.
RouteMatcher = tuple[str, Callable[[dict], tuple[Match, dict]]]


def route_matchers(routes: Sequence[BaseRoute]) -> list[RouteMatcher]:
    """Each route of ``routes`` with its template. FastAPI keeps an included router as one entry
    that matches without naming its route: its route contexts, one per route, name them."""
    return [(context.path, context.matches) for context in iter_route_contexts(routes)
            if context.path is not None]


def matched_route(scope: dict, matchers: Sequence[RouteMatcher]) -> tuple[str, dict]:
    """The route template of a request and its path parameters: those routing found, else (an
    answer given before routing, such as the body limits' 413 and 408) those of the route the
    path matches, a route of another method last; ``unmatched`` for a path no route has."""
    route = scope.get("route")
    if isinstance(route, Route):
        return route.path, scope.get("path_params", {})
    other_method = None
    for path, matches in matchers:
        match, child = matches(scope)
        if match is Match.FULL:
            return path, child.get("path_params", {})
        if match is Match.PARTIAL and other_method is None:
            other_method = (path, child.get("path_params", {}))
    return other_method or ("unmatched", {})


class MetricsMiddleware:
    """Counts and times every HTTP request by model and route template, counts the refusals
    among them by the reason left in the scope (``REFUSAL_REASON``), tracks the requests in
    flight, and tags each response with the worker's PID (``x-worker-pid``). The scrape of
    ``/metrics`` itself is left out.

    The model label is ``model_label``'s. The labelled children are kept (their number is
    bounded by models x routes x statuses): ``labels()`` per request was a visible share of a
    single-row request's time.
    """

    def __init__(self, app, known_model: Callable[[str], bool],
                 routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.known_model = known_model
        #: The app's routes (the router's own list: routes added later are in it), and their
        #: matchers once the first request needs them (every route is there by then).
        self.routes = routes
        self._matchers: list[RouteMatcher] | None = None
        self.pid_header = (b"x-worker-pid", str(os.getpid()).encode())
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/metrics":
            await self.app(scope, receive, self._tagged(send, [0]))
            return
        started = time.perf_counter()
        status = [500]
        IN_FLIGHT.inc()
        try:
            await self.app(scope, receive, self._tagged(send, status))
        finally:
            IN_FLIGHT.dec()
            if self._matchers is None:
                self._matchers = route_matchers(self.routes)
            route, path_params = matched_route(scope, self._matchers)
            model = model_label(path_params.get("name", ""), self.known_model)
            count, seconds = self._labelled(model, route, status[0])
            count.inc()
            seconds.observe(time.perf_counter() - started)
            reason = scope.get(REFUSAL_REASON)
            if reason is not None:
                REJECTIONS.labels(model, reason).inc()

    def _tagged(self, send, status: list[int]):
        """``send`` that adds the PID header to the response and notes its status."""
        async def tagged_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), self.pid_header]
            await send(message)
        return tagged_send

    def _labelled(self, model: str, route: str, status: int) -> tuple[Counter, Histogram]:
        key = (model, route, status)
        children = self._children.get(key)
        if children is None:
            children = (REQUESTS.labels(model, route, str(status)),
                        REQUEST_SECONDS.labels(model, route))
            self._children[key] = children
        return children


FEATURE_STORE_SECONDS = Histogram("ctrserve_feature_store_seconds",
                                  "Feature store (Redis) time per ranking request",
                                  buckets=LATENCY_BUCKETS)
FEATURE_STORE_ERRORS = Counter("ctrserve_feature_store_errors_total",
                               "Feature store (Redis) reads that failed, by kind", ["kind"])
#: ``ctrserve_feature_store_errors_total``'s kinds.
FEATURE_STORE_ERROR_KINDS = ("timeout", "connection", "error")
MISSING_ENTITIES = Counter("ctrserve_missing_entities_total",
                           "Entity ids of ranking requests with no stored features",
                           ["model", "entity"])
