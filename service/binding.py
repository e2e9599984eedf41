"""A session run through ONNX Runtime's I/O binding: each batch's inputs are copied to the device
once, before the run, and the output is left on the device by the run and copied to host memory
once. ``session.run`` on a CUDA session would do the same copies implicitly; the binding makes
them explicit and keeps the output's device allocation in ONNX Runtime's arena.

One binding per session, reused batch after batch (rebinding is cheaper than building one); a
lock keeps two callers from rebinding it at once (the batcher runs one batch at a time per model,
the warm-up runs before it starts). The same code runs on CPU with ``device="cpu"``, which is how
the tests check it without a GPU.
"""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort


class BoundSession:
    def __init__(self, session: ort.InferenceSession, output: str, device: str,
                 device_id: int = 0) -> None:
        self.session = session
        self.output = output
        #: ``"cuda"`` or ``"cpu"``, as ONNX Runtime names devices.
        self.device = device
        self.device_id = device_id
        self._binding = session.io_binding()
        self._lock = threading.Lock()

    def run(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """The first output for ``feed``, in host memory."""
        with self._lock:
            binding = self._binding
            for name, value in feed.items():
                staged = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value),
                                                          self.device, self.device_id)
                binding.bind_ortvalue_input(name, staged)
            binding.bind_output(self.output, self.device, self.device_id)
            self.session.run_with_iobinding(binding)
            result = binding.copy_outputs_to_cpu()[0]
            binding.clear_binding_inputs()  # the staged inputs go now, not at the next batch
            binding.clear_binding_outputs()
            return result
