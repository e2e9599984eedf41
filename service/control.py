"""The control record: which models, at which version, every worker and replica should serve.

Each worker holds its own sessions, so a load or unload that reaches one worker is recorded and
every worker follows the record. The record maps a model name to ``{"loaded": bool,
"version": N}`` (the version the handling worker resolved when it was asked for one, so that
all load the same; ``null`` means "the highest on disk") and carries a generation that grows
with each change. It persists: a worker or replica that starts later serves what it says for the
models it names.

Two places hold it:

- ``ControlFile``: ``REPO/.ctrserve/control.json``, for the workers of one replica (no Redis).
  Writers take an exclusive ``flock`` and replace the file atomically.
- ``RedisControl``: a hash ``<namespace>:control:models`` and a counter
  ``<namespace>:control:generation`` in Redis, shared by every replica, plus a notice published
  on ``<namespace>:control`` so that replicas act at once. Pub/sub drops notices while a
  subscriber is away, so replicas also compare their state with the record periodically and on
  every (re)subscription.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import redis.asyncio as aioredis
from redis.exceptions import RedisError

CONTROL_DIR = ".ctrserve"
RESUBSCRIBE_MAX_S = 2.0

log = logging.getLogger("ctrserve.control")


class ControlUnavailable(Exception):
    """The record cannot be read or written now (Redis away)."""


@dataclass
class ControlRecord:
    generation: int = 0
    models: dict[str, dict] = field(default_factory=dict)


class ControlFile:
    def __init__(self, repo: Path) -> None:
        self.directory = Path(repo) / CONTROL_DIR
        self.path = self.directory / "control.json"
        self.lock_path = self.directory / "control.lock"

    async def read(self) -> ControlRecord:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return ControlRecord()
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ControlUnavailable(f"{self.path}: unreadable control record ({error})") from None
        return ControlRecord(int(data.get("generation", 0)), dict(data.get("models", {})))

    async def update(self, name: str, loaded: bool, version: int | None) -> None:
        """Writes the change under the repository. A repository the server cannot write (a
        read-only volume, KServe's ``/mnt/models``) leaves the record unavailable, not the
        request failed: the change holds in this worker and is reported as not recorded."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with open(self.lock_path, "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                record = await self.read()
                record.models[name] = {"loaded": loaded, "version": version}
                staging = self.path.with_suffix(f".{os.getpid()}.tmp")
                staging.write_text(json.dumps(
                    {"generation": record.generation + 1, "models": record.models},
                    indent=2) + "\n")
                os.replace(staging, self.path)
        except OSError as error:
            raise ControlUnavailable(f"{self.path}: cannot write the control record "
                                     f"({error.strerror or error})") from None

    async def listen(self, on_change: Callable[[], Awaitable[None]]) -> None:
        """Files give no notice: workers find changes by reading the record periodically."""

    async def close(self) -> None:
        """Nothing to release."""


class RedisControl:
    def __init__(self, url: str, namespace: str, timeout_ms: int) -> None:
        timeout = max(0.05, timeout_ms / 1000)
        self.client = aioredis.from_url(url, socket_timeout=timeout,
                                        socket_connect_timeout=timeout)
        # Subscribers wait for notices indefinitely: no read timeout on their connection.
        self.subscriber = aioredis.from_url(url, socket_connect_timeout=timeout)
        self.models_key = f"{namespace}:control:models"
        self.generation_key = f"{namespace}:control:generation"
        self.channel = f"{namespace}:control"

    async def read(self) -> ControlRecord:
        try:
            pipeline = self.client.pipeline(transaction=False)
            pipeline.get(self.generation_key)
            pipeline.hgetall(self.models_key)
            generation, models = await pipeline.execute()
        except (RedisError, OSError) as error:
            raise ControlUnavailable(f"Redis: {type(error).__name__}") from None
        return ControlRecord(int(generation or 0),
                             {k.decode(): json.loads(v) for k, v in models.items()})

    async def update(self, name: str, loaded: bool, version: int | None) -> None:
        entry = json.dumps({"loaded": loaded, "version": version})
        try:
            pipeline = self.client.pipeline(transaction=True)
            pipeline.incr(self.generation_key)
            pipeline.hset(self.models_key, name, entry)
            generation, _ = await pipeline.execute()
            await self.client.publish(self.channel, str(generation))
        except (RedisError, OSError) as error:
            raise ControlUnavailable(f"Redis: {type(error).__name__}") from None

    async def listen(self, on_change: Callable[[], Awaitable[None]]) -> None:
        """Calls ``on_change`` on every notice and after every (re)subscription; runs until
        cancelled, resubscribing with backoff while Redis is away."""
        backoff = 0.05
        while True:
            try:
                async with self.subscriber.pubsub() as pubsub:
                    await pubsub.subscribe(self.channel)
                    backoff = 0.05
                    await on_change()  # notices sent while away are lost: reconcile now
                    while True:
                        message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                           timeout=1.0)
                        if message is not None:
                            await on_change()
            except (RedisError, OSError):
                await asyncio.sleep(backoff)
                backoff = min(RESUBSCRIBE_MAX_S, backoff * 2)

    async def close(self) -> None:
        await self.client.aclose()
        await self.subscriber.aclose()
