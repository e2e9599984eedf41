"""The scoring service: a FastAPI app serving a model repository's packages with ONNX Runtime.

Routes (``v1_endpoints``, ``v2_endpoints``) decode requests with their codecs (``friendly``,
``v2_codec``, ``ranking``) and go through the data plane (``dataplane``) to the repository's
served versions (``repository``, ``runtime``) and their batchers (``batcher``).
"""
