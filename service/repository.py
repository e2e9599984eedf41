"""The models this worker serves: loading, hot swap, unloading, and following the control record.

A model serves one version at a time: the one pinned (settings or an explicit load), else the
highest on disk. A new version is loaded and warmed up off the event loop while the old one keeps
serving; then requests switch to the new one and the old one drains its queue and running batch
before it is released. A version that fails to load leaves the previous one serving and its
reason is reported (log, repository index, model metadata).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ctrserve.export.package import PackageError, load_package, versions

from .batcher import Batcher, BatchingConfig
from .control import CONTROL_DIR, ControlFile
from .errors import BadRequest, NotFound
from .runtime import ModelLoadError, ModelRuntime, cpu_threads, load_runtime
from .settings import ServiceSettings

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
        self.root = Path(settings.repo)
        self.control = ControlFile(self.root)
        self._served: dict[str, ServedModel] = {}
        self._states: dict[str, ModelState] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="load")
        self._control_generation = 0
        #: The last version of each model that failed to load: polling does not retry it.
        self._failed: dict[str, int] = {}
        self._batching = BatchingConfig(
            enabled=settings.batching, max_batch_rows=settings.max_batch_rows,
            max_queue_delay_us=settings.max_queue_delay_us,
            max_queue_rows=settings.max_queue_rows, timeout_ms=settings.request_timeout_ms,
        )
        self._threads = cpu_threads(settings.workers, settings.intra_op_threads)

    # -- what is there ------------------------------------------------------------------------

    def names_on_disk(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            child.name for child in self.root.iterdir()
            if child.is_dir() and child.name != CONTROL_DIR and not child.name.startswith(".")
            and versions(child)
        )

    def get(self, name: str, version: int | None = None) -> ServedModel:
        served = self._served.get(name)
        if served is None:
            state = self._states.get(name)
            if state is None and name not in self.names_on_disk():
                raise NotFound(f"unknown model {name!r}")
            reason = f": {state.reason}" if state and state.reason else ""
            raise NotFound(f"model {name!r} is not loaded{reason}")
        if version is not None and version != served.version:
            raise NotFound(f"model {name!r} version {version} is not loaded (serving version "
                           f"{served.version})")
        return served

    def served(self) -> dict[str, ServedModel]:
        return dict(self._served)

    def state(self, name: str) -> ModelState:
        return self._states.get(name) or ModelState(name)

    def index(self) -> list[dict]:
        names = sorted(set(self.names_on_disk()) | set(self._states))
        rows = []
        for name in names:
            state = self.state(name)
            rows.append({"name": name, "version": str(state.version or ""), "state": state.state,
                         "reason": state.reason,
                         "versions_on_disk": versions(self.root / name)})
        return rows

    # -- changing what is served --------------------------------------------------------------

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _wanted_version(self, name: str, version: int | None) -> int:
        on_disk = versions(self.root / name)
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
            directory = self.root / name / str(version)
            loop = asyncio.get_running_loop()
            try:
                runtime = await loop.run_in_executor(self._loader, self._open, directory)
            except (PackageError, ModelLoadError) as error:
                self._failed[name] = version
                state.reason = f"version {version} failed to load: {error}"
                log.error("model %s: %s", name, state.reason)
                raise BadRequest(f"model {name!r} {state.reason}") from None
            served = ServedModel(runtime, Batcher(runtime, self._batching))
            self._served[name] = served
            state.state, state.version, state.reason = "READY", version, ""
            if current is not None:
                log.info("model %s: version %d takes over from %d", name, version,
                         current.version)
                await current.batcher.close()
            return served

    def _open(self, directory: Path) -> ModelRuntime:
        return load_runtime(load_package(directory), self.settings.provider, self._threads)

    async def unload(self, name: str) -> None:
        async with self._lock(name):
            served = self._served.pop(name, None)
            if served is None and name not in self.names_on_disk() and name not in self._states:
                raise NotFound(f"unknown model {name!r}")
            state = self._states.setdefault(name, ModelState(name))
            state.state, state.version, state.reason = "UNAVAILABLE", None, "unloaded"
            if served is not None:
                await served.batcher.close()
                log.info("model %s: version %d unloaded", name, served.version)

    # -- the API's load/unload: this worker, then the record every worker follows ------------

    async def request_load(self, name: str, version: int | None) -> ServedModel:
        served = await self.load(name, version)
        pinned = version is not None or name in self.settings.versions
        self.control.update(name, True, served.version if pinned else None)
        return served

    async def request_unload(self, name: str) -> None:
        await self.unload(name)
        self.control.update(name, False, None)

    # -- start, follow, stop ------------------------------------------------------------------

    async def start(self) -> None:
        """Loads the configured models (all on disk when none are named), then applies the
        control record over them."""
        record = self.control.read()
        self._control_generation = record.generation
        names = self.settings.models or self.names_on_disk()
        for name in names:
            wanted = record.models.get(name, {"loaded": True, "version": None})
            if wanted["loaded"]:
                await self._try_load(name, wanted["version"])
        for name, wanted in record.models.items():
            if name not in names and wanted["loaded"]:
                await self._try_load(name, wanted["version"])

    async def _try_load(self, name: str, version: int | None) -> None:
        try:
            await self.load(name, version)
        except (BadRequest, NotFound) as error:
            self._states.setdefault(name, ModelState(name)).reason = error.message
            log.error("%s", error.message)

    async def follow_control(self) -> None:
        """Applies changes other workers recorded (one check)."""
        try:
            record = self.control.read()
        except ValueError as error:
            log.error("%s", error)
            return
        if record.generation <= self._control_generation:
            return
        self._control_generation = record.generation
        for name, wanted in record.models.items():
            served = self._served.get(name)
            if not wanted["loaded"]:
                if served is not None:
                    await self.unload(name)
            elif served is None or (wanted["version"] or self._latest(name)) != served.version:
                await self._try_load(name, wanted["version"])

    async def poll_new_versions(self) -> None:
        """Loads a higher version of each served model whose version is not pinned (one scan)."""
        record = self.control.read()
        for name, served in list(self._served.items()):
            pinned = (record.models.get(name, {}).get("version") is not None
                      or name in self.settings.versions)
            latest = self._latest(name)
            if (not pinned and latest is not None and latest > served.version
                    and self._failed.get(name) != latest):
                await self._try_load(name, None)

    def _latest(self, name: str) -> int | None:
        on_disk = versions(self.root / name)
        return on_disk[-1] if on_disk else None

    async def stop(self) -> None:
        for name in list(self._served):
            await self.unload(name)
        self._loader.shutdown(wait=False)
