"""Open Inference Protocol v2 (KServe / Triton REST): server health and metadata, model metadata
and readiness, inference (bodies: ``v2_codec.py``), Triton's statistics and model repository
extensions. Policy: ``dataplane.py``; errors are answered as ``{"error": ...}``.
"""

from __future__ import annotations

import hmac
import weakref
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .dataplane import DataPlane, version_number
from .errors import BadRequest, Unauthorized
from .friendly import parse_json
from .openapi import (
    ADMIN_TOKEN,
    BODY,
    MODEL,
    VERSION,
    InferAnswer,
    Live,
    Loaded,
    ModelMetadata,
    ModelReady,
    Ready,
    RepositoryEntry,
    ServerMetadata,
    Statistics,
    Unloaded,
    answers,
)
from .repository import ServedModel
from .responses import error_response, json_response
from .runtime import ModelRuntime
from .v2_codec import HEADER_LENGTH, ModelSchema, decode_infer_request, encode_infer_response

#: Triton's names for the manifest's tensor dtypes.
DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
INFER_HEADER = {
    "type": "object", "required": ["inputs"],
    "description": "Raw columns by name, one tensor [N] or [N, 1] each (dense columns FP32, "
                   "FP64 or INT64, categorical ones BYTES; the model's metadata lists them), or "
                   "the model's own tensors dense FP32 [N, n_dense] and sparse INT64 "
                   "[N, tables]. Each input's data is JSON (flat or nested as its shape), or "
                   "with parameters.binary_data_size that many bytes of the binary data after "
                   "the JSON (Inference-Header-Content-Length gives the JSON's length). "
                   'parameters.binary_data_output true, or outputs [{"name": "probability", '
                   '"parameters": {"binary_data": true}}], asks for binary output.',
    "properties": {
        "id": {"type": ["string", "null"], "description": "echoed in the answer"},
        "inputs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"type": "string"},
                "datatype": {"enum": ["FP32", "FP64", "INT64", "BYTES"]},
                "shape": {"type": "array", "minItems": 1,
                          "items": {"type": "integer", "minimum": 0}},
                "data": {"description": "the values, flat or nested as the shape"},
                "parameters": {"description": '{"binary_data_size": bytes}'},
            },
        }},
        "outputs": {"description": 'at most [{"name": "probability"}], with parameters'},
        "parameters": {"description": '{"binary_data_output": true} for binary output'},
    },
}
INFER_BODY = {
    "parameters": [{
        "name": HEADER_LENGTH, "in": "header", "required": False,
        "description": "with binary tensor data: the length of the JSON that comes first",
        "schema": {"type": "integer", "minimum": 1},
    }],
    "requestBody": {"required": True, "content": {
        "application/json": {"schema": INFER_HEADER, "example": {
            "inputs": [{"name": "I1", "datatype": "FP32", "shape": [2], "data": [3, 0]},
                       {"name": "C1", "datatype": "BYTES", "shape": [2], "data": ["7", ""]}],
        }},
        "application/octet-stream": {"schema": {
            "type": "string", "format": "binary",
            "description": "the JSON header, then the binary data of the inputs that have "
                           "binary_data_size (Triton's binary tensor extension)"}},
    }},
}
INFER_ANSWERS = answers(InferAnswer, *BODY, *MODEL, 504, ok_content={
    "application/octet-stream": {"schema": {
        "type": "string", "format": "binary",
        "description": "with binary output: the JSON answer, then the probabilities (FP32, "
                       "little-endian)"}}})
INFER_ANSWERS[200]["headers"] = {HEADER_LENGTH: {
    "description": "with binary output: the length of the JSON answer that comes first",
    "schema": {"type": "integer"}}}
LOAD_BODY = {"requestBody": {"required": False, "content": {"application/json": {
    "schema": {"type": "object", "properties": {"parameters": {
        "type": ["object", "null"],
        "properties": {"version": {
            "description": "the version to serve (default: the pinned or highest one)",
            "anyOf": [{"type": "integer", "minimum": 1}, VERSION, {"type": "null"}]}},
    }}},
    "example": {"parameters": {"version": 2}},
}}}}


class V2Endpoints:
    def __init__(self, dataplane: DataPlane) -> None:
        self.dataplane = dataplane
        self.server = {"name": "ctrserve", "version": package_version("ctrserve"),
                       "extensions": EXTENSIONS}
        #: Each served runtime's schema, computed once (weak keys: an unloaded version's
        #: session is not kept alive by this cache).
        self._schemas: weakref.WeakKeyDictionary[ModelRuntime, ModelSchema] = (
            weakref.WeakKeyDictionary())

    def _schema(self, runtime: ModelRuntime) -> ModelSchema:
        schema = self._schemas.get(runtime)
        if schema is None:
            schema = self._schemas[runtime] = ModelSchema.of(runtime.transform)
        return schema

    # -- health and metadata ------------------------------------------------------------------

    async def live(self) -> Response:
        return json_response({"live": True})

    async def ready(self) -> Response:
        reason = await self.dataplane.not_ready()
        if reason is not None:
            return error_response(503, reason)
        return json_response({"ready": True})

    async def server_metadata(self) -> Response:
        return json_response(self.server)

    def _metadata(self, name: str, version: str | None) -> Response:
        served = self.dataplane.model(name, version)
        runtime = served.runtime
        manifest = runtime.package.manifest
        return json_response({
            "name": name, "versions": [str(served.version)], "platform": "onnxruntime_onnx",
            "inputs": [_tensor(io) for io in manifest["inputs"]],
            "outputs": [_tensor(io) for io in manifest["outputs"]],
            "parameters": {"execution_provider": runtime.provider, "device": runtime.device,
                           "placement": runtime.placement.to_dict(),
                           "raw_inputs": self._schema(runtime).raw_inputs(),
                           "table_rows": runtime.table_sizes},
        })

    async def model_metadata(self, name: str) -> Response:
        return self._metadata(name, None)

    async def version_metadata(self, name: str, version: str) -> Response:
        return self._metadata(name, version)

    async def model_ready(self, name: str) -> Response:
        self.dataplane.model(name)
        return json_response({"name": name, "ready": True})

    async def version_ready(self, name: str, version: str) -> Response:
        self.dataplane.model(name, version)
        return json_response({"name": name, "ready": True})

    # -- inference and statistics -------------------------------------------------------------

    async def _infer(self, name: str, version: str | None, request: Request) -> Response:
        body = await request.body()
        served = self.dataplane.model(name, version)
        settings = self.dataplane.settings
        decoded = decode_infer_request(body, request.headers.get(HEADER_LENGTH),
                                       self._schema(served.runtime), settings.max_request_rows,
                                       settings.max_value_bytes)
        probabilities = await self.dataplane.score(served, decoded.features)
        content, headers = encode_infer_response(name, served.version, decoded.request_id,
                                                 probabilities, decoded.binary_output)
        media_type = "application/octet-stream" if headers else "application/json"
        return Response(content, headers=headers, media_type=media_type)

    async def infer(self, name: str, request: Request) -> Response:
        return await self._infer(name, None, request)

    async def version_infer(self, name: str, version: str, request: Request) -> Response:
        return await self._infer(name, version, request)

    async def stats(self, name: str) -> Response:
        served = self.dataplane.model(name)
        return json_response({"model_stats": [_statistics(name, served)]})

    # -- model repository (admin) -------------------------------------------------------------

    def _require_admin(self, request: Request) -> None:
        token = self.dataplane.settings.admin_token
        if not token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given, f"Bearer {token}"):
            raise Unauthorized("this route needs the admin bearer token")

    async def repository_index(self, request: Request) -> Response:
        self._require_admin(request)
        return json_response(self.dataplane.index())

    async def load(self, name: str, request: Request) -> Response:
        self._require_admin(request)
        body = await request.body()
        version = _requested_version(parse_json(body) if body.strip() else {})
        served, recorded = await self.dataplane.load(name, version)
        return json_response({"name": name, "version": served.version,
                              "provider": served.runtime.provider, "recorded": recorded})

    async def unload(self, name: str, request: Request) -> Response:
        self._require_admin(request)
        recorded = await self.dataplane.unload(name)
        return json_response({"name": name, "state": "UNAVAILABLE", "recorded": recorded})

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v2")
        admin = 401, *BODY, *MODEL
        routes: list[tuple[str, str, Callable[..., Awaitable[Response]], str, str, dict]] = [
            ("GET", "/health/live", self.live, "health", "Whether the server process runs",
             answers(Live, 503)),
            ("GET", "/health/ready", self.ready, "health",
             "Whether every model the server should serve is served", answers(Ready, 503)),
            ("GET", "", self.server_metadata, "v2", "Server metadata",
             answers(ServerMetadata, 503)),
            ("GET", "/models/{name}", self.model_metadata, "v2", "Model metadata",
             answers(ModelMetadata, *MODEL)),
            ("GET", "/models/{name}/versions/{version}", self.version_metadata, "v2",
             "Model metadata of a version", answers(ModelMetadata, *MODEL)),
            ("GET", "/models/{name}/ready", self.model_ready, "v2", "Whether the model is served",
             answers(ModelReady, *MODEL)),
            ("GET", "/models/{name}/versions/{version}/ready", self.version_ready, "v2",
             "Whether this version is served", answers(ModelReady, *MODEL)),
            ("POST", "/models/{name}/infer", self.infer, "v2",
             "Score v2 tensors (JSON or binary) with the served version", INFER_ANSWERS),
            ("POST", "/models/{name}/versions/{version}/infer", self.version_infer, "v2",
             "Score v2 tensors (JSON or binary) with a given (served) version", INFER_ANSWERS),
            ("GET", "/models/{name}/stats", self.stats, "repository",
             "Rows scored, batches run and batch sizes (Triton's statistics extension)",
             answers(Statistics, *MODEL)),
            ("POST", "/repository/index", self.repository_index, "repository",
             "Every model of the repository and its state",
             answers(list[RepositoryEntry], 401, *BODY, 503)),
            ("POST", "/repository/models/{name}/load", self.load, "repository",
             "Serve a model (a given version with {\"parameters\": {\"version\": N}})",
             answers(Loaded, *admin)),
            ("POST", "/repository/models/{name}/unload", self.unload, "repository",
             "Stop serving a model", answers(Unloaded, *admin)),
        ]
        secured: dict[str, Any] = (
            {"security": [{ADMIN_TOKEN: []}]} if self.dataplane.settings.admin_token else {})
        extras: dict[Callable, dict[str, Any]] = {
            self.infer: INFER_BODY, self.version_infer: INFER_BODY,
            self.load: {**LOAD_BODY, **secured}, self.unload: secured,
            self.repository_index: secured}
        for method, path, endpoint, tag, summary, declared in routes:
            router.add_api_route(path, endpoint, methods=[method], tags=[tag], summary=summary,
                                 responses=declared, openapi_extra=extras.get(endpoint) or None)
        return router


def _tensor(io: dict) -> dict:
    return {"name": io["name"], "datatype": DATATYPES[io["dtype"]], "shape": io["shape"]}


def _statistics(name: str, served: ServedModel) -> dict:
    counters = served.batcher.stats
    return {
        "name": name, "version": str(served.version),
        "inference_count": counters.inference_count,
        "execution_count": counters.execution_count,
        "queue_seconds": counters.queue_seconds,
        "compute_seconds": counters.compute_seconds,
        "batch_stats": [{"batch_size": size, "count": count}
                        for size, count in sorted(counters.batch_sizes.items())],
    }


def _requested_version(payload: object) -> int | None:
    """The version in a load body ``{"parameters": {"version": N}}``."""
    if not isinstance(payload, dict):
        raise BadRequest("the load body must be a JSON object")
    parameters = payload.get("parameters")
    if parameters is None:
        return None
    if not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be an object')
    version = parameters.get("version")
    if version is None:
        return None
    try:
        return version_number(version)
    except ValueError as error:
        raise BadRequest(str(error)) from None
