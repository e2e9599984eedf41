"""``ctrserve features load``: a table of entity features into Redis, in Feast's layout.

Each row becomes the hash ``<namespace>:<entity>:<key>`` of its other columns as text (nulls left
out: a missing field is a missing value). Rows go in pipelined batches; each key is deleted and
written again in one transaction, so loading the same file twice gives the same store, and a
reader never sees a half-written entity.
"""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import redis
from tqdm import tqdm

from .feature_store import redis_key


def _batches(path: Path, rows: int):
    if path.suffix == ".parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=rows)
    else:
        yield from pcsv.open_csv(path)


def _text(value: object) -> str | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def load_features(url: str, entity: str, key_column: str, path: str | Path,
                  namespace: str = "ctrserve", ttl_s: int = 0, batch_rows: int = 1000,
                  progress: bool = True) -> int:
    """Writes every row of ``path``; returns the number of entities written."""
    path = Path(path)
    client = redis.Redis.from_url(url)
    client.ping()
    written = 0
    total = pq.ParquetFile(path).metadata.num_rows if path.suffix == ".parquet" else None
    with tqdm(total=total, unit="rows", desc=f"{entity} -> redis", disable=not progress) as bar:
        for batch in _batches(path, batch_rows):
            if key_column not in batch.schema.names:
                raise ValueError(f"{path} has no column {key_column!r} "
                                 f"(columns: {', '.join(batch.schema.names)})")
            pipeline = client.pipeline(transaction=True)
            for row in batch.to_pylist():
                key = _text(row.pop(key_column))
                if key is None:
                    raise ValueError(f"{path}: a row has no {key_column}")
                name = redis_key(namespace, entity, key)
                fields = {k: t for k, v in row.items() if (t := _text(v)) is not None}
                pipeline.delete(name)
                if fields:
                    pipeline.hset(name, mapping=fields)
                    if ttl_s > 0:
                        pipeline.expire(name, ttl_s)
                written += 1
            pipeline.execute()
            bar.update(batch.num_rows)
    client.close()
    return written
