"""The data plane: what every protocol (the friendly JSON API, the Open Inference Protocol v2,
ranking) asks of the model repository, with one error policy.

Routes decode a request with their protocol's codec, ask ``model()`` for the served version,
score through ``score()`` and encode the answer; they hold no rules of their own. The policy,
the same on every route (``docs/architecture.md`` has it as a table):

- a name the repository does not have (never on disk, never loaded here): 404;
- a version that is not the one served, or not a positive integer: 404;
- a model the repository has but does not serve now (unloaded, failed to load, being
  swapped out): 503 with ``Retry-After``;
- the served version's queue is full: 503 with ``Retry-After``; no result in time: 504.
"""

from __future__ import annotations

import logging

import numpy as np

from .errors import NotFound, Unavailable
from .feature_store import FeatureStore
from .features import Features
from .repository import ModelRepository, ModelState, ServedModel
from .settings import ServiceSettings

log = logging.getLogger("ctrserve.dataplane")


def version_number(value: object) -> int:
    """A version given as an integer or as its decimal text (Triton sends strings); ValueError
    for anything else, zero and negatives included."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"version must be a positive integer, got {value!r}")
    if isinstance(value, str):
        if not (value.isascii() and value.isdigit()):
            raise ValueError(f"version must be a positive integer, got {value!r}")
        value = int(value)
    if value < 1:
        raise ValueError(f"version must be a positive integer, got {value}")
    return value


class DataPlane:
    def __init__(self, repository: ModelRepository, store: FeatureStore,
                 settings: ServiceSettings) -> None:
        self.repository = repository
        self.store = store
        self.settings = settings
        #: The last readiness answered: None (ready), a reason, or "" before the first probe.
        self._readiness: str | None = ""

    def model(self, name: str, version: str | None = None) -> ServedModel:
        """The served version of ``name`` (which must be ``version`` when one is given), or the
        policy's error."""
        served = self.repository.served_model(name)
        if served is None:
            if not (self.repository.known(name) or self.repository.on_disk(name)):
                raise NotFound(f"unknown model {name!r}")
            reason = self.repository.state(name).reason
            raise Unavailable(f"model {name!r} is not loaded" + (f": {reason}" if reason else ""))
        if version is not None:
            try:
                number = version_number(version)
            except ValueError:
                raise NotFound(f"model {name!r} has no version {version!r}") from None
            if number != served.version:
                raise NotFound(f"model {name!r} version {number} is not served (serving "
                               f"version {served.version})")
        return served

    @staticmethod
    async def score(served: ServedModel, features: Features) -> np.ndarray:
        """Probabilities (float32, one per row) from the served version's batcher.

        Call it right after ``model()``, with no ``await`` in between: a hot swap then cannot
        close the batcher between choosing the version and queueing on it."""
        return await served.batcher.score(features)

    async def not_ready(self) -> str | None:
        """Why the server is not ready to score (None when it is): at least one model served,
        every model it is expected to serve served (the named ones, else every model of the
        repository, less those unloaded and plus those loaded through the repository routes:
        ``ModelRepository.expected``), and the feature store answering when it is required.
        A change of readiness or of its reason is logged once, not at every probe."""
        reason = await self._why_not_ready()
        if reason != self._readiness:
            if reason is None:
                log.info("ready: serving %s", ", ".join(
                    f"{name} version {served.version}"
                    for name, served in sorted(self.repository.served().items())))
            else:
                log.warning("not ready: %s", reason)
            self._readiness = reason
        return reason

    async def _why_not_ready(self) -> str | None:
        served = self.repository.served()
        if not served:
            return f"no model is served from {self.repository.root}"
        missing = [name for name in self.repository.expected() if name not in served]
        if missing:
            return "models not loaded: " + "; ".join(
                f"{name} ({self.repository.state(name).reason or 'not loaded yet'})"
                for name in missing)
        if self.settings.redis_required and not await self.store.ping():
            return "the feature store (Redis) does not answer"
        return None

    async def load(self, name: str, version: int | None) -> tuple[ServedModel, bool]:
        """Serves ``version`` (default: pinned or highest) here and records it for every worker;
        returns the served model and whether the record was written."""
        return await self.repository.request_load(name, version)

    async def unload(self, name: str) -> bool:
        return await self.repository.request_unload(name)

    def index(self) -> list[dict]:
        return self.repository.index()

    def state(self, name: str) -> ModelState:
        return self.repository.state(name)
