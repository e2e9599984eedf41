"""The friendly JSON API (``/v1``): raw rows by column name in, probabilities out; ranking by
entity ids; the list of served models. Bodies: ``friendly.py``; policy: ``dataplane.py``."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from .dataplane import DataPlane
from .friendly import decode_score_request, encode_score_response
from .openapi import BODY, MODEL, RankAnswer, ScoreAnswer, ServedModels, answers
from .ranking import Ranker
from .responses import json_response

SCORE_EXAMPLES = {
    "rows": {"summary": "rows of raw features by column name",
             "value": {"rows": [{"I1": 3, "I2": 20, "C1": 68, "C2": 1023},
                                {"I1": None, "C1": 5}]}},
    "columns": {"summary": "the same rows as columns (faster to parse)",
                "value": {"columns": {"I1": [3, None], "I2": [20, None], "C1": [68, 5],
                                      "C2": [1023, None]}}},
}
#: A raw value: a number (dense columns), a string or an integer (categorical), null (missing).
VALUE = {"type": ["number", "string", "null"]}
SCORE_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {
        "type": "object",
        "description": "Either rows (objects of column: value) or columns (column: a list of "
                       "values, all of one length). A column left out or null is a missing "
                       "value. The model's columns and kinds are in GET /v1/models; another "
                       "column, or a value of the wrong kind, is 400.",
        "oneOf": [{"required": ["rows"]}, {"required": ["columns"]}],
        "properties": {
            "rows": {"type": "array", "items": {"type": "object", "additionalProperties": VALUE}},
            "columns": {"type": "object",
                        "additionalProperties": {"type": "array", "items": VALUE}},
        },
    },
    "examples": SCORE_EXAMPLES,
}}}}

RANK_BODY = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": {
        "type": "object", "required": ["candidates"],
        "description": "Entity ids (string or integer) by the feature view's entity names, "
                       "context values by column; each candidate names its own entity ids and "
                       "values. The features of each id are read from the feature store.",
        "properties": {
            "entities": {"type": "object",
                         "additionalProperties": {"type": ["string", "integer"]}},
            "context": {"type": "object", "additionalProperties": VALUE},
            "candidates": {"type": "array",
                           "items": {"type": "object", "additionalProperties": VALUE}},
        },
    },
    "example": {"entities": {"user": "u42"}, "context": {"hour": 14, "device": "ios"},
                "candidates": [{"item": "i7"}, {"item": "i9"}]},
}}}}


class V1Endpoints:
    def __init__(self, dataplane: DataPlane, ranker: Ranker) -> None:
        self.dataplane = dataplane
        self.ranker = ranker

    async def score(self, name: str, version: str | None, request: Request) -> Response:
        body = await request.body()
        served = self.dataplane.model(name, version)
        settings = self.dataplane.settings
        features = decode_score_request(body, served.runtime.transform,
                                        settings.max_request_rows, settings.max_value_bytes)
        probabilities = await self.dataplane.score(served, features)
        return Response(encode_score_response(name, served.version, probabilities),
                        media_type="application/json")

    async def score_latest(self, name: str, request: Request) -> Response:
        return await self.score(name, None, request)

    async def score_version(self, name: str, version: str, request: Request) -> Response:
        return await self.score(name, version, request)

    async def rank(self, name: str, request: Request) -> Response:
        return json_response(await self.ranker.rank(name, await request.body()))

    async def list_models(self) -> Response:
        return json_response({"models": [
            {"name": name, "version": served.version, "provider": served.runtime.provider,
             "features": served.runtime.package.manifest.get("features", {})}
            for name, served in self.dataplane.repository.served().items()
        ]})

    def router(self) -> APIRouter:
        router = APIRouter(prefix="/v1", tags=["scoring"])
        scored = answers(ScoreAnswer, *BODY, *MODEL, 504)
        router.add_api_route("/models/{name}/score", self.score_latest, methods=["POST"],
                             openapi_extra=SCORE_BODY, responses=scored,
                             summary="Score raw rows with the model's served version")
        router.add_api_route("/models/{name}/versions/{version}/score", self.score_version,
                             methods=["POST"], openapi_extra=SCORE_BODY, responses=scored,
                             summary="Score raw rows with a given (served) version")
        router.add_api_route("/models/{name}/rank", self.rank, methods=["POST"],
                             openapi_extra=RANK_BODY,
                             responses=answers(RankAnswer, *BODY, *MODEL, 504),
                             summary="Score candidates named by entity ids, features joined "
                                     "from the store")
        router.add_api_route("/models", self.list_models, methods=["GET"],
                             responses=answers(ServedModels, 503),
                             summary="Served models and their features")
        return router
