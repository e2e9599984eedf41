"""The GPU path, proven as far as a machine without a GPU allows, with ONNX Runtime as referee.

- ONNX Runtime's CUDA kernel table (read from the installed provider library, kept in
  ``tests/data``): every op of every scheme's inlined graph has a CUDA kernel for the types it
  meets.
- ONNX Runtime's own validation: the session options and provider list the runtime builds are
  accepted (the "Conflicting session configuration" error does not occur), and, with stand-in
  CUDA libraries (``cuda_standin.py``), the CUDA provider parses the runtime's provider options
  and partitions every scheme's graph: lookups and MLPs on CUDA.
- With a stand-in driver and no CUDA libraries, ``auto`` serves on CPU and says why, and
  ``--provider cuda`` refuses to start with the reason.
- I/O binding (the CUDA path's code, run on CPU) matches ``session.run``.

Numerical results on a GPU are not proven here: ``scripts/gpu_check.sh`` does that on a GPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from cuda_standin import (
    build_driver,
    build_runtime,
    kernel_table,
    missing_tools,
    standin_environment,
)
from onnx import TensorProto, helper, inliner
from servers import ServiceProcess
from test_schemes import SIZES, model_of

from ctrserve.export.functions import DOMAIN, OPSET
from ctrserve.export.graph import IR_VERSION, build_graph
from ctrserve.export.package import LOOKUP_NODE
from ctrserve.export.parity import parity_batches
from ctrserve.models.dlrm import ModelConfig, build_model
from ctrserve.models.embeddings.scheme_settings import (
    EmbeddingConfig,
    HashSettings,
    KPartSettings,
    PEPSettings,
    QRSettings,
)
from ctrserve.models.schemes import SCHEMES
from ctrserve.service.binding import BoundSession
from ctrserve.service.cuda import CPU, CUDA, CudaOptions, worker_slot
from ctrserve.service.placement import Placement
from ctrserve.service.runtime import cuda_providers, session_options

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TABLE = ROOT / "tests" / "data" / "onnxruntime-cuda-kernels.json"
#: Op types ONNX Runtime may keep on CPU in a CUDA session: shape and index computations.
SHAPE_OPS = {"Shape", "Size", "Gather", "Concat", "Range", "Slice", "Squeeze", "Unsqueeze",
             "Reshape", "Expand", "Cast", "Add", "Sub", "Mul", "Div", "Mod", "Min", "Max",
             "ConstantOfShape", "Equal", "Where"}


def _variants() -> dict[str, torch.nn.Module]:
    """A model for every registered scheme, every QR operation, a PEP table with every value
    pruned, a DLRM without dense inputs and a logistic regression."""
    models = {name: model_of(name)[0] for name in SCHEMES}
    for operation in ("add", "concat"):
        models[f"qr-{operation}"] = model_of("qr", QRSettings(operation=operation))[0]
    models["kpart-4"] = model_of("kpart", KPartSettings(partitions=4))[0]
    models["pep-empty"] = model_of("pep", PEPSettings(pep_keep=1e-9))[0]
    torch.manual_seed(0)
    hashed = EmbeddingConfig(default=HashSettings(min_rows=0))
    models["no-dense"] = build_model(0, SIZES, ["a", "b", "c"], ModelConfig(
        dim=8, bottom=(8,), top=(8,), embeddings=hashed)).eval()
    models["lr"] = build_model(3, SIZES, ["a", "b", "c"], ModelConfig(
        kind="lr", dim=1, embeddings=hashed)).eval()
    return models


@pytest.fixture(scope="module")
def variants() -> dict[str, torch.nn.Module]:
    return _variants()


@pytest.fixture(scope="module")
def graphs(variants) -> dict[str, onnx.ModelProto]:
    return {name: build_graph(model)[0] for name, model in variants.items()}


@pytest.fixture(scope="module")
def model_files(graphs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("graphs")
    files = {}
    for name, graph in graphs.items():
        (root / name).mkdir()
        onnx.save_model(graph, root / name / "model.onnx")
        files[name] = root / name / "model.onnx"
    return files


@pytest.fixture(scope="session")
def standin_runtime(tmp_path_factory) -> Path:
    if missing_tools():
        pytest.skip(f"stand-in CUDA libraries cannot be built: {missing_tools()}")
    return build_runtime(tmp_path_factory.mktemp("cuda-runtime"))


@pytest.fixture(scope="session")
def standin_driver(tmp_path_factory) -> Path:
    if missing_tools():
        pytest.skip(f"a stand-in libcuda.so.1 cannot be built: {missing_tools()}")
    return build_driver(tmp_path_factory.mktemp("cuda-driver"))


def _with_standin(directory: Path, code: str) -> dict:
    """Runs ``code`` (which prints one JSON line last) with the stand-ins in ``directory``."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=600, env=standin_environment(directory))
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


# -- ONNX Runtime's CUDA kernel table --------------------------------------------------------


def _table() -> dict:
    return json.loads(KERNEL_TABLE.read_text())


def test_the_kernel_table_is_the_pinned_onnxruntimes():
    table = _table()
    constraints = (ROOT / "requirements" / "constraints.txt").read_text()
    pinned = re.search(r"^onnxruntime-gpu==(\S+)", constraints, re.MULTILINE)
    assert pinned and table["onnxruntime"] == pinned.group(1) == ort.__version__
    assert "get_all_opkernel_def" in table["source"]
    assert len(table["kernels"]) > 1000


def test_the_kernel_table_is_what_the_installed_provider_library_registers(standin_runtime):
    assert kernel_table(standin_runtime)["kernels"] == _table()["kernels"]


def _type_name(elem_type: int) -> str:
    """ONNX Runtime's name of a tensor element type (``float``, ``int64``, ``uint8``...)."""
    return TensorProto.DataType.Name(elem_type).lower()


def missing_cuda_kernels(model: onnx.ModelProto, kernels: list) -> list[str]:
    """The nodes of ``model``, functions inlined, that no CUDA kernel of ``kernels`` runs for
    the types their inputs and outputs have, at the graph's opset."""
    graph = onnx.shape_inference.infer_shapes(inliner.inline_local_functions(model),
                                              strict_mode=True).graph
    types = {value.name: _type_name(value.type.tensor_type.elem_type)
             for value in [*graph.input, *graph.value_info, *graph.output]}
    types |= {tensor.name: _type_name(tensor.data_type) for tensor in graph.initializer}
    missing = []
    for node in graph.node:
        if node.op_type == "Constant":  # folded into an initializer: no kernel runs
            continue
        schema = onnx.defs.get_schema(node.op_type, OPSET, node.domain)
        params = {c.type_param_str for c in schema.type_constraints}
        bound: dict[str, str] = {}
        for names, formals in ((node.input, schema.inputs), (node.output, schema.outputs)):
            for index, name in enumerate(names):
                formal = formals[min(index, len(formals) - 1)]  # variadic: the last repeats
                if name and formal.type_str in params:
                    bound[formal.type_str] = types[name]
        if not any(first <= schema.since_version <= last
                   and all(t in constraints.get(p, [t]) for p, t in bound.items())
                   for op, first, last, constraints in kernels if op == node.op_type):
            missing.append(f"{node.op_type} (opset {schema.since_version}) {bound}")
    return missing


def test_every_op_of_every_scheme_has_a_cuda_kernel_for_its_types(graphs):
    kernels = _table()["kernels"]
    missing = {name: problems for name, graph in graphs.items()
               if (problems := missing_cuda_kernels(graph, kernels))}
    assert not missing, missing


def test_the_kernel_check_catches_the_bit_ops_pep_used_to_unpack_its_mask():
    """BitShift and BitwiseAnd, which PEP's body used before, have no CUDA kernel."""
    nodes = [helper.make_node("BitShift", ["x", "s"], ["y"], direction="RIGHT"),
             helper.make_node("BitwiseAnd", ["y", "s"], ["z"])]
    graph = helper.make_graph(
        nodes, "bits", [helper.make_tensor_value_info(n, TensorProto.UINT8, [4]) for n in "xs"],
        [helper.make_tensor_value_info("z", TensorProto.UINT8, [4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    assert [m.split()[0] for m in missing_cuda_kernels(model, _table()["kernels"])] == [
        "BitShift", "BitwiseAnd"]


# -- ONNX Runtime's session validation -------------------------------------------------------


def test_onnxruntime_accepts_the_cuda_session_options_the_runtime_builds(model_files):
    """Without a CUDA provider that can run, ONNX Runtime drops CUDA and builds the session on
    CPU; with CPU fallback switched off, as the runtime used to, it refuses the pair outright."""
    path = str(model_files["pep"])
    session = ort.InferenceSession(path, session_options(1), providers=cuda_providers(
        CudaOptions()), enable_fallback=0)
    assert session.get_providers()[-1] == CPU
    conflicting = session_options(1)
    conflicting.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    with pytest.raises(Exception, match="Conflicting session configuration"):
        ort.InferenceSession(path, conflicting, providers=[CUDA, CPU], enable_fallback=0)


PLACE_EVERY_MODEL = """
import json, sys
from pathlib import Path
from ctrserve.service.cuda import CUDA, CudaOptions
from ctrserve.service.placement import Placement
from ctrserve.service.runtime import open_session
result = {}
for name, path in json.loads(sys.argv[1]).items():
    session, device = open_session(Path(path), "cuda", 1, CudaOptions())
    placement = Placement.of(session)
    result[name] = {"providers": session.get_providers(), "device": device,
                    "placement": placement.to_dict(), "lookups": placement.lookups(),
                    "off_gpu": [n.name for n in placement.hot_nodes_off(CUDA)]}
print(json.dumps(result))
"""


def test_every_scheme_builds_on_cuda_with_its_lookups_and_mlps_on_the_gpu(
        standin_runtime, model_files, graphs):
    """ONNX Runtime's own CUDA provider partitions each graph (stand-in CUDA libraries): the
    runtime accepts the session, every lookup and MLP node is on CUDA, and what ONNX Runtime
    keeps on CPU are shape computations."""
    code = PLACE_EVERY_MODEL.replace("sys.argv[1]", repr(json.dumps(
        {name: str(path) for name, path in model_files.items()})))
    placed = _with_standin(standin_runtime, code)
    for name, result in placed.items():
        assert result["providers"][0] == CUDA and result["device"] == 0, name
        assert result["off_gpu"] == [], name
        assert result["lookups"] == _lookups(graphs[name]), name
        assert result["lookups"] > 0 or name == "pep-empty", name  # nothing left to look up
        on_cpu = result["placement"].get(CPU, {"op_types": {}})["op_types"]
        assert set(on_cpu) <= SHAPE_OPS, (name, on_cpu)
    assert placed["pep"]["placement"][CUDA]["op_types"]["Mod"] >= 3  # the mask's bits


def _lookups(model: onnx.ModelProto) -> int:
    """The lookup nodes ``model`` runs: in the graph, and in the body of each function call."""
    bodies = {(function.name, function.overload): function for function in model.functions}
    return sum(sum(LOOKUP_NODE in inner.name for inner in bodies[node.op_type, node.overload].node)
               if node.domain == DOMAIN else LOOKUP_NODE in node.name
               for node in model.graph.node)


def _bits_lookup_model(path: Path) -> Path:
    """A graph whose lookup (so named) is a ``BitShift``, which has no CUDA kernel: ONNX Runtime
    must place it on CPU."""
    nodes = [helper.make_node("BitShift", ["x", "s"], ["y"], name=f"t/{LOOKUP_NODE}",
                              direction="RIGHT")]
    graph = helper.make_graph(
        nodes, "bits", [helper.make_tensor_value_info(n, TensorProto.UINT8, [4]) for n in "xs"],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [4])])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                                      ir_version=IR_VERSION), path)
    return path


REFUSE_AND_FALL_BACK = """
import json, logging, sys
from pathlib import Path
from ctrserve.service.cuda import CudaOptions
from ctrserve.service.runtime import ModelLoadError, open_session
logging.basicConfig(level="WARNING", stream=sys.stderr)
path = Path(sys.argv[1])
try:
    open_session(path, "cuda", 1, CudaOptions())
    refused = ""
except ModelLoadError as error:
    refused = str(error)
session, device = open_session(path, "auto", 1, CudaOptions())
print(json.dumps({"refused": refused, "auto": session.get_providers(), "device": device}))
"""


def test_a_lookup_onnxruntime_keeps_off_the_gpu_is_refused_and_auto_falls_back(
        standin_runtime, tmp_path):
    model = _bits_lookup_model(tmp_path / "model.onnx")
    code = REFUSE_AND_FALL_BACK.replace("sys.argv[1]", repr(str(model)))
    result = _with_standin(standin_runtime, code)
    assert "provider 'cuda' asked for" in result["refused"]
    assert "not on the GPU" in result["refused"] and "BitShift" in result["refused"]
    assert result["auto"] == [CPU] and result["device"] is None


CUDA_OPTIONS = """
import json, sys
from pathlib import Path
from ctrserve.service.cuda import CudaOptions
from ctrserve.service.runtime import ModelLoadError, open_session
path = Path(sys.argv[1])
result = {}
for label, options in [("device 1, 256 MiB, next power of two", CudaOptions(1, 256 << 20)),
                       ("device 0, same as requested", CudaOptions(0, 0, "same_as_requested")),
                       ("device 2", CudaOptions(2))]:
    try:
        session, device = open_session(path, "cuda", 1, options)
        result[label] = session.get_provider_options()["CUDAExecutionProvider"]
    except ModelLoadError as error:
        result[label] = str(error)
print(json.dumps(result))
"""


def test_the_cuda_provider_parses_the_options_the_runtime_builds(standin_runtime, model_files):
    """ONNX Runtime's CUDA provider parses the runtime's options (the stand-in reports two
    devices): device, memory limit and arena strategy arrive; a device past the last is
    refused by ONNX Runtime with its reason."""
    code = CUDA_OPTIONS.replace("sys.argv[1]", repr(str(model_files["hash"])))
    result = _with_standin(standin_runtime, code)
    first = result["device 1, 256 MiB, next power of two"]
    assert (first["device_id"], first["gpu_mem_limit"]) == ("1", str(256 << 20))
    assert (first["arena_extend_strategy"], first["use_tf32"]) == ("kNextPowerOfTwo", "0")
    assert result["device 0, same as requested"]["arena_extend_strategy"] == "kSameAsRequested"
    assert "provider 'cuda' asked for" in result["device 2"]
    assert "Invalid device ID: 2" in result["device 2"]


# -- the server with a driver but no CUDA libraries ------------------------------------------


def test_auto_serves_on_cpu_and_logs_why_when_cuda_cannot_run(trained, standin_driver):
    with ServiceProcess(trained["repo"], "--provider", "auto", "--workers", "1",
                        env=standin_environment(standin_driver)) as server:
        metadata = httpx.get(f"{server.url}/v2/models/ctr", timeout=10).json()
        metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        log = server.log()
    warnings = [line for line in log.splitlines() if "provider auto: serving on CPU" in line]
    assert len(warnings) == 1 and " WARNING " in warnings[0], log
    assert "libcuda.so.1 is not a working NVIDIA driver" in warnings[0]
    parameters = metadata["parameters"]
    assert (parameters["execution_provider"], parameters["device"]) == (CPU, "cpu")
    assert list(parameters["placement"]) == [CPU]
    assert parameters["placement"][CPU]["op_types"]["Gemm"] >= 2
    active = [line for line in metrics.splitlines()
              if line.startswith("ctrserve_model_active{") and line.endswith(" 1.0")]
    assert len(active) == 1 and f'provider="{CPU}"' in active[0], metrics


def test_provider_cuda_refuses_to_start_with_the_reason(trained, standin_driver):
    result = subprocess.run(
        [sys.executable, "-m", "ctrserve", "serve", "--repo", str(trained["repo"]),
         "--provider", "cuda", "--port", "0"],
        capture_output=True, text=True, timeout=120, env=standin_environment(standin_driver))
    assert result.returncode != 0
    assert "provider 'cuda' asked for, but libcuda.so.1 is not a working NVIDIA driver" in (
        result.stderr), result.stderr


# -- placement reported, I/O binding, devices --------------------------------------------------


def test_inspect_prints_the_placement_onnxruntime_recorded(trained):
    package = trained["repo"] / "ctr" / "1"
    result = subprocess.run([sys.executable, "-m", "ctrserve", "inspect", str(package),
                             "--provider", "cpu"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert f"placement on {CPU} (cpu)" in result.stdout
    assert re.search(rf"^{CPU}: \d+ nodes: .*Gemm \d+", result.stdout, re.MULTILINE)


def test_a_cpu_session_places_every_node_on_cpu(model_files, graphs):
    session = ort.InferenceSession(str(model_files["lma"]), session_options(1),
                                   providers=[CPU])
    placement = Placement.of(session)
    assert list(placement.to_dict()) == [CPU]
    assert placement.lookups() == _lookups(graphs["lma"]) == 6  # signatures and memory
    assert placement.hot_nodes_off(CPU) == []
    assert "Gemm" in placement.summary()


@pytest.mark.parametrize("name", ["full", "qr", "pep", "int8", "lma", "robe", "no-dense", "lr"])
def test_io_binding_matches_a_plain_run(name, model_files, variants):
    """The CUDA path's binding code, on CPU: inputs staged, output bound, binding reused."""
    session = ort.InferenceSession(str(model_files[name]), session_options(1), providers=[CPU])
    bound = BoundSession(session, "probability", "cpu")
    model = variants[name]
    sizes = [table.num_embeddings for table in model.embedding_tables()]
    for _, dense, sparse in parity_batches(sizes, model.n_dense):
        feed = {"sparse": sparse, **({"dense": dense} if model.n_dense else {})}
        expected = session.run(None, feed)[0]
        np.testing.assert_allclose(bound.run(feed), expected, atol=1e-5, rtol=0)


def test_workers_take_distinct_slots_and_a_freed_slot_is_taken_again(tmp_path):
    """Slots are held by processes (an flock each): a worker that exits frees its slot, and
    the next worker started takes it."""
    assert worker_slot(1, tmp_path) == 0  # a single worker claims nothing
    assert [worker_slot(5, tmp_path) for _ in range(3)] == [0, 1, 2]
    claim = ("from pathlib import Path; from ctrserve.service.cuda import worker_slot; "
             f"print(worker_slot(5, Path({str(tmp_path)!r})))")
    child = subprocess.run([sys.executable, "-c", claim], capture_output=True, text=True,
                           timeout=60)
    assert child.stdout.strip() == "3"  # it saw the three held here, and exited
    assert worker_slot(5, tmp_path) == 3  # its slot is free again

