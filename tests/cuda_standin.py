"""Stand-in CUDA libraries, built with the system C compiler, to check the GPU path of ONNX Runtime
on a machine without a GPU.

- ``build_driver(directory)``: an empty ``libcuda.so.1``. It loads, so the service finds a
  driver library, but it is not a working driver (it has no ``cuInit``), so CUDA cannot run,
  whatever CUDA libraries the machine has.
- ``build_runtime(directory)``: stand-ins for every library the installed ONNX Runtime provider
  libraries link against (the CUDA runtime, cuBLAS, cuRAND, cuDNN, TensorRT and the driver),
  exporting exactly the symbols the provider libraries import (read with ``nm -D``). With them on
  ``LD_LIBRARY_PATH``, the installed ``libonnxruntime_providers_cuda.so`` loads and ONNX Runtime's
  own code runs here: the CUDA provider's option parsing, its kernel registry
  (``get_all_opkernel_def``) and, when a session is created, its graph partitioning (which node
  runs on CUDA, which on CPU). The stand-in driver starts and the stand-in runtime reports two
  devices and hands out host memory as device memory; every other function does nothing and
  reports success, so kernels compute nothing: never trust an output computed under it.

``python tests/cuda_standin.py OUT.json`` writes ONNX Runtime's CUDA kernel table (standard
domain) read from the installed provider library: the file ``tests/data`` keeps for the pinned
version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import onnxruntime as ort

CAPI = Path(ort.__file__).parent / "capi"
#: The provider libraries the stand-ins serve; ``get_all_opkernel_def`` loads both.
PROVIDER_LIBRARIES = ("libonnxruntime_providers_cuda.so", "libonnxruntime_providers_tensorrt.so")
#: Libraries a provider library needs that are NVIDIA's (the rest are the C and C++ runtimes).
NVIDIA_PREFIXES = ("libcu", "libnv")
#: ONNX Runtime's own bridge symbol, which its shared-provider library exports: never stood in.
ORT_BRIDGE = "Provider_GetHost"
#: The CUDA runtime functions that must do something: report devices, hand out memory, copy.
RUNTIME_FUNCTIONS = {
    "cudaGetDeviceCount": "int cudaGetDeviceCount(int *count) { *count = 2; return 0; }",
    "cudaGetDevice": "int cudaGetDevice(int *device) { *device = 0; return 0; }",
    "cudaMalloc": "int cudaMalloc(void **p, size_t n) { *p = malloc(n ? n : 1); return 0; }",
    "cudaMallocHost": "int cudaMallocHost(void **p, size_t n) { *p = malloc(n ? n : 1); "
                      "return 0; }",
    "cudaHostAlloc": "int cudaHostAlloc(void **p, size_t n, unsigned flags) "
                     "{ *p = malloc(n ? n : 1); return 0; }",
    "cudaFree": "int cudaFree(void *p) { free(p); return 0; }",
    "cudaFreeHost": "int cudaFreeHost(void *p) { free(p); return 0; }",
    "cudaMemGetInfo": "int cudaMemGetInfo(size_t *free_bytes, size_t *total_bytes) "
                      "{ *free_bytes = *total_bytes = (size_t)1 << 34; return 0; }",
    "cudaMemcpy": "int cudaMemcpy(void *to, const void *from, size_t n, int kind) "
                  "{ memcpy(to, from, n); return 0; }",
    "cudaMemcpyAsync": "int cudaMemcpyAsync(void *to, const void *from, size_t n, int kind, "
                       "void *stream) { memcpy(to, from, n); return 0; }",
    "cudaGetErrorString": 'const char *cudaGetErrorString(int error) { return "stand-in"; }',
    "cudaGetErrorName": 'const char *cudaGetErrorName(int error) { return "stand-in"; }',
    "cudaDriverGetVersion": "int cudaDriverGetVersion(int *version) { *version = 13000; "
                            "return 0; }",
    "cudaRuntimeGetVersion": "int cudaRuntimeGetVersion(int *version) { *version = 13000; "
                             "return 0; }",
}
#: The driver functions the service asks before it uses CUDA: it starts and sees two devices.
DRIVER_FUNCTIONS = {
    "cuInit": "int cuInit(unsigned flags) { return 0; }",
    "cuDeviceGetCount": "int cuDeviceGetCount(int *count) { *count = 2; return 0; }",
}
KERNEL_TABLE_SCRIPT = """
import json
import onnxruntime as ort
from onnxruntime.capi import _pybind_state as C
kernels = sorted(
    ([k.op_name, k.version_range[0], k.version_range[1],
      {name: sorted(t.removeprefix("tensor(").removesuffix(")") for t in types)
       for name, types in sorted(k.type_constraints.items())}]
     for k in C.get_all_opkernel_def()
     if k.provider == "CUDAExecutionProvider" and k.domain == ""),
    key=json.dumps)
print(json.dumps({"onnxruntime": ort.__version__, "build": C.get_build_info(),
                  "kernels": kernels}))
"""


def missing_tools() -> str | None:
    """Why the stand-ins cannot be built here (no C compiler or binutils), or None."""
    missing = [tool for tool in ("cc", "nm", "readelf") if shutil.which(tool) is None]
    return f"no {', '.join(missing)} on this machine" if missing else None


def build_driver(directory: Path) -> Path:
    """An empty ``libcuda.so.1`` in ``directory``; returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    _compile(directory, "libcuda.so.1", [], None)
    return directory


def build_runtime(directory: Path) -> Path:
    """Stand-ins for every NVIDIA library the installed provider libraries need (see the module
    docstring); returns the directory."""
    directory.mkdir(parents=True, exist_ok=True)
    needed: set[str] = set()
    versioned: dict[str, set[str]] = defaultdict(set)
    unversioned: set[str] = set()
    for name in PROVIDER_LIBRARIES:
        library = CAPI / name
        needed |= {lib for lib in _needed(library) if lib.startswith(NVIDIA_PREFIXES)}
        for symbol, provider in _imports(library):
            if provider:
                versioned[provider].add(symbol)
            elif symbol != ORT_BRIDGE:
                unversioned.add(symbol)
    for library in sorted(needed):
        # Symbols that name their library go there; the few that name none go into every
        # stand-in whose library has no versioned symbols (the driver, TensorRT's).
        symbols = versioned.get(library) or unversioned
        if library == "libcuda.so.1":
            symbols = symbols | set(DRIVER_FUNCTIONS)
        _compile(directory, library, sorted(symbols), library if library in versioned else None)
    return directory


def kernel_table(runtime: Path) -> dict:
    """ONNX Runtime's CUDA kernels of the standard domain, read from the installed provider
    library with the stand-in ``runtime`` loaded: ``{"onnxruntime", "build", "kernels": [[op,
    first opset, last opset, {constraint: [types]}], ...]}``."""
    result = subprocess.run([sys.executable, "-c", KERNEL_TABLE_SCRIPT], capture_output=True,
                            text=True, timeout=300, env=standin_environment(runtime))
    if result.returncode:
        raise RuntimeError(f"reading the kernel table failed ({result.returncode}):\n"
                           f"{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def standin_environment(directory: Path) -> dict[str, str]:
    """The environment with ``directory`` first on the library path."""
    path = os.environ.get("LD_LIBRARY_PATH")
    return {**os.environ, "LD_LIBRARY_PATH": f"{directory}:{path}" if path else str(directory)}


def _needed(library: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True,
                         check=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


def _imports(library: Path) -> list[tuple[str, str]]:
    """(symbol, the library its version names, or "") for every strong undefined symbol that is
    not the C or C++ runtime's."""
    out = subprocess.run(["nm", "-D", "--undefined-only", str(library)], capture_output=True,
                         text=True, check=True).stdout
    imports = []
    for line in out.splitlines():
        kind, symbol = line.split()[-2:]
        if kind != "U":
            continue
        name, _, version = symbol.partition("@")
        if version and not version.startswith(NVIDIA_PREFIXES):
            continue  # GLIBC_, GLIBCXX_, CXXABI_, GCC_
        imports.append((name, version))
    return imports


def _compile(directory: Path, library: str, symbols: list[str], version: str | None) -> None:
    """``directory/library`` exporting ``symbols`` (with ``version`` as their version node)."""
    defined = {**RUNTIME_FUNCTIONS, **DRIVER_FUNCTIONS}
    functions = [defined.get(symbol, f"long {symbol}(void) {{ return 0; }}") for symbol in symbols]
    source = directory / f"{library}.c"
    source.write_text("#include <stdlib.h>\n#include <string.h>\n" + "\n".join(functions) + "\n")
    command = ["cc", "-shared", "-fPIC", "-o", str(directory / library), str(source),
               f"-Wl,-soname,{library}"]
    if version:
        script = directory / f"{library}.map"
        script.write_text(f"{version} {{ global: {' '.join(s + ';' for s in symbols)} "
                          "local: *; };\n")
        command.append(f"-Wl,--version-script={script}")
    subprocess.run(command, check=True, capture_output=True)


def write_kernel_table(path: Path) -> None:
    """Writes ``kernel_table`` with its source, one kernel a line."""
    with tempfile.TemporaryDirectory() as scratch:
        table = kernel_table(build_runtime(Path(scratch)))
    fields = {"source": "onnxruntime.capi._pybind_state.get_all_opkernel_def() of the installed "
                        "onnxruntime-gpu: CUDAExecutionProvider, domain ai.onnx; its provider "
                        "library loaded against the stand-in CUDA libraries of "
                        "tests/cuda_standin.py",
              "onnxruntime": table["onnxruntime"], "build": table["build"]}
    head = "".join(f" {json.dumps(key)}: {json.dumps(value)},\n" for key, value in fields.items())
    kernels = ",\n".join(f"  {json.dumps(kernel)}" for kernel in table["kernels"])
    path.write_text(f'{{\n{head} "kernels": [\n{kernels}\n ]\n}}\n')


if __name__ == "__main__":
    write_kernel_table(Path(sys.argv[1]))
