"""The models this worker serves: loading, hot swap, unloading, and following the control record.

A model serves one version at a time: the one pinned (settings or an explicit load), else the
highest on disk. A new version is loaded and warmed up off the event loop while the old one keeps
serving; then requests switch to the new one and the old one drains its queue and running batch
before it is released. A version that fails to load leaves the previous one serving and its
reason is reported (log, repository index, model metadata); scans (polling, the control record)
do not try it again until its files change.

The models a worker must serve to be ready (``expected()``) are the configured ones (the named
models, else every model of the repository), plus those explicitly loaded and less those
explicitly unloaded through the repository routes, as the control record says.

An s3:// repository is served from its local cache (``object_store.py``): the start and every
scan first fetch what is new in the bucket; a version that fails to fetch (a download that
fails, a file whose sha256 disagrees with the manifest) never reaches the cache, and is reported
as one that fails to load is (log, repository index, load-failure counter).
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ctrserve.export.package import (
    PackageError,
    files_fingerprint,
    load_version,
    model_names,
    model_versions,
    valid_model_name,
    version_directory,
)

from . import metrics
from .batcher import Batcher, BatchingConfig
from .control import ControlFile, ControlRecord, ControlUnavailable, RedisControl
from .cuda import CudaOptions, worker_options
from .errors import BadRequest, NotFound
from .runtime import ModelLoadError, ModelRuntime, cpu_threads, load_runtime
from .settings import ServiceSettings

if TYPE_CHECKING:
    from .object_store import FetchFailure, ObjectStoreRepository

log = logging.getLogger("ctrserve.repository")

@dataclass
class ServedModel:
    runtime: ModelRuntime
    batcher: Batcher

    @property
    def version(self) -> int:
        return self.runtime.version


@dataclass
class ModelState:
    """What the index reports for a model: READY (serving ``version``) or UNAVAILABLE."""

    name: str
    state: str = "UNAVAILABLE"
    version: int | None = None
    reason: str = ""


class ModelRepository:
    def __init__(self, settings: ServiceSettings) -> None:
        self.settings = settings
        #: The bucket of an s3:// repository, whose packages are fetched into ``root``.
        self.store = _object_store(settings)
        self.root = self.store.local_root if self.store else Path(settings.repo)
        self.control = (RedisControl(settings.redis_url, settings.redis_namespace,
                                     settings.redis_timeout_ms)
                        if settings.redis_url else ControlFile(self.root))
        #: Changes applied here whose recording failed (Redis away): written when it is back.
        self._pending: dict[str, tuple[bool, int | None]] = {}
        self._served: dict[str, ServedModel] = {}
        self._states: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._control_generation = 0
        #: Explicit loads (True) and unloads (False) by model: the control record's, and this
        #: worker's own from the moment it makes them.
        self._decisions: dict[str, bool] = {}
        #: The version of each model that last failed to load, with its files' fingerprint:
        #: scans try it again only once the files differ.
        self._failed: dict[str, tuple[int, tuple]] = {}
        self._batching = BatchingConfig(
            enabled=settings.batching, max_batch_rows=settings.max_batch_rows,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_rows=settings.max_queue_rows, timeout_ms=settings.request_timeout_ms,
        )
        self._threads, source = cpu_threads(settings.workers, settings.intra_op_threads)
        log.info("ONNX Runtime sessions run %d intra-op thread(s): %s", self._threads, source)
        self._cuda = (CudaOptions() if settings.provider == "cpu" else
                      worker_options(settings.cuda_device_ids, settings.cuda_memory_limit_mb,
                                     settings.cuda_arena_strategy, settings.workers))

    # -- what is there ------------------------------------------------------------------------

    def names_on_disk(self) -> list[str]:
        return model_names(self.root)

    def on_disk(self, name: str) -> bool:
        """Whether ``name`` is a model of the repository (with at least one version)."""
        return name in self.names_on_disk()

    def served_model(self, name: str) -> ServedModel | None:
        """The version of ``name`` that takes requests now, if any."""
        return self._served.get(name)

    def known(self, name: str) -> bool:
        """Whether ``name`` is served or was ever loaded, unloaded or refused here."""
        return name in self._served or name in self._states

    def served(self) -> dict[str, ServedModel]:
        return dict(self._served)

    def state(self, name: str) -> ModelState:
        return self._states.get(name) or ModelState(name)

    def expected(self) -> list[str]:
        """The models this worker must serve to be ready: the configured ones (the named
        models, else every model of the repository) that were not explicitly unloaded, then
        the others that were explicitly loaded."""
        configured = self.settings.models or self.names_on_disk()
        kept = [name for name in configured if self._decisions.get(name, True)]
        added = sorted(name for name, loaded in self._decisions.items()
                       if loaded and name not in configured)
        return kept + added

    def index(self) -> list[dict]:
        names = sorted(set(self.names_on_disk()) | set(self._states))
        rows = []
        for name in names:
            state = self.state(name)
            rows.append({"name": name, "version": str(state.version or ""), "state": state.state,
                         "reason": state.reason,
                         "versions_on_disk": model_versions(self.root, name)})
        return rows

    # -- changing what is served --------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _model_directory(self, name: str) -> Path:
        """``REPO/name``, refusing names that could leave the repository (``..``, separators,
        a symlink pointing outside)."""
        if not valid_model_name(name):
            raise NotFound(f"invalid model name {name!r}")
        directory = self.root / name
        root = self.root.resolve()
        if directory.exists() and not directory.resolve().is_relative_to(root):
            raise NotFound(f"model {name!r} lies outside the repository")
        return directory

    def _wanted_version(self, name: str, version: int | None) -> int:
        self._model_directory(name)  # refuses a name that could leave the repository
        root = self.root.resolve()
        on_disk = [v for v in model_versions(self.root, name)
                   if version_directory(self.root, name, v).resolve().is_relative_to(root)]
        if not on_disk:
            raise NotFound(f"model {name!r} has no versions in {self.root}")
        version = version or self.settings.versions.get(name) or on_disk[-1]
        if version not in on_disk:
            raise NotFound(f"model {name!r} has no version {version} (on disk: {on_disk})")
        return version

    async def load(self, name: str, version: int | None = None) -> ServedModel:
        """Serves ``version`` (default: pinned or highest) of ``name``; a no-op if served."""
        async with self._lock(name):
            version = self._wanted_version(name, version)
            current = self._served.get(name)
            if current is not None and current.version == version:
                return current
            state = self._states.setdefault(name, ModelState(name))
            # Taken before loading: files replaced during the load count as a change.
            fingerprint = files_fingerprint(version_directory(self.root, name, version))
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            try:
                runtime = await loop.run_in_executor(self._loader, self._open, name, version)
            except (PackageError, ModelLoadError) as error:
                metrics.LOAD_FAILURES.labels(name).inc()
                self._failed[name] = (version, fingerprint)
                state.reason = f"version {version} failed to load: {error}"
                log.error("model %s: %s", name, state.reason)
                raise BadRequest(f"model {name!r} {state.reason}") from None
            self._failed.pop(name, None)
            served = ServedModel(runtime, Batcher(runtime, self._batching))
            self._served[name] = served
            state.state, state.version, state.reason = "READY", version, ""
            metrics.model_loaded(name, version, runtime.provider, runtime.package.manifest,
                                 time.perf_counter() - started)
            if current is not None:
                log.info("model %s: version %d takes over from %d", name, version,
                         current.version)
                await self._release(current)
            return served

    async def _release(self, served: ServedModel) -> None:
        """Drains a version that no longer takes requests, then forgets it."""
        await served.batcher.close()
        runtime = served.runtime
        metrics.model_released(runtime.name, runtime.version, runtime.provider,
                               runtime.package.manifest)

    def _open(self, name: str, version: int) -> ModelRuntime:
        return load_runtime(load_version(self.root, name, version), self.settings.provider,
                            self._threads, self._cuda)

    def _failed_unchanged(self, name: str, version: int) -> bool:
        """Whether ``version`` of ``name`` failed to load and its files are still the same."""
        failed = self._failed.get(name)
        return failed is not None and failed[0] == version and failed[1] == files_fingerprint(
            version_directory(self.root, name, version))

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            served = self._served.pop(name, None)
            if served is None and name not in self.names_on_disk() and name not in self._states:
                raise NotFound(f"unknown model {name!r}")
            state = self._states.setdefault(name, ModelState(name))
            state.state, state.version, state.reason = "UNAVAILABLE", None, "unloaded"
            if served is not None:
                await self._release(served)
                log.info("model %s: version %d unloaded", name, served.version)

    # -- the API's load/unload: this worker, then the record every worker follows ------------

    async def request_load(self, name: str, version: int | None) -> tuple[ServedModel, bool]:
        """Loads here, then records it for every worker; returns the served model and whether
        the record was written (False: Redis is away, it will be written when it is back)."""
        served = await self.load(name, version)
        self._decisions[name] = True
        pinned = version is not None or name in self.settings.versions
        return served, await self._record(name, True, served.version if pinned else None)

    async def request_unload(self, name: str) -> bool:
        if not (self.known(name) or self.on_disk(name)):
            raise NotFound(f"unknown model {name!r}")
        self._decisions[name] = False  # readiness stops expecting it before it goes
        await self.unload(name)
        return await self._record(name, False, None)

    def _follow_decisions(self, record: ControlRecord) -> None:
        """The record's explicit loads and unloads, with this worker's not yet recorded."""
        self._decisions = {name: bool(wanted["loaded"]) for name, wanted in record.models.items()}
        self._decisions.update({name: loaded for name, (loaded, _) in self._pending.items()})

    async def _record(self, name: str, loaded: bool, version: int | None) -> bool:
        """Records a change asked for through the repository routes; a change the record
        cannot take now is said once here and retried by ``follow_control``."""
        self._pending[name] = (loaded, version)
        unavailable = await self._flush_pending()
        if unavailable is not None:
            log.warning("model %s: cannot record the change yet (%s); it holds in this worker "
                        "and is retried", name, unavailable)
        return unavailable is None

    async def _flush_pending(self) -> ControlUnavailable | None:
        """Writes the pending changes; the reason the record refused one, else None."""
        for name, (loaded, version) in list(self._pending.items()):
            try:
                await self.control.update(name, loaded, version)
            except ControlUnavailable as error:
                return error
            if self._pending.get(name) == (loaded, version):
                del self._pending[name]
        return None

    # -- start, follow, stop ------------------------------------------------------------------

    async def start(self) -> list[str]:
        """Loads the configured models (all on disk when none are named), then applies the
        control record over them; returns the models the record keeps unloaded."""
        failed_fetches = await self.fetch()
        try:
            record = await self.control.read()
        except ControlUnavailable as error:
            log.error("control record unavailable at start (%s): serving the configured "
                      "models until it is back", error)
            record = ControlRecord()
        self._control_generation = record.generation
        self._follow_decisions(record)
        names = self.settings.models or self.names_on_disk()
        kept_unloaded = []
        for name in names:
            wanted = record.models.get(name, {"loaded": True, "version": None})
            if wanted["loaded"]:
                await self._try_load(name, wanted["version"])
            else:
                kept_unloaded.append(name)
                self._states[name] = ModelState(name, reason="unloaded")
        for name, wanted in record.models.items():
            if name not in names and wanted["loaded"]:
                await self._try_load(name, wanted["version"])
        self._report_failed_fetches(failed_fetches)
        return kept_unloaded

    async def _try_load(self, name: str, version: int | None) -> None:
        """Loads, or leaves the reason it could not in the model's state (and the log)."""
        try:
            await self.load(name, version)
        except BadRequest:
            pass  # the version failed to load: load() recorded and logged why
        except NotFound as error:
            self._states.setdefault(name, ModelState(name)).reason = error.message
            log.error("%s", error.message)

    async def follow_control(self) -> None:
        """Brings this worker to the recorded state (one check): writes its own pending
        changes first, then loads, swaps or unloads what differs from the record."""
        if self._pending and await self._flush_pending() is not None:
            return  # our change is not recorded yet: the record would undo it
        try:
            record = await self.control.read()
        except ControlUnavailable as error:
            log.debug("control record unavailable: %s", error)
            return
        self._control_generation = record.generation
        self._follow_decisions(record)
        for name, wanted in record.models.items():
            served = self._served.get(name)
            if not wanted["loaded"]:
                if served is not None:
                    await self.unload(name)
                continue
            version = self._target_version(name, wanted["version"])
            if version is None or self._failed_unchanged(name, version):
                continue  # nothing on disk, or that version failed here and is unchanged
            if served is None or version != served.version:
                await self._try_load(name, version)

    async def poll_new_versions(self) -> None:
        """One scan of the repository (an s3:// one's bucket fetched first): loads each expected
        model that is not served (one that appeared on disk after the start, say) and a higher
        version of each served one whose version is not pinned. A version that failed to load
        is not tried again until its files change."""
        failed_fetches = await self.fetch()
        try:
            recorded = (await self.control.read()).models
        except ControlUnavailable:
            recorded = {}
        for name in self.expected():
            version = self._target_version(name, recorded.get(name, {}).get("version"))
            if version is None or self._failed_unchanged(name, version):
                continue
            served = self._served.get(name)
            if served is None or version > served.version:
                await self._try_load(name, version)
        self._report_failed_fetches(failed_fetches)

    async def fetch(self) -> list[FetchFailure]:
        """Brings what is new in an s3:// repository's bucket into its cache (nothing to do for
        a directory); returns the versions that failed to fetch, which the caller reports once
        its loads are done (a load that succeeds clears its model's reason, and a version below
        the failed one may load in the same scan)."""
        if self.store is None:
            return []
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._loader, self.store.fetch)

    def _report_failed_fetches(self, failed_fetches: list[FetchFailure]) -> None:
        """A version that failed to fetch becomes its model's reason and counts as a failed
        load."""
        for failure in failed_fetches:
            if failure.name:
                metrics.LOAD_FAILURES.labels(failure.name).inc()
                self._states.setdefault(failure.name, ModelState(failure.name)).reason = (
                    failure.reason)

    def _target_version(self, name: str, recorded: int | None) -> int | None:
        """The version ``name`` should serve: the recorded pin, else the configured one, else
        the highest on disk (None when there is none)."""
        return recorded or self.settings.versions.get(name) or self._latest(name)

    def _latest(self, name: str) -> int | None:
        on_disk = model_versions(self.root, name)
        return on_disk[-1] if on_disk else None

    async def stop(self) -> None:
        for name in list(self._served):
            await self.unload(name)
        self._loader.shutdown(wait=False)
        await self.control.close()


def _object_store(settings: ServiceSettings) -> ObjectStoreRepository | None:
    """The bucket of an s3:// repository (None for a directory); imported only then, since
    boto3 comes with the s3 extra."""
    if not settings.repo_in_object_store:
        return None
    from .object_store import ObjectStoreRepository

    return ObjectStoreRepository.from_settings(settings)
