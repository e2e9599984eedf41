"""Online feature stores: Redis (Feast's layout) or an embedded in-process store.

Key layout: ``<namespace>:<entity>:<id>`` (namespace ``ctrserve`` by default) holds a hash of raw
column name -> raw value as text, exactly the values the training data had, so the package's
own transform applies at serving as in training. A missing field is a missing value.

Redis: all entity reads of one request go out as one pipeline of ``HMGET`` (one round trip),
bounded by ``timeout_ms``. After a failure the store backs off (50 ms doubling to 2 s) and
requests fail at once with 503 until the next attempt; the client's connection pool reconnects
on that attempt.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ctrserve.models.transform import FeatureTransform

from . import metrics
from .errors import Unavailable
from .feature_view import FeatureView

log = logging.getLogger("ctrserve.features")

BACKOFF_START_S = 0.05
BACKOFF_MAX_S = 2.0

Keys = list[tuple[str, str]]
Stored = dict[tuple[str, str], dict | None]


def redis_key(namespace: str, entity: str, key: str) -> str:
    return f"{namespace}:{entity}:{key}"


def read_table(path: Path) -> list[dict]:
    """A CSV or Parquet table as a list of row dicts."""
    table = pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path)
    return table.to_pylist()


class EmbeddedFeatureStore:
    """Entity tables held in memory, loaded from each view's ``source`` files."""

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, dict]] = {}

    def add_view(self, view: FeatureView) -> None:
        for entity in view.entities.values():
            if entity.source is None or entity.name in self._rows:
                continue
            key_column = entity.key_column or entity.name
            self._rows[entity.name] = {str(row[key_column]): row
                                       for row in read_table(entity.source)}
            log.info("embedded store: %d %s rows from %s", len(self._rows[entity.name]),
                     entity.name, entity.source)

    async def fetch(self, keys: Keys, view: FeatureView,
                    transform: FeatureTransform) -> Stored:
        return {(entity, key): self._rows.get(entity, {}).get(key) for entity, key in keys}

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        pass


class RedisFeatureStore:
    def __init__(self, url: str, namespace: str, timeout_ms: int) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_ms / 1000
        self.client = aioredis.from_url(url, socket_timeout=self.timeout_s,
                                        socket_connect_timeout=self.timeout_s)
        self._retry_at = 0.0
        self._backoff = BACKOFF_START_S

    async def fetch(self, keys: Keys, view: FeatureView,
                    transform: FeatureTransform) -> Stored:
        now = time.monotonic()
        if now < self._retry_at:
            raise Unavailable("the feature store (Redis) is unavailable; retrying in "
                              f"{self._retry_at - now:.2f} s")
        started = time.perf_counter()
        columns = [view.entities[entity].columns for entity, _ in keys]
        try:
            async with asyncio.timeout(self.timeout_s):
                pipeline = self.client.pipeline(transaction=False)
                for (entity, key), fields in zip(keys, columns, strict=True):
                    pipeline.hmget(redis_key(self.namespace, entity, key), fields)
                replies = await pipeline.execute()
        except (RedisError, OSError, TimeoutError) as error:
            kind = "timeout" if isinstance(error, TimeoutError) else type(error).__name__
            metrics.FEATURE_STORE_ERRORS.labels(kind).inc()
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(BACKOFF_MAX_S, self._backoff * 2)
            raise Unavailable(f"the feature store (Redis) did not answer: {kind}") from None
        self._backoff = BACKOFF_START_S
        metrics.FEATURE_STORE_SECONDS.observe(time.perf_counter() - started)
        parse = _parsers(transform)
        stored: Stored = {}
        for (entity, key), fields, values in zip(keys, columns, replies, strict=True):
            if all(v is None for v in values):
                stored[(entity, key)] = None
                continue
            stored[(entity, key)] = {
                field: parse[field](value.decode()) for field, value in zip(fields, values,
                                                                           strict=True)
                if value is not None
            }
        return stored

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self.client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.client.aclose()


FeatureStore = EmbeddedFeatureStore | RedisFeatureStore


def open_feature_store(url: str, namespace: str, timeout_ms: int) -> FeatureStore:
    """Redis at ``url``, or the embedded store when there is no URL."""
    return RedisFeatureStore(url, namespace, timeout_ms) if url else EmbeddedFeatureStore()


def _parsers(transform: FeatureTransform) -> dict:
    """Text from Redis back to the raw value's type: numbers for dense and integer columns."""
    parsers: dict = {e.name: float for e in transform.dense}
    for encoder in transform.categorical:
        parsers[encoder.column.name] = _int_or_text if encoder.column.kind == "int" else str
    return parsers


def _int_or_text(text: str) -> int | str:
    """An integer column's value; text that is not an integer is left for the transform to
    report."""
    try:
        return int(text)
    except ValueError:
        return text
