"""The FastAPI application: routes, error mapping, and the repository's life cycle.

``create_app()`` reads ``ServiceSettings`` from the environment (``CTRSERVE_*``), so that every
uvicorn worker builds the same app (``uvicorn --factory ctrserve.service.app:create_app``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response
from starlette.exceptions import HTTPException

from . import metrics, openapi
from .dataplane import DataPlane
from .errors import ServiceError
from .feature_store import open_feature_store
from .limits import BodyLimitMiddleware, ConcurrencyLimitMiddleware, RequestLedger
from .ranking import Ranker
from .repository import ModelRepository
from .responses import error_response
from .scoring_routes import scoring_routes
from .settings import LOG_FORMAT, ServiceSettings
from .v1_endpoints import V1Endpoints
from .v2_endpoints import V2Endpoints

log = logging.getLogger("ctrserve.service")


class NoModelServed(RuntimeError):
    """The repository gave the server nothing to serve: it does not start."""


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    settings = settings or ServiceSettings()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    repository = ModelRepository(settings)
    store = open_feature_store(settings.redis_url, settings.redis_namespace,
                               settings.redis_timeout_ms, settings.max_value_bytes)
    dataplane = DataPlane(repository, store, settings)
    ledger = RequestLedger()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics.update_process_gauges()
        kept_unloaded = await repository.start()
        if not repository.served() and not kept_unloaded:
            await repository.stop()
            raise NoModelServed(_nothing_to_serve(repository))
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
        await store.close()
        metrics.process_exited()

    app = FastAPI(title="ctrserve", lifespan=lifespan,
                  description="CTR scoring for DLRM models with compressed embedding tables.")
    app.state.dataplane = dataplane
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes,
                       body_timeout_s=settings.body_timeout_s, ledger=ledger)
    if settings.max_concurrency:  # outside the body limit: refuses before reading the body
        app.add_middleware(ConcurrencyLimitMiddleware, max_in_flight=settings.max_concurrency)
    app.add_middleware(metrics.MetricsMiddleware, known_model=repository.known,
                       routes=app.router.routes)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError) -> Response:
        if error.reason is not None:
            request.scope[metrics.REFUSAL_REASON] = error.reason
        return error_response(error.status, error.message, error.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, error: RequestValidationError) -> Response:
        first = error.errors()[0] if error.errors() else {}
        where = ".".join(str(part) for part in first.get("loc", ()))
        return error_response(400, f"{where}: {first.get('msg', 'invalid request')}")

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, error: HTTPException) -> Response:
        return error_response(error.status_code, str(error.detail), error.headers)  # 405: Allow

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> Response:
        log.exception("unexpected error")
        return error_response(500, f"internal error: {type(error).__name__}")

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics of every worker",
             response_class=PlainTextResponse, responses=openapi.answers(None, 503))
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    v1, v2 = V1Endpoints(dataplane, Ranker(dataplane)), V2Endpoints(dataplane)
    app.include_router(v1.router())
    app.include_router(v2.router())
    app.router.routes[:0] = scoring_routes(v1, v2)  # first: they answer the scoring paths
    openapi.install(app, admin_token=bool(settings.admin_token))
    return app


def _nothing_to_serve(repository: ModelRepository) -> str:
    """Why no model is served, model by model."""
    names = repository.settings.models or repository.names_on_disk()
    if not names:
        return (f"no model to serve: {repository.root} holds no model package "
                "(expected REPO/NAME/VERSION/ directories written by 'ctrserve export')")
    reasons = "; ".join(f"{name}: {repository.state(name).reason or 'not loaded'}"
                        for name in names)
    return f"no model to serve from {repository.root}: {reasons}"


async def _update_process_gauges() -> None:
    metrics.update_process_gauges()


async def _every(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:  # a failed check must not stop the next one
            log.exception("background check failed")
