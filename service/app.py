"""The FastAPI application: routes, error mapping, and the repository's life cycle.

``create_app()`` reads ``ServiceSettings`` from the environment (``CTRSERVE_*``), so that every
uvicorn worker builds the same app (``uvicorn --factory ctrserve.service.app:create_app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException

from . import metrics
from .errors import BadRequest, ServiceError, Unauthorized
from .friendly import decode_score_request, parse_json
from .limits import BodyLimitMiddleware, RequestLedger
from .ranking import Ranker
from .repository import ModelRepository
from .settings import ServiceSettings
from .v2_routes import register_v2_routes

log = logging.getLogger("ctrserve.service")

SCORE_EXAMPLES = {
    "rows": {"summary": "rows of raw features by column name",
             "value": {"rows": [{"I1": 3, "I2": 20, "C1": 68, "C2": 1023},
                                {"I1": None, "C1": 5}]}},
    "columns": {"summary": "the same rows as columns (faster to parse)",
                "value": {"columns": {"I1": [3, None], "I2": [20, None], "C1": [68, 5],
                                      "C2": [1023, None]}}},
}
SCORE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "properties": {
        "rows": {"type": "array", "items": {"type": "object"}},
        "columns": {"type": "object", "additionalProperties": {"type": "array"}},
    }},
    "examples": SCORE_EXAMPLES,
}}}}

RANK_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {"type": "object", "required": ["candidates"], "properties": {
        "entities": {"type": "object"}, "context": {"type": "object"},
        "candidates": {"type": "array", "items": {"type": "object"}},
    }},
    "example": {"entities": {"user": "u42"}, "context": {"hour": 14, "device": "ios"},
                "candidates": [{"item": "i7"}, {"item": "i9"}]},
}}}}


def json_response(content: object, status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status,
                    headers=headers, media_type="application/json")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    repository = ModelRepository(settings)
    ranker = Ranker(repository, settings)
    ledger = RequestLedger()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.update_process_gauges()
        await repository.start()
        tasks = [asyncio.create_task(_every(settings.control_interval_s,
                                            repository.follow_control)),
                 asyncio.create_task(_every(1.0, _update_process_gauges)),
                 asyncio.create_task(repository.control.listen(repository.follow_control))]
        if settings.poll_interval_s > 0:
            tasks.append(asyncio.create_task(_every(settings.poll_interval_s,
                                                    repository.poll_new_versions)))
        yield
        for task in tasks:
            task.cancel()
        await repository.stop()
        log.info("requests with a body: %d accepted, %d answered", ledger.accepted,
                 ledger.answered)
        await ranker.close()
        metrics.process_exited()

    app = FastAPI(title="ctrserve", lifespan=lifespan,
                  description="CTR scoring for DLRM models with compressed embedding tables.")
    app.state.repository = repository
    app.state.settings = settings
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s, ledger=ledger)
    app.add_middleware(metrics.MetricsMiddleware, known_model=repository.known)

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError) -> Response:
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> Response:
        return error_response(error.status_code, str(error.detail))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(error).__name__}")

    def require_admin(request: Request) -> None:
        if not settings.admin_token:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given, f"Bearer {settings.admin_token}"):
            raise Unauthorized("this route needs the admin bearer token")

    async def score(name: str, version: int | None, request: Request) -> Response:
        body = await request.body()
        # No await between picking the served version and queueing on it: a hot swap cannot
        # close the batcher in between.
        served = repository.get(name, version)
        features = decode_score_request(body, served.runtime.transform, settings.max_request_rows)
        probabilities = await served.batcher.score(features)
        return json_response({"model": name, "version": served.version,
                              "probabilities": probabilities})

    @app.post("/v1/models/{name}/score", openapi_extra=SCORE_BODY, tags=["scoring"],
              summary="Score raw rows with the model's served version")
    async def score_latest(name: str, request: Request) -> Response:
        return await score(name, None, request)

    @app.post("/v1/models/{name}/versions/{version}/score", openapi_extra=SCORE_BODY,
              tags=["scoring"], summary="Score raw rows with a given (served) version")
    async def score_version(name: str, version: int, request: Request) -> Response:
        return await score(name, version, request)

    @app.post("/v1/models/{name}/rank", openapi_extra=RANK_BODY, tags=["scoring"],
              summary="Score candidates named by entity ids, features joined from the store")
    async def rank(name: str, request: Request) -> Response:
        return json_response(await ranker.rank(name, await request.body()))

    @app.get("/v1/models", tags=["scoring"], summary="Served models and their features")
    async def list_models() -> Response:
        return json_response({"models": [
            {"name": name, "version": served.version, "provider": served.runtime.provider,
             "features": served.runtime.package.manifest.get("features", {})}
            for name, served in repository.served().items()
        ]})

    @app.get("/v2/health/live", tags=["health"])
    async def live() -> Response:
        return json_response({"live": True})

    @app.get("/v2/health/ready", tags=["health"])
    async def ready() -> Response:
        wanted = settings.models or repository.names_on_disk()
        missing = [name for name in wanted if name not in repository.served()]
        if missing:
            return error_response(503, f"models not loaded: {', '.join(missing)}")
        if settings.redis_required and not await ranker.store_healthy():
            return error_response(503, "the feature store (Redis) does not answer")
        return json_response({"ready": True})

    @app.get("/v2/models/{name}/stats", tags=["repository"],
             summary="Rows scored, batches run and batch sizes (Triton's statistics extension)")
    async def stats(name: str) -> Response:
        served = repository.get(name)
        counters = served.batcher.stats
        return json_response({"model_stats": [{
            "name": name, "version": str(served.version),
            "inference_count": counters.inference_count,
            "execution_count": counters.execution_count,
            "queue_seconds": counters.queue_seconds,
            "compute_seconds": counters.compute_seconds,
            "batch_stats": [{"batch_size": size, "count": count}
                            for size, count in sorted(counters.batch_sizes.items())],
        }]})

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of every worker")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.post("/v2/repository/index", tags=["repository"])
    async def repository_index(request: Request) -> Response:
        require_admin(request)
        return json_response(repository.index())

    @app.post("/v2/repository/models/{name}/load", tags=["repository"])
    async def load(name: str, request: Request) -> Response:
        require_admin(request)
        body = await request.body()
        version = _requested_version(parse_json(body) if body.strip() else {})
        served, recorded = await repository.request_load(name, version)
        return json_response({"name": name, "version": served.version,
                              "provider": served.runtime.provider, "recorded": recorded})

    @app.post("/v2/repository/models/{name}/unload", tags=["repository"])
    async def unload(name: str, request: Request) -> Response:
        require_admin(request)
        recorded = await repository.request_unload(name)
        return json_response({"name": name, "state": "UNAVAILABLE", "recorded": recorded})

    register_v2_routes(app, repository, settings)
    return app


def _requested_version(payload: object) -> int | None:
    """The version in a load body ``{"parameters": {"version": N}}`` (Triton passes strings)."""
    if not isinstance(payload, dict):
        raise BadRequest("the load body must be a JSON object")
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise BadRequest('"parameters" must be an object')
    version = parameters.get("version")
    if version is None:
        return None
    try:
        version = int(version)
    except (TypeError, ValueError):
        raise BadRequest(f"version must be a positive integer, got {version!r}") from None
    if version < 1:
        raise BadRequest(f"version must be a positive integer, got {version}")
    return version


async def _update_process_gauges() -> None:
    metrics.update_process_gauges()


async def _every(seconds: float, action) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:  # a failed check must not stop the next one
            log.exception("background check failed")
