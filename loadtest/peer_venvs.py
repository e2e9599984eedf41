"""Virtual environments of the peer servers (``bench peers``), one per peer, each with pinned
versions, created on demand under a cache directory and reused while their pins stay the same.

A peer never runs in the project's own environment by default: MLServer and BentoML pin
versions of FastAPI, uvicorn and numpy of their own, and the naive endpoint is measured as a
user would install it. ``--peer-python naive=PATH`` runs a peer with another interpreter that
has its packages (the smoke test runs the naive endpoint in the project's environment, which
has FastAPI, uvicorn and ONNX Runtime, so that it needs no package index).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ONNX_RUNTIME = ("onnxruntime==1.31.1", "numpy==2.4.6")
#: Each peer's packages. uvloop 0.23 breaks MLServer's workers; BentoML 1.4.40 needs a certifi
#: newer than the package index had when these were chosen.
PINS: dict[str, tuple[str, ...]] = {
    "naive": ("fastapi==0.163.2", "uvicorn[standard]==0.54.0", "orjson==3.13.0",
              *ONNX_RUNTIME),
    "mlserver": ("mlserver==1.7.1", "pandas==2.3.3", "uvloop==0.21.0", *ONNX_RUNTIME),
    "bentoml": ("bentoml==1.4.39", "orjson==3.13.0", *ONNX_RUNTIME),
}
#: The file in a venv that records the pins it was built with.
PINS_FILE = "ctrserve-peer-pins.txt"
INSTALL_TIMEOUT_S = 1800


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/ctrserve/peer-venvs`` (``~/.cache`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ctrserve" / "peer-venvs"


def peer_python(peer: str, cache: Path, log=print) -> Path:
    """The interpreter of ``peer``'s venv under ``cache``, created (or created again, when its
    pins changed) first: ``python -m venv`` with this interpreter, then ``pip install``."""
    directory = cache / peer
    python = directory / "bin" / "python"
    wanted = "\n".join(PINS[peer]) + "\n"
    pins_file = directory / PINS_FILE
    if python.is_file() and pins_file.is_file() and pins_file.read_text() == wanted:
        return python
    log(f"creating the {peer} venv in {directory} ({' '.join(PINS[peer])})")
    shutil.rmtree(directory, ignore_errors=True)
    directory.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(directory)], check=True, timeout=300)
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--no-cache-dir",
                           *PINS[peer]], capture_output=True, text=True,
                          timeout=INSTALL_TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"pip could not install the {peer} venv's packages:\n"
                           f"{done.stdout[-2000:]}{done.stderr[-3000:]}")
    pins_file.write_text(wanted)
    return python


def versions(python: Path | str) -> dict[str, str]:
    """The versions of the packages that matter here in the environment of ``python``."""
    names = ("fastapi", "uvicorn", "starlette", "mlserver", "bentoml", "onnxruntime",
             "onnxruntime-gpu", "numpy", "orjson", "uvloop")
    done = subprocess.run([str(python), "-m", "pip", "list", "--format=freeze"],
                          capture_output=True, text=True, timeout=120)
    found = {}
    for line in done.stdout.splitlines():
        name, _, version = line.partition("==")
        if name.lower() in names:
            found[name.lower()] = version
    return found
