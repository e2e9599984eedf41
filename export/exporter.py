"""Checkpoint -> model package, atomically.

The package is built in a hidden staging directory next to its final place (same filesystem),
checked (ONNX checker, byte accounting, parity against torch), and renamed into place only when
every check passes; on any failure or crash no ``<repo>/<name>/<version>`` appears.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from ctrserve.models.checkpoint import Checkpoint, load_checkpoint

from .functions import DOMAIN, DOMAIN_VERSION, OPSET
from .graph import DENSE_INPUT, IR_VERSION, OUTPUT, SPARSE_INPUT, TableExport, build_graph
from .package import (
    EXTERNAL_DATA_FILE,
    FORMAT_VERSION,
    MANIFEST,
    MODEL_FILE,
    TRANSFORM_DIR,
    file_records,
    valid_model_name,
    versions,
)
from .parity import check_parity, session_options

#: Above this many initializer bytes the tensors go to ``model.onnx.data`` (protobuf stops at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


class ExportError(Exception):
    """The checkpoint cannot become a package (parity, accounting or the version is taken)."""


def next_version(model_directory: Path) -> int:
    existing = versions(model_directory)
    return existing[-1] + 1 if existing else 1


def _initializer_bytes(model: onnx.ModelProto) -> dict[str, int]:
    sizes = {}
    for tensor in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        sizes[tensor.name] = int(np.prod(tensor.dims, dtype=np.int64)) * np.dtype(dtype).itemsize
    return sizes


def _table_records(checkpoint: Checkpoint, tables: list[TableExport],
                   initializer_bytes: dict[str, int]) -> list[dict]:
    """Each table's summary, with the graph's initializer bytes checked against the scheme's own
    count: a table's own initializers plus its share of a shared memory, and the shares adding
    up to the memory."""
    records = []
    shares: dict[str, int] = {}
    for summary, exported in zip(checkpoint.model.table_summaries(), tables, strict=True):
        graph_bytes = exported.memory_share_bytes + sum(
            initializer_bytes[name] for name in exported.initializers
            if name != exported.shared_memory
        )
        if exported.shared_memory:
            shares[exported.shared_memory] = (shares.get(exported.shared_memory, 0)
                                              + exported.memory_share_bytes)
        if graph_bytes != summary["bytes"]:
            raise ExportError(
                f"table {summary['table']}: the graph stores {graph_bytes:,} bytes but "
                f"the {summary['scheme']} scheme counts {summary['bytes']:,}"
            )
        records.append({**summary, "op": exported.op_type, "initializers": exported.initializers})
    for memory, total in shares.items():
        if total != initializer_bytes[memory]:
            raise ExportError(f"{memory}: the tables' shares add up to {total:,} bytes, the "
                              f"memory holds {initializer_bytes[memory]:,}")
    return records


def _io(checkpoint: Checkpoint) -> tuple[list[dict], list[dict]]:
    model = checkpoint.model
    inputs = [{"name": SPARSE_INPUT, "dtype": "int64", "shape": [-1, len(model.tables)]}]
    if model.n_dense:
        inputs.insert(0, {"name": DENSE_INPUT, "dtype": "float32", "shape": [-1, model.n_dense]})
    return inputs, [{"name": OUTPUT, "dtype": "float32", "shape": [-1]}]


def _features(checkpoint: Checkpoint) -> dict:
    """The raw feature schema a server turns request rows into tensors with."""
    transform = checkpoint.transform
    return {
        "dense": [{"name": e.name, "default": e.fill, "log": e.log} for e in transform.dense],
        "categorical": [
            {"name": e.column.name, "kind": e.column.kind, "mode": e.mode, "ids": e.num_ids,
             "default": None}
            for e in transform.categorical
        ],
    }


def _write_model(model: onnx.ModelProto, staging: Path, total_bytes: int) -> bool:
    """Saves the graph; returns whether its tensors went to an external data file."""
    external = total_bytes > EXTERNAL_DATA_THRESHOLD
    if external:
        onnx.save_model(model, staging / MODEL_FILE, save_as_external_data=True,
                        all_tensors_to_one_file=True, location=EXTERNAL_DATA_FILE,
                        size_threshold=1024)
    else:
        onnx.save_model(model, staging / MODEL_FILE)
    onnx.checker.check_model(str(staging / MODEL_FILE), full_check=True)
    return external


def export_checkpoint(checkpoint_dir: str | Path, repo: str | Path, name: str,
                      version: int | None = None, overwrite: bool = False,
                      log=print) -> Path:
    """Writes ``repo/name/version`` from a training checkpoint; returns its path."""
    if not valid_model_name(name):
        raise ExportError(f"invalid model name {name!r}: use letters, digits, '_', '.' and '-' "
                          "(not first), at most 128 characters")
    checkpoint = load_checkpoint(checkpoint_dir)
    model_directory = Path(repo) / name
    model_directory.mkdir(parents=True, exist_ok=True)
    version = next_version(model_directory) if version is None else version
    if version < 1:
        raise ExportError(f"versions are positive integers, got {version}")
    final = model_directory / str(version)
    if final.exists() and not overwrite:
        raise ExportError(f"{final} exists: pick another --version or pass --overwrite")

    staging = Path(tempfile.mkdtemp(prefix=f".staging-{version}-", dir=model_directory))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the package from a server's other user
    try:
        log(f"building the graph ({len(checkpoint.model.tables)} tables)")
        graph, tables = build_graph(checkpoint.model, name)
        initializer_bytes = _initializer_bytes(graph)
        table_records = _table_records(checkpoint, tables, initializer_bytes)
        external = _write_model(graph, staging, sum(initializer_bytes.values()))
        del graph
        log("checking parity with torch")
        session = ort.InferenceSession(str(staging / MODEL_FILE), session_options(),
                                       providers=["CPUExecutionProvider"])
        parity = check_parity(checkpoint.model, session)
        del session
        if not parity.passed:
            raise ExportError(
                f"parity check failed: ONNX and torch probabilities differ by up to "
                f"{parity.max_abs_diff:.3g} (tolerance {parity.tolerance:g}); nothing written"
            )
        checkpoint.transform.save(staging / TRANSFORM_DIR)
        manifest = _manifest(checkpoint, name, version, table_records, initializer_bytes,
                             parity.to_dict(), external)
        manifest["files"] = file_records(staging)
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        _move_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"package: {final}")
    return final


def _manifest(checkpoint: Checkpoint, name: str, version: int, tables: list[dict],
              initializer_bytes: dict[str, int], parity: dict, external: bool) -> dict:
    config = checkpoint.config
    inputs, outputs = _io(checkpoint)
    embedding_bytes = sum(t["bytes"] for t in tables)
    dense_bytes = sum(size for key, size in initializer_bytes.items() if key.startswith("dense/"))
    model_config = checkpoint.model_config
    return {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"kind": model_config.kind, "dim": model_config.dim,
                  "bottom": list(model_config.bottom), "top": list(model_config.top)},
        "inputs": inputs,
        "outputs": outputs,
        "features": _features(checkpoint),
        "tables": tables,
        "bytes": {
            "embeddings": embedding_bytes,
            "full_embeddings": sum(t["full_bytes"] for t in tables),
            "dense": dense_bytes,
            "initializers": sum(initializer_bytes.values()),
        },
        "onnx": {"opset": OPSET, "ir_version": IR_VERSION, "custom_domain": DOMAIN,
                 "custom_domain_version": DOMAIN_VERSION, "external_data": external,
                 "onnxruntime": ort.__version__},
        "training": {"metrics": config.get("metrics", {}), "data": config.get("data", {}),
                     "best_epoch": config.get("best_epoch")},
        "parity": parity,
    }


def _move_into_place(staging: Path, final: Path) -> None:
    """Renames ``staging`` to ``final``; an existing ``final`` (overwrite) is moved aside first
    and removed only after the new package is in place."""
    if not final.exists():
        os.rename(staging, final)
        return
    retired = final.with_name(f".retired-{final.name}-{os.getpid()}")
    os.rename(final, retired)
    os.rename(staging, final)
    shutil.rmtree(retired, ignore_errors=True)
