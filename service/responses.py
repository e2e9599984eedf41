"""JSON responses, and the ``{"error": ...}`` body every route answers a failure with."""

from __future__ import annotations

from collections.abc import Mapping

import orjson
from fastapi.responses import Response


def json_response(content: object, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> Response:
    """``content`` as JSON; numpy arrays and scalars are written as JSON numbers."""
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status,
                    headers=headers, media_type="application/json")


def error_response(status: int, message: str,
                   headers: Mapping[str, str] | None = None) -> Response:
    return json_response({"error": message}, status, headers)
