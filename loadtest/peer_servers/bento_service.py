"""A BentoML service around one ONNX Runtime session, its API batchable (adaptive batching). A
batchable API takes one argument, so a request is ``{"features": [[dense..., ids...], ...]}``
(each row the model's dense values, then its ids) and the answer the list of probabilities.

    PEER_MODEL=model.onnx PEER_ORT_THREADS=2 PEER_DENSE=13 \\
        bentoml serve bento_service:CTR --working-dir <this folder> --port 8000
"""

import os

import bentoml
import numpy as np
import onnxruntime as ort


def _session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ["PEER_ORT_THREADS"])
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.environ["PEER_MODEL"], options,
                                providers=["CPUExecutionProvider"])


@bentoml.service(workers=1, logging={"access": {"enabled": False}})
class CTR:
    def __init__(self) -> None:
        self.session = _session()
        self.dense = int(os.environ["PEER_DENSE"])

    # max_batch_size counts rows; max_latency_ms is BentoML's latency target (beyond it, 503).
    @bentoml.api(batchable=True, max_batch_size=2048, max_latency_ms=1000)
    def predict(self, features: np.ndarray) -> np.ndarray:
        return self.session.run(None, {
            "dense": features[:, :self.dense].astype(np.float32),
            "sparse": features[:, self.dense:].astype(np.int64)})[0]
