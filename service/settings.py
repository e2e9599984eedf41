"""Service settings: command-line flags, or environment variables prefixed ``CTRSERVE_``
(``CTRSERVE_REPO=/models``, ``CTRSERVE_MODELS='["ctr"]'``, ``CTRSERVE_MAX_BATCH_ROWS=512``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

#: prometheus-client's multiprocess directory variable (set for several workers).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CTRSERVE_", extra="ignore")

    #: The model repository: ``REPO/NAME/VERSION/`` packages.
    repo: Path = Path("models")
    #: Models to load at start; empty: every model in the repository.
    models: list[str] = Field(default_factory=list)
    #: Pinned versions by model name; other models serve their highest version.
    versions: dict[str, int] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 1

    #: ``auto``: CUDA when a GPU and its libraries are usable, else CPU.
    provider: Literal["auto", "cpu", "cuda"] = "auto"
    #: ONNX Runtime intra-op threads per session; 0: the cores divided among the workers.
    intra_op_threads: int = 0

    #: Dynamic batching: rows of concurrent requests run as one batch of at most this many rows,
    #: waiting at most ``max_queue_delay_us`` for more after the first arrives.
    batching: bool = True
    max_batch_rows: int = 1024
    max_queue_delay_us: int = 500
    #: Rows waiting per model beyond which requests are rejected at once (503, Retry-After).
    max_queue_rows: int = 65536
    #: Per-request limit on the time spent waiting and running, in ms (0: none).
    request_timeout_ms: int = 0
    #: Rows per request beyond which the request is refused (413).
    max_request_rows: int = 100_000
    #: Connections plus running requests per worker beyond which uvicorn answers 503 at once,
    #: before reading the body (0: no limit). Sheds load when parsing, not inference, is the
    #: bottleneck.
    max_concurrency: int = 0
    #: Request bodies beyond this many bytes are refused (413).
    max_body_bytes: int = 64 * 1024 * 1024
    #: A request body must arrive within this many seconds (408 otherwise).
    body_timeout_s: float = 30.0

    #: Bearer token required by the repository control routes (load, unload); empty: open.
    admin_token: str = ""
    #: Seconds between scans of the repository for new versions (0: never).
    poll_interval_s: float = 0.0
    #: Seconds between checks of the control record other workers write (load/unload).
    control_interval_s: float = 0.5
    log_level: str = "info"

    #: Redis for the online feature store and for rollout across replicas (empty: none; the
    #: embedded store serves ranking from each feature view's source files).
    redis_url: str = ""
    redis_namespace: str = "ctrserve"
    #: Limit on one request's feature reads (and on control reads and writes).
    redis_timeout_ms: int = 100
    #: Whether readiness requires Redis to answer.
    redis_required: bool = False
