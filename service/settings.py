"""Service settings: command-line flags, else environment variables prefixed ``CTRSERVE_``
(``CTRSERVE_REPO=/models``, ``CTRSERVE_MODELS='["ctr"]'``, ``CTRSERVE_MAX_BATCH_ROWS=512``), else
the defaults below. ``ctrserve serve``'s flags are derived from these fields (``--max-batch-rows``
for ``max_batch_rows``), with their descriptions as help."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "CTRSERVE_"
#: prometheus-client's multiprocess directory variable (set for several workers).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: The repository when none is given: a name no source folder has.
DEFAULT_REPO = Path("model-repository")


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    repo: Path = Field(DEFAULT_REPO, description="the model repository: REPO/NAME/VERSION/ "
                                                 "packages written by 'ctrserve export'")
    models: list[str] = Field([],
                              description="models to serve (repeatable; default: every model "
                                          "of the repository)")
    versions: dict[str, int] = Field({},
                                     description='pinned versions by model, e.g. {"ctr": 2}; '
                                                 "other models serve their highest version")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    workers: int = Field(1, ge=1, description="uvicorn worker processes")

    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime provider; auto: CUDA when a GPU and its libraries "
                            "are usable, else CPU")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per "
                                                       "session; 0: the cores divided among "
                                                       "the workers")

    batching: bool = Field(True, description="dynamic batching: rows of concurrent requests "
                                             "run as one batch")
    max_batch_rows: int = Field(1024, ge=1, description="rows per batch at most")
    max_queue_delay_us: int = Field(500, ge=0, description="how long a batch waits for more "
                                                           "rows after its first arrived (us)")
    max_queue_rows: int = Field(65536, ge=1, description="rows waiting per model beyond which "
                                                         "requests are refused at once (503, "
                                                         "Retry-After)")
    request_timeout_ms: int = Field(0, ge=0, description="per-request limit on waiting and "
                                                         "running (ms; 0: none)")
    max_request_rows: int = Field(100_000, ge=1, description="rows per request beyond which "
                                                             "it is refused (413)")
    max_concurrency: int = Field(0, ge=0, description="connections plus running requests per "
                                                      "worker beyond which uvicorn answers 503 "
                                                      "before reading the body (0: no limit)")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1, description="request bodies beyond "
                                                                    "this size are refused "
                                                                    "(413)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within "
                                                          "this time (408 otherwise)")

    admin_token: str = Field("", description="bearer token the repository routes (load, "
                                             "unload, index) require; empty: open")
    poll_interval_s: float = Field(0.0, ge=0, description="scan the repository for new "
                                                          "versions this often (s; 0: never)")
    control_interval_s: float = Field(0.5, gt=0, description="check the control record other "
                                                             "workers write this often (s)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info",
                                                                    description="log level")

    redis_url: str = Field("", description="Redis for the online feature store and for "
                                           "rollout across replicas (empty: none; ranking uses "
                                           "the embedded store)")
    redis_namespace: str = Field("ctrserve", description="prefix of every Redis key")
    redis_timeout_ms: int = Field(100, ge=1, description="limit on one request's feature reads "
                                                         "and on control reads and writes (ms)")
    redis_required: bool = Field(False, description="readiness requires Redis to answer")
