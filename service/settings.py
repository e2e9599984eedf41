"""Service settings: command-line flags, else environment variables prefixed ``CTRSERVE_``
(``CTRSERVE_REPO=/models``, ``CTRSERVE_MODELS='["ctr"]'``, ``CTRSERVE_MAX_BATCH_ROWS=512``), else
the defaults below. ``ctrserve serve``'s flags are derived from these fields (``--max-batch-rows``
for ``max_batch_rows``), with their descriptions as help."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from .raw_values import MAX_VALUE_BYTES
from .runtime import usable_cpus

ENV_PREFIX = "CTRSERVE_"
#: prometheus-client's multiprocess directory variable (set for several workers).
MULTIPROCESS_DIR = "PROMETHEUS_MULTIPROC_DIR"
#: The repository when none is given: a name no source folder has.
DEFAULT_REPO = Path("model-repository")
#: A repository in S3-compatible object storage: ``s3://BUCKET/PREFIX`` (``object_store.py``).
S3_SCHEME = "s3://"
#: Where the packages of such a repository are downloaded to when no cache is given.
DEFAULT_REPO_CACHE = Path(tempfile.gettempdir()) / "ctrserve-repository-cache"
#: The format of the service's log lines (the server's own and every worker's).
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def one_per_usable_cpu() -> int:
    """The default count of workers: the CPUs this process may use (``runtime.usable_cpus``), so
    that the HTTP work of a loaded server runs on every one of them."""
    return usable_cpus()[0]


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    repo: str = Field(str(DEFAULT_REPO), description="the model repository: a directory of "
                                                     "REPO/NAME/VERSION/ packages written by "
                                                     "'ctrserve export' (or of one package: "
                                                     "what KServe leaves in /mnt/models), or "
                                                     "s3://BUCKET/PREFIX in S3-compatible "
                                                     "object storage (the s3 extra; credentials "
                                                     "and endpoint from the AWS environment "
                                                     "and config files)")
    repo_cache: Path = Field(DEFAULT_REPO_CACHE, description="where the packages of an s3:// "
                                                             "repository are downloaded and "
                                                             "checked before they serve (a "
                                                             "directory per bucket and prefix "
                                                             "below it)")
    models: list[str] = Field([],
                              description="models to serve (repeatable; default: every model "
                                          "of the repository)")
    versions: dict[str, int] = Field({},
                                     description='pinned versions by model, e.g. {"ctr": 2}; '
                                                 "other models serve their highest version")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, description="port to listen on")
    workers: int = Field(default_factory=one_per_usable_cpu, ge=1,
                         description="uvicorn worker processes (default: one per CPU this "
                                     "process may use: its affinity, its cgroup CPU quota)")

    provider: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="ONNX Runtime provider; auto: CUDA when a GPU and its libraries "
                            "are usable and the model's CUDA session builds, else CPU (with a "
                            "warning saying why); cuda: refuse to start without a usable GPU")
    cuda_device_ids: list[Annotated[int, Field(ge=0)]] = Field(
        [0], min_length=1, description="CUDA devices to serve on: worker i of the workers "
                                       "uses the (i mod count)-th, so list every GPU to "
                                       "spread the workers over them")
    cuda_memory_limit_mb: int = Field(0, ge=0, description="GPU memory ONNX Runtime's arena "
                                                           "may hold, per worker (MiB; 0: no "
                                                           "limit)")
    cuda_arena_strategy: Literal["next_power_of_two", "same_as_requested"] = Field(
        "next_power_of_two", description="how ONNX Runtime's GPU arena grows: in powers of "
                                         "two (fewer, larger allocations) or by what each "
                                         "allocation asks (tighter under a memory limit)")
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads per "
                                                       "session; 0: the CPUs this process may "
                                                       "use (affinity, cgroup CPU quota) "
                                                       "divided among the workers")

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
    max_request_rows: int = Field(0, ge=0, description="rows per request beyond which it is "
                                                       "refused (413); 0: max_queue_rows, and "
                                                       "more than max_queue_rows is refused at "
                                                       "start (such a request could never be "
                                                       "queued)")
    max_value_bytes: int = Field(MAX_VALUE_BYTES, ge=1, description="UTF-8 bytes a text value "
                                                                    "of a categorical column "
                                                                    "may have (hex columns: 16 "
                                                                    "digits); a longer one is "
                                                                    "refused (400) while the "
                                                                    "body is decoded")
    max_concurrency: int = Field(0, ge=0, description="requests in flight per worker beyond "
                                                      "which a request is answered 503 "
                                                      "(Retry-After) before its body is read; "
                                                      "idle connections do not count (0: no "
                                                      "limit)")
    max_body_bytes: int = Field(64 * 1024 * 1024, ge=1, description="request bodies beyond "
                                                                    "this size are refused "
                                                                    "(413)")
    body_timeout_s: float = Field(30.0, gt=0, description="a request body must arrive within "
                                                          "this time (408 otherwise)")
    header_timeout_s: float = Field(10.0, gt=0, description="a connection must send a complete "
                                                            "request head within this time of "
                                                            "connecting (after a response: of "
                                                            "the keep-alive timeout's end), "
                                                            "else it is closed (s)")
    keepalive_timeout_s: int = Field(5, ge=1, description="an idle connection is closed this "
                                                          "long after its last response (s)")

    admin_token: str = Field("", description="bearer token the repository routes (load, "
                                             "unload, index) require; empty: open")
    poll_interval_s: float = Field(0.0, ge=0, description="scan the repository this often "
                                                          "for new versions and for models "
                                                          "not served yet (s; 0: never)")
    wait_for_models_s: float = Field(0.0, ge=0, description="at start, wait up to this long "
                                                            "for the repository to hold a "
                                                            "model package (a volume filled "
                                                            "later) before refusing to start "
                                                            "(s; 0: refuse at once)")
    control_interval_s: float = Field(0.5, gt=0, description="check the control record other "
                                                             "workers write this often (s)")
    log_level: Literal["debug", "info", "warning", "error"] = Field("info",
                                                                    description="log level")
    access_log: bool = Field(False, description="log a line per request (uvicorn's access "
                                                "log; off by default: the metrics count "
                                                "every request, and a line per request costs "
                                                "small requests a visible share of their "
                                                "time)")

    redis_url: str = Field("", description="Redis for the online feature store and for "
                                           "rollout across replicas (empty: none; ranking uses "
                                           "the embedded store)")
    redis_namespace: str = Field("ctrserve", description="prefix of every Redis key")
    redis_timeout_ms: int = Field(100, ge=1, description="limit on one request's feature reads "
                                                         "and on control reads and writes (ms)")
    redis_required: bool = Field(False, description="readiness requires Redis to answer")

    @field_validator("repo", mode="before")
    @classmethod
    def _repo_as_text(cls, repo: object) -> object:
        """A directory given as a Path (the demo, the tests) is taken as its text: the field is
        text because an s3:// URL is no path (Path would fold its ``//``)."""
        return os.fspath(repo) if isinstance(repo, os.PathLike) else repo

    @property
    def repo_in_object_store(self) -> bool:
        """Whether ``repo`` is an s3:// URL (``object_store.py``) rather than a directory."""
        return self.repo.startswith(S3_SCHEME)

    @field_validator("max_request_rows")
    @classmethod
    def _request_rows_fit_the_queue(cls, rows: int, info: ValidationInfo) -> int:
        """0 takes ``max_queue_rows`` (declared above, so validated first); more is refused: a
        request above the queue's size could never be queued, yet would be refused as if only
        for now (503, Retry-After) forever."""
        queue_rows = info.data.get("max_queue_rows")
        if queue_rows is None:  # max_queue_rows is invalid itself, and reported
            return rows
        if rows > queue_rows:
            raise ValueError(f"{rows:,} is larger than max_queue_rows ({queue_rows:,}): such a "
                             "request could never be queued; lower max_request_rows or raise "
                             "max_queue_rows")
        return rows or queue_rows
