"""CUDA for ONNX Runtime sessions: whether it can run here and why not, the CUDA provider's
options, and which device a worker uses.

``cuda_unavailable_reason`` answers before any session is built, from what the process can load
and ask: ONNX Runtime's CUDA provider, the NVIDIA driver (``libcuda.so.1``, which must start and
see a GPU) and the provider library with the CUDA and cuDNN libraries it links (onnxruntime-gpu
1.31: CUDA 13, cuDNN 9). A session can still fail on CUDA after that (a device id past the last
device, no memory, a node the provider cannot place): ``runtime.py`` handles those. Asking the
driver initialises it in this process; workers are spawned, not forked, so they start clean.

Several workers spread over the devices listed in ``cuda_device_ids``: each worker claims the
lowest free slot (an exclusive ``flock`` on ``slot-<i>.lock`` in a directory named after the
supervisor's PID, held for the worker's life, so a restarted worker takes the slot of the one
that died) and serves on ``cuda_device_ids[slot % len(cuda_device_ids)]``.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import onnxruntime as ort

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
DRIVER_LIBRARY = "libcuda.so.1"
#: ONNX Runtime's libraries: the bridge its provider libraries link against, and the CUDA one.
PROVIDERS_SHARED = "libonnxruntime_providers_shared.so"
PROVIDER_CUDA = "libonnxruntime_providers_cuda.so"
#: ``cuda_arena_strategy`` settings and ONNX Runtime's names for them.
ARENA_STRATEGIES = {"next_power_of_two": "kNextPowerOfTwo",
                    "same_as_requested": "kSameAsRequested"}
#: What the pinned onnxruntime-gpu needs, said where it is missing.
REQUIREMENTS = ("onnxruntime-gpu 1.31 needs CUDA 13 and cuDNN 9 (the 'gpu' extra installs them) "
                "and an NVIDIA driver of branch 580 or later")

#: The slot locks this process holds for its life (never closed: a lock goes with the process).
_held_slots: list[IO[str]] = []


@dataclass(frozen=True)
class CudaOptions:
    """The CUDA provider's options for this worker's sessions."""

    device_id: int = 0
    #: The most bytes ONNX Runtime's device arena may hold (0: no limit).
    memory_limit_bytes: int = 0
    arena_strategy: str = "next_power_of_two"

    def provider_options(self) -> dict[str, str]:
        """The options as ONNX Runtime's CUDA provider takes them. TF32 stays off: on Ampere and
        later it rounds GEMM inputs to 10 mantissa bits, which breaks parity (1e-5) with CPU."""
        options = {"device_id": str(self.device_id),
                   "arena_extend_strategy": ARENA_STRATEGIES[self.arena_strategy],
                   "use_tf32": "0"}
        if self.memory_limit_bytes:
            options["gpu_mem_limit"] = str(self.memory_limit_bytes)
        return options


def worker_options(device_ids: list[int], memory_limit_mb: int, arena_strategy: str,
                   workers: int) -> CudaOptions:
    """This worker's options: its slot's device of ``device_ids``."""
    slot = worker_slot(workers)
    return CudaOptions(device_ids[slot % len(device_ids)], memory_limit_mb << 20, arena_strategy)


def worker_slot(workers: int, directory: Path | None = None) -> int:
    """The lowest slot in ``range(workers)`` no live sibling holds, claimed for this process's
    life (0 for a single worker). ``directory``: where the slot locks lie (default: one per
    supervisor in the temporary directory)."""
    if workers <= 1:
        return 0
    directory = directory or Path(tempfile.gettempdir()) / f"ctrserve-slots-{os.getppid()}"
    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(workers):
        handle = (directory / f"slot-{slot}.lock").open("w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        _held_slots.append(handle)
        return slot
    return 0  # more live workers than slots: only while a dead one's lock is being released


@functools.cache
def cuda_unavailable_reason() -> str | None:
    """Why the CUDA provider cannot run in this process, or None when nothing stands in its way
    (known once per process: libraries do not appear while it runs)."""
    if CUDA not in ort.get_available_providers():
        return (f"this onnxruntime ({ort.__version__}) has no {CUDA}: install onnxruntime-gpu "
                "(the 'gpu' extra)")
    try:
        driver = ctypes.CDLL(DRIVER_LIBRARY)
    except OSError as error:
        return f"no NVIDIA driver: {DRIVER_LIBRARY} does not load ({error})"
    problem = driver_problem(driver)
    if problem:
        return problem
    problem = provider_library_problem()
    if problem:
        return f"ONNX Runtime's CUDA provider library does not load: {problem} ({REQUIREMENTS})"
    return None


def driver_problem(driver: ctypes.CDLL) -> str | None:
    """Why the loaded driver library cannot run CUDA (it does not start, or sees no GPU), or
    None. Status 100 of ``cuInit`` is CUDA_ERROR_NO_DEVICE."""
    try:
        initialise, count_devices = driver.cuInit, driver.cuDeviceGetCount
    except AttributeError as error:
        return f"{DRIVER_LIBRARY} is not a working NVIDIA driver ({error})"
    status = initialise(0)
    if status:
        return f"the NVIDIA driver does not start (cuInit returned CUDA error {status})"
    devices = ctypes.c_int(0)
    if count_devices(ctypes.byref(devices)) or devices.value == 0:
        return "the NVIDIA driver sees no GPU"
    return None


def provider_library_problem() -> str | None:
    """The dynamic loader's error for ONNX Runtime's CUDA provider library (a CUDA or cuDNN
    library it cannot find, say), or None when it loads. The bridge library is loaded first and
    globally, as ONNX Runtime loads it, since the provider library links against it."""
    capi = Path(ort.__file__).parent / "capi"
    try:
        ctypes.CDLL(str(capi / PROVIDERS_SHARED), mode=ctypes.RTLD_GLOBAL)
        ctypes.CDLL(str(capi / PROVIDER_CUDA))
    except OSError as error:
        return str(error)
    return None
