"""Running the app under uvicorn, with one or several worker processes.

Workers are separate processes that each call ``create_app()``; they get the settings through
the environment (``CTRSERVE_*``), which this module fills from the command line's flags. By
default there is one worker per CPU the process may use (``settings.py``).

Several workers listen on sockets of their own, bound to the one address in an ``SO_REUSEPORT``
group, so the kernel spreads new connections over them evenly (by a hash of each connection's
addresses). uvicorn's own supervisor shares one listening socket among its workers, and the
worker that is awake anyway accepts nearly every connection: 64 keep-alive clients stayed on
one of two workers. ``Workers`` is the supervisor for this: it starts each worker on its socket,
starts a worker that dies again on the same socket, and stops them all on SIGTERM or SIGINT.

Connections cannot exhaust the server: the soft open-file limit is raised to the hard one, and
uvicorn speaks HTTP through ``TimedHeadersProtocol``, which closes a connection that does not
deliver a complete request head in time (uvicorn itself times a connection only between a
response and the next byte).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import multiprocessing
import os
import resource
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from multiprocessing.process import BaseProcess
from pathlib import Path

import uvicorn
from uvicorn.config import STARTUP_FAILURE
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ctrserve.export.package import models_on_disk

from .cuda import cuda_unavailable_reason
from .settings import LOG_FORMAT, MULTIPROCESS_DIR, ServiceSettings

APP = "ctrserve.service.app:create_app"
#: How often a start that waits for a model package looks for one.
WAIT_SCAN_S = 1.0
#: How often the supervisor of several workers looks for one that died.
SUPERVISE_INTERVAL_S = 0.5
#: How long stopping waits for the workers' graceful shutdown before it kills them.
STOP_TIMEOUT_S = 30.0

log = logging.getLogger("ctrserve.service")


@functools.cache
def _header_timeout_s() -> float:
    """This worker's header timeout, read once from the environment ``serve`` filled: uvicorn
    builds the protocol itself, so it cannot be handed one."""
    return ServiceSettings().header_timeout_s


class TimedHeadersProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on each request head.

    A connection must deliver a complete head within ``header_timeout_s`` of connecting, and
    within ``keepalive_timeout_s + header_timeout_s`` of its previous response (it may idle up
    to the keep-alive timeout, which uvicorn enforces from the response to the next byte, and
    then has the head's own time). So a client that connects and sends nothing, sends part of a
    head, or sends bytes that begin no request (CR LF) to dodge the keep-alive timer is closed,
    without an answer. Once the head is complete, the body has ``body_timeout_s``
    (``BodyLimitMiddleware``).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = _header_timeout_s()
        self.head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._expect_head(self.header_timeout_s)

    def on_headers_complete(self) -> None:
        self._cancel_head_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # the next request's head is already complete
        super().on_response_complete()
        if not pipelined and not self.transport.is_closing():
            self._expect_head(self.timeout_keep_alive + self.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_deadline()
        super().connection_lost(exc)

    def _expect_head(self, seconds: float) -> None:
        self._cancel_head_deadline()
        self.head_deadline = self.loop.call_later(seconds, self._head_late)

    def _cancel_head_deadline(self) -> None:
        if self.head_deadline is not None:
            self.head_deadline.cancel()
            self.head_deadline = None

    def _head_late(self) -> None:
        self.head_deadline = None
        if not self.transport.is_closing():
            self.transport.close()


def raise_open_file_limit() -> str:
    """Raises the soft limit on open files (``RLIMIT_NOFILE``) to the hard limit, and says what
    it did. Every connection holds a file descriptor: at a soft limit of a few hundred (a
    common default) a few hundred idle clients would make every other connection fail."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard:
        return f"open files (RLIMIT_NOFILE): {soft}, the hard limit"
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as error:
        return f"open files (RLIMIT_NOFILE): {soft} kept; raising it to {hard} failed: {error}"
    return f"open files (RLIMIT_NOFILE): raised from {soft} to {hard}"


def export_to_environment(settings: ServiceSettings) -> None:
    for name, value in settings.model_dump().items():
        if isinstance(value, (list, dict)):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        os.environ[f"CTRSERVE_{name.upper()}"] = text


def packaged_models(settings: ServiceSettings) -> Callable[[], list[str]]:
    """A look at the models to serve that have a package: in the repository's directory, or for
    an s3:// repository in its local cache once what is new in the bucket is fetched
    (``object_store.py``, imported only then: boto3 comes with the s3 extra)."""
    if not settings.repo_in_object_store:
        return lambda: models_on_disk(settings.repo, settings.models)
    from .object_store import ObjectStoreRepository

    store = ObjectStoreRepository.from_settings(settings)

    def fetched() -> list[str]:
        store.fetch()
        return models_on_disk(store.local_root, settings.models)

    return fetched


def wait_for_packages(settings: ServiceSettings, packaged: Callable[[], list[str]]) -> None:
    """Looks for a package of a model to serve every ``WAIT_SCAN_S`` until one is there or
    ``wait_for_models_s`` has passed: a volume filled (or a bucket written) after the server
    starts."""
    deadline = time.monotonic() + settings.wait_for_models_s
    while not packaged() and (left := deadline - time.monotonic()) > 0:
        time.sleep(min(WAIT_SCAN_S, left))


def serve(settings: ServiceSettings) -> int:
    """Runs the service until it is stopped; refuses to start (ValueError) when the repository
    has no package of a model to serve, after waiting up to ``wait_for_models_s`` for one, or
    when CUDA is asked for and cannot run here."""
    if settings.provider == "cuda" and (reason := cuda_unavailable_reason()):
        raise ValueError(f"provider 'cuda' asked for, but {reason}")
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
    packaged = packaged_models(settings)
    if not packaged() and settings.wait_for_models_s > 0:
        print(f"no model package in {settings.repo} yet: waiting up to "
              f"{settings.wait_for_models_s:g} s for one", file=sys.stderr, flush=True)
        wait_for_packages(settings, packaged)
    if not packaged():
        waited = (f" after waiting {settings.wait_for_models_s:g} s"
                  if settings.wait_for_models_s > 0 else "")
        wanted = f" of {', '.join(settings.models)}" if settings.models else ""
        raise ValueError(f"no model to serve: {settings.repo} holds no model package{wanted}"
                         f"{waited} (expected REPO/NAME/VERSION/ directories written by "
                         "'ctrserve export'; pass --repo)")
    export_to_environment(settings)
    log.info(raise_open_file_limit())  # once: the workers inherit the limit
    if settings.workers > 1:
        # Every worker writes its metric samples here; /metrics merges them. Set before any
        # worker imports prometheus_client (it reads the variable at import); a previous
        # run's files would carry its counters over, so they go.
        directory = Path(os.environ.get(MULTIPROCESS_DIR) or tempfile.mkdtemp(
            prefix="ctrserve-metrics-"))
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink()
        os.environ[MULTIPROCESS_DIR] = str(directory)
    config = uvicorn.Config(APP, factory=True, host=settings.host, port=settings.port,
                            workers=settings.workers, log_level=settings.log_level,
                            access_log=settings.access_log, http=TimedHeadersProtocol,
                            timeout_keep_alive=settings.keepalive_timeout_s)
    if settings.workers == 1:
        server = uvicorn.Server(config)
        server.run()
        return 0 if server.started else STARTUP_FAILURE
    sockets = reuse_port_sockets(settings.host, settings.port, settings.workers, config.backlog)
    log.info("%d workers on http://%s:%d, a listening socket each (SO_REUSEPORT)",
             settings.workers, settings.host, sockets[0].getsockname()[1])
    return Workers(config, sockets).run()


def reuse_port_sockets(host: str, port: int, count: int, backlog: int) -> list[socket.socket]:
    """``count`` listening sockets on one address, in one ``SO_REUSEPORT`` group (port 0: the
    kernel's pick for the first, the same for the others). They listen from the start, before
    any worker is ready, so connections are spread over all of them from the first one on: a
    connection waits in its socket's queue until that socket's worker accepts it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            listener = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            listener.bind((host, port))
            port = listener.getsockname()[1]
            listener.listen(backlog)
            listener.set_inheritable(True)
    except OSError:
        for listener in sockets:
            listener.close()
        raise
    return sockets


def _run_worker(config: uvicorn.Config, listener: socket.socket) -> None:
    """A worker process: uvicorn's server on its own listening socket."""
    config.configure_logging()
    uvicorn.Server(config).run(sockets=[listener])


class Workers:
    """Worker processes (spawned, as uvicorn spawns its own), one per listening socket.

    A worker that exits while the server runs is started again on its socket (the connections
    the kernel hands that socket meanwhile wait in its queue); one that fails at startup (no
    model to serve: uvicorn's exit status 3) stops the server, since every new one would fail
    alike. SIGTERM or SIGINT stops the workers (each finishes its requests: uvicorn's graceful
    shutdown) and then the server.
    """

    def __init__(self, config: uvicorn.Config, sockets: list[socket.socket]) -> None:
        self.config = config
        self.sockets = sockets
        self.stopping = threading.Event()

    def _start(self, listener: socket.socket) -> BaseProcess:
        process = multiprocessing.get_context("spawn").Process(
            target=_run_worker, args=(self.config, listener), name="ctrserve-worker")
        process.start()
        return process

    def run(self) -> int:
        """Runs the workers until a signal stops them; 0, or 1 when a worker failed to start."""
        for number in (signal.SIGINT, signal.SIGTERM):
            signal.signal(number, lambda *_: self.stopping.set())
        processes = [self._start(listener) for listener in self.sockets]
        failed = False
        try:
            while not self.stopping.wait(SUPERVISE_INTERVAL_S):
                for index, process in enumerate(processes):
                    if process.is_alive():
                        continue
                    if process.exitcode == STARTUP_FAILURE:
                        log.error("worker %d failed to start: stopping", process.pid)
                        failed = True
                        self.stopping.set()
                        break
                    log.warning("worker %d exited (%s): starting another", process.pid,
                                process.exitcode)
                    processes[index] = self._start(self.sockets[index])
        finally:
            self._stop(processes)
        return 1 if failed else 0

    @staticmethod
    def _stop(processes: list[BaseProcess]) -> None:
        for process in processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()

