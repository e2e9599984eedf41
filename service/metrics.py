"""Prometheus metrics, correct with one or several uvicorn workers.

With several workers ``PROMETHEUS_MULTIPROC_DIR`` is set (``server.py`` does it) and every
process writes its samples there; ``/metrics`` merges them. Multiprocess mode cannot run gauge
callbacks or Info metrics, so every gauge here is a plain gauge set explicitly (on events, or on
a one-second timer for the process RSS) with a ``multiprocess_mode`` saying how the workers'
values combine: per process (``liveall``, a ``pid`` label), summed (``livesum``) or the highest
(``livemax``, for "is served" flags and byte counts that every worker reports alike).

Buckets: latencies from 100 us to 10 s (in-process inference of a small batch takes ~100 us,
a queue-full overload seconds); rows per batch in powers of two from 1 to 65536.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import numpy as np
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

from ctrserve.models.transform import MISSING_ID, OOV_ID

from .settings import MULTIPROCESS_DIR

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                   0.5, 1.0, 2.5, 5.0, 10.0)
ROW_BUCKETS = tuple(float(2**k) for k in range(17))

REQUESTS = Counter("ctrserve_requests_total", "HTTP requests by model, route and status",
                   ["model", "route", "status"])
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
EMBEDDING_BYTES_TOTAL = Gauge("ctrserve_embedding_bytes_total",
                              "Bytes all tables of a model need at inference",
                              ["model", "version"], multiprocess_mode="livemax")
FULL_EMBEDDING_BYTES = Gauge("ctrserve_full_embedding_bytes",
                             "Bytes the uncompressed fp32 tables would need",
                             ["model", "version"], multiprocess_mode="livemax")
COMPRESSION_RATIO = Gauge("ctrserve_compression_ratio",
                          "Full-table bytes over stored embedding bytes",
                          ["model", "version"], multiprocess_mode="livemax")
PROCESS_RSS = Gauge("ctrserve_process_resident_bytes", "Resident memory of each worker",
                    multiprocess_mode="liveall")
GPU_MEMORY_USED = Gauge("ctrserve_gpu_memory_used_bytes", "GPU memory in use (NVML)",
                        ["gpu"], multiprocess_mode="livemax")
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
    for index, used, total in _gpu_memory():
        GPU_MEMORY_USED.labels(str(index)).set(used)
        GPU_MEMORY_TOTAL.labels(str(index)).set(total)


def _gpu_memory() -> list[tuple[int, int, int]]:
    """(index, used, total) per GPU through NVML, when ``nvidia-ml-py`` and a GPU are present."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
        result = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
            result.append((index, int(info.used), int(info.total)))
        return result
    except pynvml.NVMLError:
        return []


def model_loaded(name: str, version: int, provider: str, manifest: dict,
                 seconds: float) -> None:
    LOAD_SECONDS.labels(name).observe(seconds)
    MODEL_ACTIVE.labels(name, str(version), provider).set(1)
    for table in manifest["tables"]:
        EMBEDDING_BYTES.labels(name, str(version), table["table"], table["scheme"]).set(
            table["bytes"])
    sizes = manifest["bytes"]
    EMBEDDING_BYTES_TOTAL.labels(name, str(version)).set(sizes["embeddings"])
    FULL_EMBEDDING_BYTES.labels(name, str(version)).set(sizes["full_embeddings"])
    COMPRESSION_RATIO.labels(name, str(version)).set(
        sizes["full_embeddings"] / max(1, sizes["embeddings"]))


def model_released(name: str, version: int, provider: str, manifest: dict) -> None:
    """Zeroes a released version's series (multiprocess files keep a removed series' last
    value, so it is set to 0 rather than removed)."""
    MODEL_ACTIVE.labels(name, str(version), provider).set(0)
    for table in manifest["tables"]:
        EMBEDDING_BYTES.labels(name, str(version), table["table"], table["scheme"]).set(0)
    for gauge in (EMBEDDING_BYTES_TOTAL, FULL_EMBEDDING_BYTES, COMPRESSION_RATIO):
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
        self.rejections = {reason: REJECTIONS.labels(name, reason)
                           for reason in ("queue_full", "timeout", "bad_value", "unavailable")}

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


def route_label(scope: dict) -> str:
    route = scope.get("route")
    return getattr(route, "path", "unmatched")


class MetricsMiddleware:
    """Counts and times every HTTP request by model and route template, and tags each response
    with the worker's PID (``x-worker-pid``).

    The model label is the name in the path only where ``known_model`` says the repository has
    it, else empty: a client's made-up names must not create series. The labelled children are
    kept (their number is bounded by models x routes x statuses): ``labels()`` per request was
    a visible share of a single-row request's time.
    """

    def __init__(self, app, known_model: Callable[[str], bool]) -> None:
        self.app = app
        self.known_model = known_model
        self.pid_header = (b"x-worker-pid", str(os.getpid()).encode())
        self._children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = [500]

        async def tagged_send(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = [*message.get("headers", ()), self.pid_header]
            await send(message)

        try:
            await self.app(scope, receive, tagged_send)
        finally:
            route = route_label(scope)
            if route != "/metrics":
                count, seconds = self._labelled(scope, route, status[0])
                count.inc()
                seconds.observe(time.perf_counter() - started)

    def _labelled(self, scope: dict, route: str, status: int) -> tuple[Counter, Histogram]:
        name = scope.get("path_params", {}).get("name", "")
        model = name if name and self.known_model(name) else ""
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
                               "Feature store (Redis) failures, by kind", ["kind"])
MISSING_ENTITIES = Counter("ctrserve_missing_entities_total",
                           "Entity ids of ranking requests with no stored features",
                           ["model", "entity"])
