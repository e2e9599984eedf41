"""Running the app under uvicorn, with one or several worker processes.

Workers are separate processes that each call ``create_app()``; they get the settings through
the environment (``CTRSERVE_*``), which this module fills from the command line's flags.

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
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ctrserve.export.package import models_on_disk

from .settings import LOG_FORMAT, MULTIPROCESS_DIR, ServiceSettings

APP = "ctrserve.service.app:create_app"
#: How often a start that waits for a model package looks for one.
WAIT_SCAN_S = 1.0

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


def wait_for_packages(settings: ServiceSettings) -> None:
    """Looks for a package of a model to serve every ``WAIT_SCAN_S`` until one is there or
    ``wait_for_models_s`` has passed: a volume filled after the server starts."""
    deadline = time.monotonic() + settings.wait_for_models_s
    while (not models_on_disk(settings.repo, settings.models)
           and (left := deadline - time.monotonic()) > 0):
        time.sleep(min(WAIT_SCAN_S, left))


def serve(settings: ServiceSettings) -> int:
    """Runs the service until it is stopped; refuses to start (ValueError) when the repository
    has no package of a model to serve, after waiting up to ``wait_for_models_s`` for one."""
    if not models_on_disk(settings.repo, settings.models) and settings.wait_for_models_s > 0:
        print(f"no model package in {settings.repo} yet: waiting up to "
              f"{settings.wait_for_models_s:g} s for one", file=sys.stderr, flush=True)
        wait_for_packages(settings)
    if not models_on_disk(settings.repo, settings.models):
        waited = (f" after waiting {settings.wait_for_models_s:g} s"
                  if settings.wait_for_models_s > 0 else "")
        wanted = f" of {', '.join(settings.models)}" if settings.models else ""
        raise ValueError(f"no model to serve: {settings.repo} holds no model package{wanted}"
                         f"{waited} (expected REPO/NAME/VERSION/ directories written by "
                         "'ctrserve export'; pass --repo)")
    export_to_environment(settings)
    logging.basicConfig(level=settings.log_level.upper(), format=LOG_FORMAT)
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
    uvicorn.run(APP, factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level,
                http=TimedHeadersProtocol, timeout_keep_alive=settings.keepalive_timeout_s)
    return 0

