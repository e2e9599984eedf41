"""An MLServer custom runtime around one ONNX Runtime session (MLServer ships none for ONNX).
The session runs in the runtime's ``predict`` (as MLServer's own scikit-learn and XGBoost
runtimes run their models); adaptive batching, when ``model-settings.json`` turns it on, merges
requests before ``predict``.

    model-settings.json: {"name": "ctr", "implementation": "mlserver_runtime.OnnxRuntime",
                          "max_batch_size": 64, "max_batch_time": 0.005}
    PEER_MODEL=model.onnx PEER_ORT_THREADS=2 PYTHONPATH=<this folder> mlserver start <dir>
"""

import os

import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


def _session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = int(os.environ["PEER_ORT_THREADS"])
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(os.environ["PEER_MODEL"], options,
                                providers=["CPUExecutionProvider"])


class OnnxRuntime(MLModel):
    async def load(self) -> bool:
        self._session = _session()
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feeds = {tensor.name: NumpyCodec.decode_input(tensor) for tensor in payload.inputs}
        probabilities = self._session.run(None, feeds)[0]
        return InferenceResponse(model_name=self.name, outputs=[
            NumpyCodec.encode_output("probability", probabilities)])
