"""Open Inference Protocol v2 (KServe / Triton REST): server health and metadata, model metadata
and readiness, inference (bodies: ``v2_codec.py``), Triton's statistics and model repository
extensions. Policy: ``dataplane.py``; errors are answered as ``{"error": ...}``.
"""

from __future__ import annotations

import hmac
import weakref
from collections.abc import Awaitable, Callable
from importlib.metadata import version as package_version

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .dataplane import DataPlane, version_number
from .errors import BadRequest, Unauthorized
from .friendly import parse_json
from .repository import ServedModel
from .responses import error_response, json_response
from .runtime import ModelRuntime
from .v2_codec import HEADER_LENGTH, ModelSchema, decode_infer_request, encode_infer_response

#: Triton's names for the manifest's tensor dtypes.
DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}
EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"example": {
    "inputs": [{"name": "I1", "datatype": "FP32", "shape": [2], "data": [3, 0]},
               {"name": "C1", "datatype": "BYTES", "shape": [2], "data": ["7", ""]}],
}}}}}


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
            "parameters": {"execution_provider": runtime.provider,
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
        decoded = decode_infer_request(body, request.headers.get(HEADER_LENGTH),
                                       self._schema(served.runtime),
                                       self.dataplane.settings.max_request_rows)
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
        routes: list[tuple[str, str, Callable[..., Awaitable[Response]], str, str]] = [
            ("GET", "/health/live", self.live, "health", "Whether the server process runs"),
            ("GET", "/health/ready", self.ready, "health",
             "Whether every model the server should serve is served"),
            ("GET", "", self.server_metadata, "v2", "Server metadata"),
            ("GET", "/models/{name}", self.model_metadata, "v2", "Model metadata"),
            ("GET", "/models/{name}/versions/{version}", self.version_metadata, "v2",
             "Model metadata of a version"),
            ("GET", "/models/{name}/ready", self.model_ready, "v2", "Whether the model is served"),
            ("GET", "/models/{name}/versions/{version}/ready", self.version_ready, "v2",
             "Whether this version is served"),
            ("POST", "/models/{name}/infer", self.infer, "v2",
             "Score v2 tensors (JSON or binary) with the served version"),
            ("POST", "/models/{name}/versions/{version}/infer", self.version_infer, "v2",
             "Score v2 tensors (JSON or binary) with a given (served) version"),
            ("GET", "/models/{name}/stats", self.stats, "repository",
             "Rows scored, batches run and batch sizes (Triton's statistics extension)"),
            ("POST", "/repository/index", self.repository_index, "repository",
             "Every model of the repository and its state"),
            ("POST", "/repository/models/{name}/load", self.load, "repository",
             "Serve a model (a given version with {\"parameters\": {\"version\": N}})"),
            ("POST", "/repository/models/{name}/unload", self.unload, "repository",
             "Stop serving a model"),
        ]
        for method, path, endpoint, tag, summary in routes:
            extra = INFER_BODY if endpoint in (self.infer, self.version_infer) else None
            router.add_api_route(path, endpoint, methods=[method], tags=[tag], summary=summary,
                                 openapi_extra=extra)
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
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be an object')
    version = parameters.get("version")
    if version is None:
        return None
    try:
        return version_number(version)
    except ValueError as error:
        raise BadRequest(str(error)) from None
