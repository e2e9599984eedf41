"""Open Inference Protocol v2 routes (KServe / Triton REST): server and model metadata, model
readiness, and inference through the model's batcher (bodies: ``v2_codec``).

Server health (``/v2/health/*``), statistics and the repository routes are in ``app.py``. Errors
are the ``errors`` module's, answered as ``{"error": ...}``: 400 for a bad request, 404 for an
unknown model or a version not served, 503 for a model that is not loaded or a full queue.
"""

from __future__ import annotations

import weakref
from importlib.metadata import version as package_version

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from .errors import NotFound, Unavailable
from .repository import ModelRepository, ServedModel
from .runtime import ModelRuntime
from .settings import ServiceSettings
from .v2_codec import HEADER_LENGTH, ModelSchema, decode_infer_request, encode_infer_response

#: Triton's names for the manifest's tensor dtypes.
_DATATYPES = {"float32": "FP32", "float64": "FP64", "int64": "INT64", "int32": "INT32"}
_EXTENSIONS = ["binary_tensor_data", "model_repository", "statistics"]
_INFER_BODY = {"requestBody": {"required": True, "content": {"application/json": {"example": {
    "inputs": [{"name": "I1", "datatype": "FP32", "shape": [2], "data": [3, 0]},
               {"name": "C1", "datatype": "BYTES", "shape": [2], "data": ["7", ""]}],
}}}}}


def register_v2_routes(app: FastAPI, repository: ModelRepository,
                       settings: ServiceSettings) -> None:
    #: Each model's schema, for the runtime it was built from (a weak reference: an unloaded
    #: version's session is not kept alive by this cache).
    schemas: dict[str, tuple[weakref.ref[ModelRuntime], ModelSchema]] = {}

    def schema_of(name: str, runtime: ModelRuntime) -> ModelSchema:
        cached = schemas.get(name)
        if cached is None or cached[0]() is not runtime:
            cached = schemas[name] = (weakref.ref(runtime), ModelSchema.of(runtime.transform))
        return cached[1]

    def lookup(name: str, version: str | None) -> ServedModel:
        number = None
        if version is not None:
            if not (version.isascii() and version.isdigit()) or int(version) < 1:
                raise NotFound(f"model {name!r} has no version {version!r}")
            number = int(version)
        try:
            return repository.get(name, number)
        except NotFound as error:
            if name in repository.served() or name not in repository.names_on_disk():
                raise  # an unknown model, or a version other than the one served
            raise Unavailable(error.message) from None  # known, but not loaded

    def metadata(name: str, version: str | None) -> Response:
        served = lookup(name, version)
        runtime = served.runtime
        manifest = runtime.package.manifest
        return _json({
            "name": name, "versions": [str(served.version)], "platform": "onnxruntime_onnx",
            "inputs": [_tensor(io) for io in manifest["inputs"]],
            "outputs": [_tensor(io) for io in manifest["outputs"]],
            "parameters": {"execution_provider": runtime.provider,
                           "raw_inputs": schema_of(name, runtime).raw_inputs(),
                           "table_rows": runtime.table_sizes},
        })

    def ready(name: str, version: str | None) -> Response:
        lookup(name, version)
        return _json({"name": name, "ready": True})

    async def infer(name: str, version: str | None, request: Request) -> Response:
        body = await request.body()
        # No await between picking the served version and queueing on it (see app.score).
        served = lookup(name, version)
        decoded = decode_infer_request(body, request.headers.get(HEADER_LENGTH),
                                       schema_of(name, served.runtime), settings.max_request_rows)
        probabilities = await served.batcher.score(decoded.features)
        content, headers = encode_infer_response(name, served.version, decoded.request_id,
                                                 probabilities, decoded.binary_output)
        media_type = "application/octet-stream" if headers else "application/json"
        return Response(content, headers=headers, media_type=media_type)

    server = {"name": "ctrserve", "version": package_version("ctrserve"),
              "extensions": _EXTENSIONS}

    @app.get("/v2", tags=["v2"], summary="Server metadata")
    async def server_metadata() -> Response:
        return _json(server)

    @app.get("/v2/models/{name}", tags=["v2"], summary="Model metadata")
    async def model_metadata(name: str) -> Response:
        return metadata(name, None)

    @app.get("/v2/models/{name}/versions/{version}", tags=["v2"],
             summary="Model metadata of a version")
    async def version_metadata(name: str, version: str) -> Response:
        return metadata(name, version)

    @app.get("/v2/models/{name}/ready", tags=["v2"], summary="Whether the model is served")
    async def model_ready(name: str) -> Response:
        return ready(name, None)

    @app.get("/v2/models/{name}/versions/{version}/ready", tags=["v2"],
             summary="Whether this version is served")
    async def version_ready(name: str, version: str) -> Response:
        return ready(name, version)

    @app.post("/v2/models/{name}/infer", tags=["v2"], openapi_extra=_INFER_BODY,
              summary="Score v2 tensors (JSON or binary) with the served version")
    async def model_infer(name: str, request: Request) -> Response:
        return await infer(name, None, request)

    @app.post("/v2/models/{name}/versions/{version}/infer", tags=["v2"], openapi_extra=_INFER_BODY,
              summary="Score v2 tensors (JSON or binary) with a given (served) version")
    async def version_infer(name: str, version: str, request: Request) -> Response:
        return await infer(name, version, request)


def _tensor(io: dict) -> dict:
    return {"name": io["name"], "datatype": _DATATYPES[io["dtype"]], "shape": io["shape"]}


def _json(content: object) -> Response:
    return Response(orjson.dumps(content), media_type="application/json")
