"""The ``bench`` extra (``pip install 'ctrserve[bench]'``): a benchmark checks that its modules
import before it imports any of them, so that a base install gets one line naming what to install
instead of a traceback.

``ctrserve bench serve`` needs aiohttp (the generator's second client, imported by ``load.py``)
and matplotlib (the report's plots); ``ctrserve bench peers`` needs aiohttp only. The extra's
other two parts are not Python modules this package imports: locust runs ``locustfile.py`` as
its own program, and py-spy is a program the profiles skip when it is absent.
"""

from __future__ import annotations

import importlib

SERVE_MODULES = ("aiohttp", "matplotlib")
PEERS_MODULES = ("aiohttp",)
INSTALL = "pip install 'ctrserve[bench]'"


def missing_modules(modules: tuple[str, ...]) -> str | None:
    """One line naming those of ``modules`` that do not import and the command that installs
    them; None when all of them import."""
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if not missing:
        return None
    return f"{' and '.join(missing)} not installed (the bench extra): {INSTALL}"
