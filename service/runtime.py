"""One loaded model version: its ONNX Runtime session and its feature transform.

Sessions run on CUDA when asked for (or, with ``auto``, when a GPU and its libraries are usable),
else on CPU. On CUDA the initializers live on the device and requests go through I/O binding;
no node may silently fall back to the CPU (the session is refused instead). The CPU path is the
one the tests prove; development and CI machines have no GPU.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import onnxruntime as ort

from ctrserve.export.package import Package
from ctrserve.models.transform import FeatureTransform

log = logging.getLogger("ctrserve.runtime")

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
WARMUP_ROWS = (1, 64)
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")


class ModelLoadError(Exception):
    """A package that cannot be served (damaged, unknown format, ONNX Runtime refused it)."""


def cuda_usable() -> bool:
    """Whether the CUDA provider is installed and a CUDA driver is present to run it."""
    if CUDA not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def choose_provider(preference: str) -> str:
    if preference == "cpu":
        return CPU
    if preference == "cuda":
        if not cuda_usable():
            raise ModelLoadError("provider 'cuda' asked for, but no usable CUDA GPU is present")
        return CUDA
    return CUDA if cuda_usable() else CPU


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
    provider: str

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
        if self.provider == CUDA:
            return self._predict_bound(feed)
        return self.session.run(None, feed)[0]

    def _predict_bound(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        """CUDA: inputs are copied to the device once, the output comes back into host memory."""
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("probability", "cpu")
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]


def load_runtime(package: Package, provider: str = "auto", threads: int = 1) -> ModelRuntime:
    """Creates the session, checks its inputs against the manifest, and warms it up."""
    chosen = choose_provider(provider)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    providers = [chosen] if chosen == CPU else [chosen, CPU]
    if chosen == CUDA:
        # Every node on the GPU, or no session: a silent CPU fallback would copy tables per run.
        options.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        transform = FeatureTransform.load(package.transform_path)
        session = ort.InferenceSession(str(package.model_path), options, providers=providers)
    except Exception as error:  # ONNX Runtime raises its own exception types, and numpy/OS ones
        raise ModelLoadError(f"{package.directory}: {error}") from error
    expected = {io["name"] for io in package.manifest["inputs"]}
    actual = {i.name for i in session.get_inputs()}
    if actual != expected:
        raise ModelLoadError(f"{package.directory}: the graph's inputs {sorted(actual)} differ "
                             f"from the manifest's {sorted(expected)}")
    runtime = ModelRuntime(package, transform, session, session.get_providers()[0])
    for rows in WARMUP_ROWS:
        runtime.predict(np.zeros((rows, runtime.n_dense), np.float32),
                        np.zeros((rows, runtime.n_tables), np.int64))
    log.info("loaded %s version %d on %s (%d intra-op threads)", package.name, package.version,
             runtime.provider, threads)
    return runtime
