"""Running the app under uvicorn, with one or several worker processes.

Workers are separate processes that each call ``create_app()``; they get the settings through
the environment (``CTRSERVE_*``), which this module fills from the command line's flags.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import uvicorn

from ctrserve.export.package import model_names

from .settings import MULTIPROCESS_DIR, ServiceSettings

APP = "ctrserve.service.app:create_app"


def export_to_environment(settings: ServiceSettings) -> None:
    for name, value in settings.model_dump().items():
        if isinstance(value, (list, dict)):
            text = json.dumps(value)
        elif isinstance(value, bool):
            text = "true" if value else "false"
        else:
            text = str(value)
        os.environ[f"CTRSERVE_{name.upper()}"] = text


def serve(settings: ServiceSettings) -> int:
    """Runs the service until it is stopped; refuses to start (ValueError) when the repository
    has no model to serve."""
    if not (settings.models or model_names(settings.repo)):
        raise ValueError(f"no model to serve: {settings.repo} holds no model package (expected "
                         "REPO/NAME/VERSION/ directories written by 'ctrserve export'; pass "
                         "--repo)")
    export_to_environment(settings)
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
                limit_concurrency=settings.max_concurrency or None)
    return 0

