"""What ``/openapi.json`` says beyond what FastAPI infers from the routes: every status each route
answers, failures with the ``{"error": ...}`` body; the bodies of the answers; the admin token;
the path parameters' forms. Routes declare their answers with ``answers()``; ``document()``
builds the whole document (``schemathesis run --checks all`` holds the service to it,
``tests/test_reliability.py``).

The routes take their parameters and bodies as text and answer failures themselves (the one
error policy, ``dataplane.py``), so FastAPI's 422 validation answer, which it adds to every
route with parameters, is never sent: ``document()`` leaves it out.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

#: What each failure status means, in the words of the error policy.
FAILURES: dict[int, str] = {
    400: "The request is malformed: a body that is not valid JSON or not valid in its "
         "Content-Encoding, an unknown column or input, a value of the wrong type or one that "
         "does not parse.",
    401: "The server has an admin token and the request does not carry it "
         "(Authorization: Bearer <token>).",
    404: "An unknown model, a version that is not the served one or not a positive integer, or "
         "(ranking) a model without a feature view.",
    408: "The body did not arrive within body_timeout_s.",
    413: "The body is over max_body_bytes (sent or decoded), or has more rows than "
         "max_request_rows or than the model's queue holds (max_queue_rows).",
    415: "A Content-Encoding the server does not decode (it decodes gzip and deflate).",
    503: "Refused for now, with Retry-After: the model is not served (unloaded, failed to load, "
         "being swapped), its queue is full, the feature store does not answer (ranking), or "
         "too many requests are in flight (max_concurrency).",
    504: "No result within request_timeout_ms.",
}
#: Statuses of a request with a body, answered before any route sees it (``limits.py``).
BODY = (400, 408, 413, 415)
#: Statuses of a request for a model (the data plane's policy) and of any request (the
#: concurrency limit, 503).
MODEL = (404, 503)
#: The OpenAPI name of the admin token's security scheme.
ADMIN_TOKEN = "adminToken"
#: A model's name: a plain directory name; any other is 404.
NAME = {"type": "string", "pattern": r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"}
#: A version: a positive integer in decimal; any other is 404.
VERSION = {"type": "string", "pattern": r"^0*[1-9][0-9]*$"}
#: The form of each path parameter the routes have.
PATH_PARAMETERS = {"name": NAME, "version": VERSION}


class ErrorBody(BaseModel):
    """The body of every failure."""

    error: str = Field(description="what went wrong, naming the column, row or limit")


def answers(ok: Any, *statuses: int, ok_content: dict | None = None
            ) -> dict[int | str, dict[str, Any]]:
    """A route's declared answers: 200 with the body of type ``ok`` (a model, a list of one, or
    None) and ``ok_content`` (other media types), and each failure status with the error body
    (503 with ``Retry-After``, 401 with ``WWW-Authenticate``)."""
    declared: dict[int | str, dict[str, Any]] = {200: {"description": "Success"}}
    if ok is not None:
        declared[200]["model"] = ok
    if ok_content is not None:
        declared[200]["content"] = ok_content
    for status in sorted(set(statuses)):
        declared[status] = {"description": FAILURES[status], "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
        if status == 503:
            declared[status]["headers"] = {"Retry-After": {
                "description": "seconds to wait before trying again (absent when readiness "
                               "answers 503)", "schema": {"type": "integer", "minimum": 0}}}
        if status == 401:
            declared[status]["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return declared


def install(app: FastAPI, admin_token: bool) -> None:
    """Has ``app`` serve ``document()`` at /openapi.json, built at the first request."""
    def cached() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document(app, admin_token)
        return app.openapi_schema

    app.openapi = cached  # type: ignore[method-assign]  # FastAPI's way to replace it


def document(app: FastAPI, admin_token: bool) -> dict[str, Any]:
    """The OpenAPI document of ``app``: FastAPI's, without the 422 answers it never sends, with
    the error body (``Error``), the path parameters' forms and, when the server has an admin
    token, the token's scheme."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description,
                         routes=app.routes)
    for operations in schema["paths"].values():
        for operation in operations.values():
            operation["responses"].pop("422", None)
            for parameter in operation.get("parameters", []):
                if parameter["in"] == "path":
                    form = PATH_PARAMETERS[parameter["name"]]
                    parameter["schema"] = {**parameter["schema"], **form}
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    schemas["Error"] = ErrorBody.model_json_schema()
    if admin_token:
        components["securitySchemes"] = {ADMIN_TOKEN: {
            "type": "http", "scheme": "bearer",
            "description": "the server's admin token (--admin-token)"}}
    return schema


# -- answer bodies ---------------------------------------------------------------------------

class ScoreAnswer(BaseModel):
    model: str
    version: int
    probabilities: list[float] = Field(description="one click probability per row, in order")


class RankAnswer(ScoreAnswer):
    missing_entities: list[str] = Field(description="entity:id of each id with no stored "
                                                    "features (scored as missing values)")


class ServedModelEntry(BaseModel):
    name: str
    version: int
    provider: str = Field(description="ONNX Runtime's execution provider")
    features: dict[str, Any] = Field(description="the raw columns the model takes")


class ServedModels(BaseModel):
    models: list[ServedModelEntry]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class ModelReady(BaseModel):
    name: str
    ready: bool


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    parameters: dict[str, Any] = Field(description="execution provider, device, placement "
                                                   "(nodes and op types by provider), raw "
                                                   "inputs, table rows")


class OutputTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    data: list[float] | None = Field(None, description="absent when sent as binary data")
    parameters: dict[str, Any] | None = None


class InferAnswer(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(None, description="the request's id, when it had one")
    outputs: list[OutputTensor]


class BatchSize(BaseModel):
    batch_size: int
    count: int


class ModelStatistics(BaseModel):
    name: str
    version: str
    inference_count: int
    execution_count: int
    queue_seconds: float
    compute_seconds: float
    batch_stats: list[BatchSize]


class Statistics(BaseModel):
    model_stats: list[ModelStatistics]


class RepositoryEntry(BaseModel):
    name: str
    version: str = Field(description="the served version, empty when none")
    state: str = Field(description="READY or UNAVAILABLE")
    reason: str
    versions_on_disk: list[int]


class Loaded(BaseModel):
    name: str
    version: int
    provider: str
    recorded: bool = Field(description="whether the control record every replica follows was "
                                       "written")


class Unloaded(BaseModel):
    name: str
    state: str
    recorded: bool
