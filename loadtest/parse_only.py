"""A server whose scoring routes only parse: the same FastAPI, uvicorn and codecs as the service,
no batcher and no inference.

``POST /v1/models/{name}/score`` and ``POST /v2/models/{name}/infer`` decode the body exactly as
the service does (``friendly.decode_score_request``, ``v2_codec.decode_infer_request``, with the
package's transform for the column schema) and answer zeros in the same response format. Its
rate is what the service's routes would reach if scoring cost nothing: the benchmark compares
the service against it. Benchmark only, never part of the service:

    CTRSERVE_PARSE_PACKAGE=runs/demo/repo/demo/1 \\
        uvicorn --factory ctrserve.loadtest.parse_only:create_app --port 8001
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response

from ctrserve.models.transform import FeatureTransform
from ctrserve.service.errors import ServiceError
from ctrserve.service.friendly import decode_score_request
from ctrserve.service.v2_codec import (
    HEADER_LENGTH,
    ModelSchema,
    decode_infer_request,
    encode_infer_response,
)

PACKAGE_VARIABLE = "CTRSERVE_PARSE_PACKAGE"
MAX_ROWS = 100_000


def create_app(package: str | Path | None = None) -> FastAPI:
    package = Path(package or os.environ[PACKAGE_VARIABLE])
    manifest = json.loads((package / "manifest.json").read_text())
    version = int(manifest["version"])
    transform = FeatureTransform.load(package / "transform")
    schema = ModelSchema.of(transform)
    app = FastAPI(title="ctrserve parse-only (benchmark)")

    @app.exception_handler(ServiceError)
    async def service_error(_: Request, error: ServiceError) -> Response:
        return Response(orjson.dumps({"error": error.message}), error.status,
                        media_type="application/json")

    @app.post("/v1/models/{name}/score")
    async def score(name: str, request: Request) -> Response:
        body = await request.body()
        features = decode_score_request(body, transform, MAX_ROWS)
        probabilities = np.zeros(features.rows, np.float32)
        return Response(orjson.dumps({"model": name, "version": version,
                                      "probabilities": probabilities},
                                     option=orjson.OPT_SERIALIZE_NUMPY),
                        media_type="application/json")

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        body = await request.body()
        decoded = decode_infer_request(body, request.headers.get(HEADER_LENGTH), schema,
                                       MAX_ROWS)
        probabilities = np.zeros(decoded.features.rows, np.float32)
        content, headers = encode_infer_response(name, version, decoded.request_id,
                                                 probabilities, decoded.binary_output)
        media_type = "application/octet-stream" if headers else "application/json"
        return Response(content, headers=headers, media_type=media_type)

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(b'{"ready":true}', media_type="application/json")

    return app


def main() -> None:
    import argparse

    import uvicorn

    parser = argparse.ArgumentParser(description="the parse-only benchmark server")
    parser.add_argument("--package", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    os.environ[PACKAGE_VARIABLE] = args.package
    uvicorn.run("ctrserve.loadtest.parse_only:create_app", factory=True, host=args.host,
                port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
