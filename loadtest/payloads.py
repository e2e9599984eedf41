"""Request bodies for load tests, built from a model package (its manifest and feature transform).

Rows come from a raw data file (``--data``: Parquet or the demo's data, labels dropped) or are
synthesised from the package's own vocabularies, so that every categorical value is one the
model knows (a skewed pick, so that some ids are hot, as in real traffic) and a few values are
missing. The same rows are then written in each API's body:

- ``v2-binary``: Open Inference Protocol v2 with Triton's binary tensor extension, the model's
  tensors ``dense`` FP32 [R, n_dense] and ``sparse`` INT64 [R, n_tables] after the package's
  transform (done here, once), and the probabilities asked for as binary data;
- ``v2-json``: the same tensors as v2 JSON data (dense values to 5 decimals, as a client writes
  them), the probabilities answered as JSON: the body every server of ``bench peers`` reads;
- ``columns``: the friendly JSON API, raw features as columns (``{"columns": {...}}``);
- ``rows``: the friendly JSON API, raw features as rows of objects (``{"rows": [...]}``).

Numpy and pyarrow only: locust's processes import this module too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.parquet as pq

from ctrserve.models.schema import RawBatch
from ctrserve.models.transform import FeatureTransform

from .options import APIS

HEADER_LENGTH = "Inference-Header-Content-Length"
#: Share of values sent as missing, in synthesised rows.
MISSING_SHARE = 0.05


def route(api: str, model: str) -> str:
    """The URL path each API's requests go to."""
    if api in ("v2-binary", "v2-json"):
        return f"/v2/models/{model}/infer"
    if api in ("columns", "rows"):
        return f"/v1/models/{model}/score"
    raise ValueError(f"unknown API {api!r}; expected one of {', '.join(APIS)}")


@dataclass(frozen=True)
class Body:
    """One request: its path, bytes and headers, and how many rows it scores."""

    path: str
    data: bytes
    headers: dict[str, str]
    rows: int


class RowPool:
    """Raw rows (column lists, ``None`` for missing) and the same rows as the model's tensors."""

    def __init__(self, package: str | Path, rows: int = 4096, data: str | Path | None = None,
                 seed: int = 0) -> None:
        package = Path(package)
        self.manifest = json.loads((package / "manifest.json").read_text())
        self.model = self.manifest["name"]
        self.transform = FeatureTransform.load(package / "transform")
        self.rng = np.random.default_rng(seed)
        if data is not None:
            self.columns = _read_rows(Path(data), rows, self.transform)
        else:
            self.columns = _synthesise(self.transform, rows, self.rng)
        self.size = len(next(iter(self.columns.values())))
        batch = RawBatch(
            labels=None,
            dense={e.name: np.array([np.nan if v is None else v for v in self.columns[e.name]],
                                    dtype=np.float64) for e in self.transform.dense},
            categorical={e.column.name: _object_array(self.columns[e.column.name])
                         for e in self.transform.categorical},
        )
        transformed = self.transform.transform(batch)
        self.dense = np.ascontiguousarray(transformed.dense, dtype=np.float32)
        self.sparse = np.ascontiguousarray(transformed.sparse, dtype=np.int64)

    def window(self, start: int, rows: int) -> np.ndarray:
        """Indices of ``rows`` consecutive rows from ``start``, wrapping around the pool."""
        return (start + np.arange(rows)) % self.size

    def body(self, api: str, index: np.ndarray) -> Body:
        index = np.asarray(index)
        path = route(api, self.model)
        if api == "v2-binary":
            data, headers = v2_binary_body(self.dense[index], self.sparse[index],
                                           self.transform.n_dense > 0)
        elif api == "v2-json":
            data = v2_json_body(self.dense[index], self.sparse[index], self.transform.n_dense > 0)
            headers = {"Content-Type": "application/json"}
        elif api == "columns":
            data = orjson.dumps({"columns": {name: [values[i] for i in index]
                                             for name, values in self.columns.items()}})
            headers = {"Content-Type": "application/json"}
        elif api == "rows":
            data = orjson.dumps({"rows": [
                {name: values[i] for name, values in self.columns.items()
                 if values[i] is not None} for i in index]})
            headers = {"Content-Type": "application/json"}
        else:
            raise ValueError(f"unknown API {api!r}; expected one of {', '.join(APIS)}")
        return Body(path, data, headers, len(index))

    def bodies(self, api: str, rows: int, count: int = 64) -> list[Body]:
        """``count`` different bodies of ``rows`` rows each (consecutive windows of the pool)."""
        step = max(1, self.size // max(1, count))
        return [self.body(api, self.window(i * step, rows)) for i in range(count)]

    def bodies_of_sizes(self, api: str, sizes: list[int]) -> list[Body]:
        """One body per entry of ``sizes`` (rows each), at random places in the pool."""
        starts = self.rng.integers(0, self.size, len(sizes))
        return [self.body(api, self.window(int(s), int(n))) for s, n in zip(starts, sizes,
                                                                             strict=True)]


def v2_binary_body(dense: np.ndarray, sparse: np.ndarray,
                   with_dense: bool = True) -> tuple[bytes, dict[str, str]]:
    """A v2 infer body with the model's tensors as binary data, asking for a binary answer."""
    n = len(sparse)
    inputs = []
    blobs = []
    if with_dense:
        inputs.append({"name": "dense", "datatype": "FP32", "shape": [n, dense.shape[1]],
                       "parameters": {"binary_data_size": dense.nbytes}})
        blobs.append(dense.astype("<f4", copy=False).tobytes())
    inputs.append({"name": "sparse", "datatype": "INT64", "shape": [n, sparse.shape[1]],
                   "parameters": {"binary_data_size": sparse.nbytes}})
    blobs.append(sparse.astype("<i8", copy=False).tobytes())
    header = orjson.dumps({"inputs": inputs, "outputs": [
        {"name": "probability", "parameters": {"binary_data": True}}]})
    return b"".join([header, *blobs]), {HEADER_LENGTH: str(len(header)),
                                        "Content-Type": "application/octet-stream"}


def v2_json_body(dense: np.ndarray, sparse: np.ndarray, with_dense: bool = True) -> bytes:
    """A v2 infer body with the model's tensors as JSON data, the answer asked for as JSON."""
    n = len(sparse)
    inputs = []
    if with_dense:
        inputs.append({"name": "dense", "datatype": "FP32", "shape": [n, dense.shape[1]],
                       "data": np.round(dense.astype(np.float64), 5).ravel().tolist()})
    inputs.append({"name": "sparse", "datatype": "INT64", "shape": [n, sparse.shape[1]],
                   "data": sparse.ravel().tolist()})
    return orjson.dumps({"inputs": inputs})


def candidate_counts(rng: np.random.Generator, count: int, mean: float = 270.0,
                     sigma: float = 1.0, low: int = 1, high: int = 4096) -> np.ndarray:
    """Candidates per ranking query: a long-tailed (lognormal) count with the given mean,
    clipped to ``[low, high]`` (MLPerf's DLRM queries average about 270 pairs)."""
    mu = math.log(mean) - sigma * sigma / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, count)), low, high).astype(int)


def _object_array(values: list) -> np.ndarray:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _synthesise(transform: FeatureTransform, rows: int,
                rng: np.random.Generator) -> dict[str, list]:
    """Raw rows the model knows: categorical values drawn from each vocabulary with a skew (a
    power of a uniform draw picks low positions more often), dense counts from a long tail,
    ``MISSING_SHARE`` of the values missing."""
    columns: dict[str, list] = {}
    for dense in transform.dense:
        counts = np.floor(rng.lognormal(1.0, 1.5, rows)).astype(np.int64).tolist()
        columns[dense.name] = _with_missing(counts, rng)
    for encoder in transform.categorical:
        values: list[int] | list[str]
        kind = encoder.column.kind
        if encoder.mode == "vocab" and len(encoder.vocabulary) and kind in ("int", "hex"):
            keys = encoder.vocabulary
            positions = np.floor(len(keys) * rng.random(rows) ** 3).astype(np.int64)
            picked = keys[positions]
            if kind == "int":
                values = picked.view(np.int64).tolist()
            else:
                values = [format(int(k), "08x") for k in picked]
        else:  # hashed ids or string keys: any value is valid; hashed into the id space
            numbers = np.floor(1e6 * rng.random(rows) ** 3).astype(np.int64)
            if kind == "int":
                values = numbers.tolist()
            elif kind == "hex":
                values = [format(int(k), "08x") for k in numbers]
            else:
                values = [f"v{k}" for k in numbers]
        columns[encoder.column.name] = _with_missing(values, rng)
    return columns


def _with_missing(values: list, rng: np.random.Generator) -> list:
    for index in np.flatnonzero(rng.random(len(values)) < MISSING_SHARE):
        values[index] = None
    return values


def _read_rows(path: Path, rows: int, transform: FeatureTransform) -> dict[str, list]:
    """The first ``rows`` rows of a Parquet file as JSON-ready column lists (NaN -> None)."""
    wanted = [e.name for e in transform.dense] + [e.column.name for e in transform.categorical]
    file = pq.ParquetFile(path)
    present = [name for name in wanted if name in file.schema_arrow.names]
    parts = []
    for group in range(file.num_row_groups):
        parts.append(file.read_row_group(group, columns=present))
        if sum(part.num_rows for part in parts) >= rows:
            break
    if not parts:
        raise ValueError(f"{path}: no rows")
    table = pa.concat_tables(parts).slice(0, rows)
    columns = {}
    for name in wanted:
        if name not in present:
            columns[name] = [None] * table.num_rows
            continue
        values = table.column(name).to_pylist()
        columns[name] = [None if v is None or (isinstance(v, float) and math.isnan(v)) else v
                         for v in values]
    return columns
