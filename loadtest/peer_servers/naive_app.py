"""The naive endpoint: FastAPI and uvicorn, the request's Open Inference Protocol v2 JSON tensors
decoded with orjson and numpy, one ONNX Runtime run per request on the event loop (it blocks the
loop: one inference at a time), no batching, no middleware.

    POST /v2/models/{name}/infer   inputs dense FP32 [N, n_dense] and sparse INT64 [N, tables]
    POST /echo                     the same decoding and answer without the session run
    GET  /ready                    200 once the session is loaded

    PEER_MODEL=model.onnx PEER_ORT_THREADS=2 uvicorn naive_app:app --port 8000
"""

import os

import numpy as np
import onnxruntime as ort
import orjson
from fastapi import FastAPI, Request, Response

DTYPES = {"FP32": np.float32, "INT64": np.int64}


def _session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ["PEER_ORT_THREADS"])
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.environ["PEER_MODEL"], options,
                                providers=["CPUExecutionProvider"])


session = _session()
app = FastAPI()


def decode(body: bytes) -> dict[str, np.ndarray]:
    return {tensor["name"]: np.asarray(tensor["data"], DTYPES[tensor["datatype"]])
            .reshape(tensor["shape"]) for tensor in orjson.loads(body)["inputs"]}


def answer(name: str, probabilities: np.ndarray) -> Response:
    return Response(orjson.dumps({"model_name": name, "outputs": [
        {"name": "probability", "datatype": "FP32", "shape": [len(probabilities)],
         "data": probabilities.tolist()}]}), media_type="application/json")


@app.post("/v2/models/{name}/infer")
async def infer(name: str, request: Request) -> Response:
    return answer(name, session.run(None, decode(await request.body()))[0])


@app.post("/echo")
async def echo(request: Request) -> Response:
    feeds = decode(await request.body())
    return answer("echo", np.zeros(len(feeds["sparse"]), np.float32))


@app.get("/ready")
async def ready() -> Response:
    return Response(b"{}", media_type="application/json")
