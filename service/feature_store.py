"""Online feature stores: Redis (Feast's layout) or an embedded in-process store.

Key layout: ``<namespace>:<entity>:<id>`` (namespace ``ctrserve`` by default) holds a hash of raw
column name -> raw value as text, exactly the values the training data had, so the package's
own transform applies at serving as in training. A missing field is a missing value. A value
read back is refused (400, naming the entity, its id and the column) when it is longer than
``max_value_bytes`` (before it is decoded) or not UTF-8; dense and integer values that do not
parse stay text, which the request's checks report with their column and row.

Redis: all entity reads of one request go out as one pipeline of ``HMGET`` (one round trip),
bounded by ``timeout_ms``. After a failure the store backs off (50 ms doubling to 2 s) and
requests fail at once with 503 until the next attempt; the client's connection pool reconnects
on that attempt. Each failed read counts in ``ctrserve_feature_store_errors_total`` by kind;
each refused request, failed or refused during the backoff, is a ``FeatureStoreUnavailable``
(``ctrserve_rejections_total{reason="feature_store"}``, counted with the request). An
outage logs one warning when it begins and one when a read succeeds again (per worker).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ctrserve.models.keys import has_control_character, shown
from ctrserve.models.transform import FeatureTransform

from . import metrics
from .errors import BadRequest, FeatureStoreUnavailable
from .feature_view import FeatureView
from .raw_values import TextLimit

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
    def __init__(self, url: str, namespace: str, timeout_ms: int, max_value_bytes: int) -> None:
        self.namespace = namespace
        self.timeout_s = timeout_ms / 1000
        self.value_limit = TextLimit.of("string", max_value_bytes)
        self.client = aioredis.from_url(url, socket_timeout=self.timeout_s,
                                        socket_connect_timeout=self.timeout_s)
        self._retry_at = 0.0
        self._backoff = BACKOFF_START_S
        self._outage = Outage()
        for kind in metrics.FEATURE_STORE_ERROR_KINDS:  # at 0: the first failure is an increase
            metrics.FEATURE_STORE_ERRORS.labels(kind)

    async def fetch(self, keys: Keys, view: FeatureView,
                    transform: FeatureTransform) -> Stored:
        now = time.monotonic()
        if now < self._retry_at:
            self._outage.refuse()
            raise FeatureStoreUnavailable("the feature store (Redis) is unavailable; retrying "
                                          f"in {self._retry_at - now:.2f} s")
        started = time.perf_counter()
        columns = [view.entities[entity].columns for entity, _ in keys]
        try:
            async with asyncio.timeout(self.timeout_s):
                pipeline = self.client.pipeline(transaction=False)
                for (entity, key), fields in zip(keys, columns, strict=True):
                    pipeline.hmget(redis_key(self.namespace, entity, key), fields)
                replies = await pipeline.execute()
        except (RedisError, OSError, TimeoutError) as error:
            kind = error_kind(error)
            metrics.FEATURE_STORE_ERRORS.labels(kind).inc()
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(BACKOFF_MAX_S, self._backoff * 2)
            self._outage.failed(now, f"{kind}: {error}")
            raise FeatureStoreUnavailable("the feature store (Redis) did not answer: "
                                          f"{kind}") from None
        self._backoff = BACKOFF_START_S
        self._outage.answered(now)
        metrics.FEATURE_STORE_SECONDS.observe(time.perf_counter() - started)
        parse = _parsers(transform)
        stored: Stored = {}
        for (entity, key), fields, values in zip(keys, columns, replies, strict=True):
            if all(v is None for v in values):
                stored[(entity, key)] = None
                continue
            stored[(entity, key)] = {
                field: parse[field](self._text(entity, key, field, value))
                for field, value in zip(fields, values, strict=True)
                if value is not None
            }
        return stored

    def _text(self, entity: str, key: str, field: str, value: bytes) -> str:
        """A stored value as text, refused (400) past ``max_value_bytes`` before it is decoded,
        or when it is not UTF-8."""
        where = f"{entity} {shown(key)}, column {field!r}"
        if len(value) > self.value_limit.limit:
            raise self.value_limit.error(where, f"the stored value of {len(value):,} bytes")
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise BadRequest(f"{where}: the stored value is not UTF-8 text") from None

    async def ping(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s):
                return bool(await self.client.ping())
        except (RedisError, OSError, TimeoutError):
            return False

    async def close(self) -> None:
        await self.client.aclose()


class Outage:
    """Whether the feature store is down, as ranking requests find it: logs one line when it
    goes down and one when it answers again, with how long it was down and the requests
    refused meanwhile. A read issued before the last change (a slow reply that arrives after a
    newer read's) does not change it back."""

    def __init__(self) -> None:
        self.since: float | None = None
        self.recovered_at = 0.0
        self.refused = 0

    def failed(self, issued: float, why: str) -> None:
        if self.since is None and issued >= self.recovered_at:
            self.since = time.monotonic()
            log.warning("feature store (Redis) outage: %s; ranking requests are refused (503) "
                        "until it answers", why)
        self.refuse()

    def refuse(self) -> None:
        """One more request refused during the outage (its read failed, or none was tried
        during the backoff)."""
        if self.since is not None:
            self.refused += 1

    def answered(self, issued: float) -> None:
        if self.since is not None and issued >= self.since:
            self.recovered_at = time.monotonic()
            log.warning("feature store (Redis) recovered after %.1f s; %d ranking requests were "
                        "refused meanwhile", self.recovered_at - self.since, self.refused)
            self.since = None
            self.refused = 0


def error_kind(error: Exception) -> str:
    """``ctrserve_feature_store_errors_total``'s kind of a failed read."""
    if isinstance(error, TimeoutError | RedisTimeoutError):
        return "timeout"
    if isinstance(error, OSError | RedisConnectionError):
        return "connection"
    return "error"


FeatureStore = EmbeddedFeatureStore | RedisFeatureStore


def open_feature_store(url: str, namespace: str, timeout_ms: int,
                       max_value_bytes: int) -> FeatureStore:
    """Redis at ``url``, or the embedded store when there is no URL."""
    if not url:
        return EmbeddedFeatureStore()
    return RedisFeatureStore(url, namespace, timeout_ms, max_value_bytes)


def _parsers(transform: FeatureTransform) -> dict:
    """Text from Redis back to the raw value's type: numbers for dense and integer columns;
    text that does not parse stays text, which the request's checks then report with its column
    and row (``friendly.features_from_columns``)."""
    parsers: dict = {e.name: _float_or_text for e in transform.dense}
    for encoder in transform.categorical:
        parsers[encoder.column.name] = _int_or_text if encoder.column.kind == "int" else str
    return parsers


def _float_or_text(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text


def _int_or_text(text: str) -> int | str:
    if has_control_character(text):  # int() would drop a newline around the digits
        return text
    try:
        return int(text)
    except ValueError:
        return text
