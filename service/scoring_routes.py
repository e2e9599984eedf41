"""The scoring routes as plain Starlette routes, placed ahead of the FastAPI routes of the same
paths.

FastAPI's per-request machinery (matching through its included routers, solving each endpoint's
parameters) cost more of a single-row request than decoding and scoring it: in a py-spy profile
of the service under 64 single-row clients, routing took 10% of the samples and FastAPI's
handler 13%, against 13% for the endpoint itself. These routes hand the request alone to the
same endpoints (``V1Endpoints.score``, ``V2Endpoints.infer``) and come first in the router, so
they answer every request for their paths. The FastAPI routes stay: they describe the paths in
``/openapi.json`` (which documents FastAPI routes only) and never run. Errors go through the
app's exception handlers as on any route, and a request of another method is answered 405 with
``Allow: POST``, as before.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Scope

from .v1_endpoints import V1Endpoints
from .v2_endpoints import V2Endpoints


class ScoringRoute(Route):
    """A Starlette route that names itself in the scope, as FastAPI's routes do: the metrics
    middleware labels each request by its route's template (``scope["route"]``)."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child_scope = super().matches(scope)
        if match is not Match.NONE:
            child_scope["route"] = self
        return match, child_scope


def scoring_routes(v1: V1Endpoints, v2: V2Endpoints) -> list[Route]:
    async def score(request: Request) -> Response:
        return await v1.score(request.path_params["name"], None, request)

    async def score_version(request: Request) -> Response:
        return await v1.score(request.path_params["name"], request.path_params["version"],
                              request)

    async def infer(request: Request) -> Response:
        return await v2.infer(request.path_params["name"], request)

    async def version_infer(request: Request) -> Response:
        return await v2.version_infer(request.path_params["name"],
                                      request.path_params["version"], request)

    return [ScoringRoute(path, endpoint, methods=["POST"]) for path, endpoint in (
        ("/v1/models/{name}/score", score),
        ("/v1/models/{name}/versions/{version}/score", score_version),
        ("/v2/models/{name}/infer", infer),
        ("/v2/models/{name}/versions/{version}/infer", version_infer),
    )]
