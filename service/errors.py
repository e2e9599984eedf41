"""Errors a client can cause or meet, each with its HTTP status. Every route answers them with a
body ``{"error": "<message>"}`` (KServe's and Triton's shape), never a traceback."""

from __future__ import annotations

from typing import ClassVar


class ServiceError(Exception):
    status = 500
    headers: ClassVar[dict[str, str]] = {}
    #: For a refusal (the service cannot take the request now; it may later), its reason in
    #: ``ctrserve_rejections_total`` (the app's error handler passes it on); None otherwise.
    reason: ClassVar[str | None] = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    status = 400


class Unauthorized(ServiceError):
    status = 401
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": "Bearer"}


class NotFound(ServiceError):
    status = 404


class PayloadTooLarge(ServiceError):
    status = 413


class QueueFull(ServiceError):
    status = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}
    reason = "queue_full"


class Unavailable(ServiceError):
    status = 503
    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}
    reason = "unavailable"


class FeatureStoreUnavailable(Unavailable):
    """The feature store did not answer, or is being left alone after it did not (backoff)."""

    reason = "feature_store"


class RequestTimeout(ServiceError):
    status = 504
    reason = "timeout"
