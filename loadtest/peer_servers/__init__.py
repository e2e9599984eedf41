"""The servers ``ctrserve bench peers`` sets beside the service: what a user would write or pick
instead, each the project's own few lines around one ONNX Runtime session. Each file runs in its
peer's own virtual environment with nothing of ctrserve installed, so none imports ctrserve or
another file of this folder; ``peers.py`` starts them with this folder on ``PYTHONPATH``.

- ``naive_app``: FastAPI and uvicorn, one session run per request on the event loop, and
  ``/echo``, the same request without the inference (the framework's floor);
- ``mlserver_runtime``: an MLServer custom runtime (MLServer ships none for ONNX), adaptive
  batching as ``model-settings.json`` asks;
- ``bento_service``: a BentoML service with a batchable API.

Every one builds its session alike: ``PEER_MODEL`` the ``model.onnx`` path, ``PEER_ORT_THREADS``
intra-op threads, intra-op spinning off (ONNX Runtime's spinning threads take the cores a server
shares with its clients).
"""
