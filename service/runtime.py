"""One loaded model version: its ONNX Runtime session and its feature transform.

The provider setting decides where sessions run:

- ``cpu``: the CPU provider.
- ``cuda``: the CUDA provider, or the version does not load, with the reason (``ctrserve serve``
  refuses to start when CUDA cannot run at all: ``cuda.cuda_unavailable_reason``).
- ``auto``: CUDA when it can run and the CUDA session builds and meets the placement rule, else
  CPU, with one WARNING line saying why.

A CUDA session lists CUDA, then CPU, as its providers and leaves ONNX Runtime's CPU fallback on:
ONNX Runtime places small shape computations on CPU on purpose, and it refuses the CPU provider
together with ``session.disable_cpu_ep_fallback`` ("Conflicting session configuration") before
any provider starts. What must run on the GPU is checked on the built session instead, from
ONNX Runtime's own record of each node's provider (``placement.py``): the embedding lookups and
the MLPs, or no CUDA session. Its own silent fallback to CPU when a session fails on CUDA is off
(``enable_fallback=0``): this module decides, and says so. On CUDA the tables live on the device
and batches go through I/O binding (``binding.py``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import onnxruntime as ort

from ctrserve.export.package import Package
from ctrserve.models.transform import FeatureTransform

from .binding import BoundSession
from .cuda import CPU, CUDA, CudaOptions, cuda_unavailable_reason, provider_library_problem
from .placement import RECORD_ASSIGNMENT, Placement

log = logging.getLogger("ctrserve.runtime")

OUTPUT = "probability"
WARMUP_ROWS = (1, 64)
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")


#: The reasons for serving on CPU under ``auto`` already logged by this process (each once).
_warned: set[str] = set()


class ModelLoadError(Exception):
    """A package that cannot be served (damaged, unknown format, ONNX Runtime refused it)."""


class CudaRefused(ModelLoadError):
    """No CUDA session for this model here: CUDA cannot run, ONNX Runtime did not build the
    session on it, or the session breaks the placement rule."""


def cgroup_cpu_limit(root: Path = CGROUP_ROOT,
                     membership: Path = CGROUP_MEMBERSHIP) -> tuple[float, str] | None:
    """The tightest CPU quota set on this process's cgroup or one of its ancestors, in CPUs
    (quota / period), with the file that sets it; None where none is set.

    ``membership`` (``/proc/self/cgroup``) names the process's cgroup: ``0::PATH`` for cgroup
    v2, whose quota is ``ROOT/PATH/cpu.max`` ("max 100000" or "150000 100000"), and
    ``N:cpu,cpuacct:PATH`` for v1, whose quota is ``cpu.cfs_quota_us`` (-1: none) over
    ``cpu.cfs_period_us`` in ``ROOT/cpu,cpuacct/PATH``. A container sees its own cgroup at the
    root of the mount whatever PATH says, so the roots are looked at too."""
    limits = [limit for directory in _cgroup_directories(root, membership)
              if (limit := _quota_in(directory)) is not None]
    return min(limits) if limits else None


def _quota_in(directory: Path) -> tuple[float, str] | None:
    v2, v1 = directory / "cpu.max", directory / "cpu.cfs_quota_us"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else (int(quota) / int(period), str(v2))
        if v1.is_file():
            quota_us = int(v1.read_text())
            period_us = int((directory / "cpu.cfs_period_us").read_text())
            return (quota_us / period_us, str(v1)) if quota_us > 0 else None
    except (OSError, ValueError) as error:
        log.warning("cannot read the CPU quota in %s: %s", directory, error)
    return None


def _cgroup_directories(root: Path, membership: Path) -> list[Path]:
    """Where this process's CPU quotas may be set: its cgroup and every ancestor up to the
    mount's root, for v2 and for v1's cpu controller."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    directories = []
    for line in lines:
        hierarchy, controllers, path = line.split(":", 2)
        if hierarchy == "0" and not controllers:
            base = root
        elif "cpu" in controllers.split(","):
            base = root / controllers
        else:
            continue
        relative = PurePosixPath(path.lstrip("/"))
        directories += [base / part for part in (relative, *relative.parents)]
    for base in (root, root / "cpu", root / "cpu,cpuacct"):
        if base not in directories:
            directories.append(base)
    return directories


def usable_cpus(root: Path = CGROUP_ROOT,
                membership: Path = CGROUP_MEMBERSHIP) -> tuple[int, str]:
    """The CPUs this process may use, and where the figure comes from: the CPUs it may run on
    (its affinity, e.g. ``taskset`` or a static CPU manager) or its cgroup's CPU quota (a
    container's or pod's CPU limit), whichever is smaller; a fractional quota counts as the
    next whole CPU. ``os.cpu_count()`` would count every core of the host."""
    affinity = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root, membership)
    if limit is not None and math.ceil(limit[0]) < affinity:
        return math.ceil(limit[0]), f"the CPU quota {limit[0]:g} in {limit[1]}"
    return affinity, f"the CPU affinity of {affinity} CPUs" + (
        f", under the CPU quota {limit[0]:g} in {limit[1]}" if limit else ", no CPU quota")


def cpu_threads(workers: int, requested: int, root: Path = CGROUP_ROOT,
                membership: Path = CGROUP_MEMBERSHIP) -> tuple[int, str]:
    """ONNX Runtime's intra-op threads per session, and why: ``requested`` when set, else the
    usable CPUs divided among the workers, at least 1."""
    if requested > 0:
        return requested, "intra_op_threads setting"
    cpus, source = usable_cpus(root, membership)
    return max(1, cpus // max(1, workers)), f"{cpus} usable CPUs ({source}) / {workers} worker(s)"


@dataclass(eq=False)  # compared and hashed by identity: one per loaded version
class ModelRuntime:
    package: Package
    transform: FeatureTransform
    session: ort.InferenceSession
    placement: Placement
    #: The CUDA device the session runs on; None on CPU.
    cuda_device: int | None = None

    def __post_init__(self) -> None:
        self._bound = (None if self.cuda_device is None
                       else BoundSession(self.session, OUTPUT, "cuda", self.cuda_device))

    @property
    def provider(self) -> str:
        return CPU if self.cuda_device is None else CUDA

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda:<id>``."""
        return "cpu" if self.cuda_device is None else f"cuda:{self.cuda_device}"

    @property
    def name(self) -> str:
        return self.package.name

    @property
    def version(self) -> int:
        return self.package.version

    @property
    def n_dense(self) -> int:
        return self.transform.n_dense

    @property
    def n_tables(self) -> int:
        return len(self.transform.categorical)

    @property
    def table_sizes(self) -> list[int]:
        return self.transform.table_sizes

    def predict(self, dense: np.ndarray, sparse: np.ndarray) -> np.ndarray:
        """dense float32 [N, n_dense], sparse int64 [N, n_tables] -> float32 [N]."""
        feed = {"sparse": sparse}
        if self.n_dense:
            feed["dense"] = dense
        if self._bound is not None:
            return self._bound.run(feed)
        return self.session.run(None, feed)[0]


def session_options(threads: int) -> ort.SessionOptions:
    """The options of every serving session, CPU or CUDA (ONNX Runtime accepts them with either
    provider list: ``tests/test_gpu_runtime.py``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle intra-op threads sleep instead of spinning: spinning ones take the cores the event
    # loop and the other workers need (1.1 cores burnt at 200 single-row requests/s).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry(RECORD_ASSIGNMENT, "1")
    options.log_severity_level = 3
    return options


def cuda_providers(cuda: CudaOptions) -> list:
    """CUDA with its options first, CPU for what ONNX Runtime keeps off the GPU."""
    return [(CUDA, cuda.provider_options()), CPU]


def open_session(model_path: Path, preference: str, threads: int,
                 cuda: CudaOptions) -> tuple[ort.InferenceSession, int | None]:
    """The session for ``preference`` (see the module docstring) and its CUDA device (None on
    CPU); ModelLoadError when ``cuda`` was asked for and cannot be had, or the model does not
    load at all."""
    if preference == "cpu":
        return _cpu_session(model_path, threads), None
    try:
        return _cuda_session(model_path, threads, cuda), cuda.device_id
    except CudaRefused as refusal:
        if preference == "cuda":
            raise ModelLoadError(f"provider 'cuda' asked for, but {refusal}") from None
        reason = str(refusal)
    if reason not in _warned:
        _warned.add(reason)
        log.warning("provider auto: serving on CPU: %s", reason)
    return _cpu_session(model_path, threads), None


def _cpu_session(model_path: Path, threads: int) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(model_path), session_options(threads), providers=[CPU])
    except Exception as error:  # ONNX Runtime raises its own exception types, and OS ones
        raise ModelLoadError(f"{model_path.parent}: {error}") from error


def _cuda_session(model_path: Path, threads: int, cuda: CudaOptions) -> ort.InferenceSession:
    """A session on CUDA that meets the placement rule, or CudaRefused saying why not."""
    unavailable = cuda_unavailable_reason()
    if unavailable:
        raise CudaRefused(unavailable)
    try:
        session = ort.InferenceSession(str(model_path), session_options(threads),
                                       providers=cuda_providers(cuda), enable_fallback=0)
    except Exception as error:  # ONNX Runtime raises its own exception types, and OS ones
        raise CudaRefused(f"ONNX Runtime could not build the session of {model_path.parent} on "
                          f"CUDA device {cuda.device_id}: {error}") from error
    if session.get_providers()[0] != CUDA:
        problem = provider_library_problem()
        raise CudaRefused("ONNX Runtime left CUDA out of the session: " + (
            f"its provider library does not load: {problem}" if problem
            else "it could not create the CUDA provider (its error is in the log)"))
    off_gpu = Placement.of(session).hot_nodes_off(CUDA)
    if off_gpu:
        shown = ", ".join(f"{node.op_type} {node.name!r} on {node.provider}"
                          for node in off_gpu[:8])
        raise CudaRefused(f"{model_path.parent}: {len(off_gpu)} embedding lookup or MLP node(s) "
                          f"are not on the GPU: {shown}")
    return session


def load_runtime(package: Package, provider: str = "auto", threads: int = 1,
                 cuda: CudaOptions | None = None) -> ModelRuntime:
    """Creates the session, checks its inputs against the manifest, and warms it up."""
    try:
        transform = FeatureTransform.load(package.transform_path)
    except Exception as error:  # numpy and OS errors of a damaged transform
        raise ModelLoadError(f"{package.directory}: {error}") from error
    session, cuda_device = open_session(package.model_path, provider, threads,
                                        cuda or CudaOptions())
    expected = {io["name"] for io in package.manifest["inputs"]}
    actual = {i.name for i in session.get_inputs()}
    if actual != expected:
        raise ModelLoadError(f"{package.directory}: the graph's inputs {sorted(actual)} differ "
                             f"from the manifest's {sorted(expected)}")
    runtime = ModelRuntime(package, transform, session, Placement.of(session), cuda_device)
    for rows in WARMUP_ROWS:
        runtime.predict(np.zeros((rows, runtime.n_dense), np.float32),
                        np.zeros((rows, runtime.n_tables), np.int64))
    log.info("loaded %s version %d on %s (%s, %d intra-op threads); placement: %s",
             package.name, package.version, runtime.provider, runtime.device, threads,
             runtime.placement.summary())
    return runtime
