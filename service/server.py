"""Running the app under uvicorn, with one or several worker processes.

Workers are separate processes that each call ``create_app()``; they get the settings through
the environment (``CTRSERVE_*``), which this module fills from the command line's flags.
"""

from __future__ import annotations

import json
import os

import uvicorn

from .settings import ServiceSettings

APP = "ctrserve.service.app:create_app"


def settings_from(flags: dict) -> ServiceSettings:
    """Settings from command-line flags over the environment over the defaults."""
    return ServiceSettings(**flags)


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
    export_to_environment(settings)
    uvicorn.run(APP, factory=True, host=settings.host, port=settings.port,
                workers=settings.workers, log_level=settings.log_level)
    return 0
