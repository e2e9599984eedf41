"""The control record: which models every worker should serve, shared through the repository.

Each uvicorn worker holds its own sessions, so a load or unload that reaches one worker is
written to ``REPO/.ctrserve/control.json`` and every worker follows it (checking it every
``control_interval_s``). The record maps a model name to ``{"loaded": bool, "version": N}``
(the version the handling worker resolved, so that all workers load the same one; ``null``
means "the highest on disk") and carries a generation that grows with each change. It persists:
a restarted service serves what the record says for the models it names, and deleting the file
resets to the configured models.

Writers take an exclusive ``flock`` on ``control.lock`` and replace the file atomically, so
readers never see half a record.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

CONTROL_DIR = ".ctrserve"


@dataclass
class ControlRecord:
    generation: int = 0
    models: dict[str, dict] = field(default_factory=dict)


class ControlFile:
    def __init__(self, repo: Path) -> None:
        self.directory = Path(repo) / CONTROL_DIR
        self.path = self.directory / "control.json"
        self.lock_path = self.directory / "control.lock"

    def read(self) -> ControlRecord:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return ControlRecord()
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{self.path}: unreadable control record ({error})") from None
        return ControlRecord(int(data.get("generation", 0)), dict(data.get("models", {})))

    def update(self, name: str, loaded: bool, version: int | None) -> ControlRecord:
        """Records the model's wanted state; returns the new record."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            record = self.read()
            record.generation += 1
            record.models[name] = {"loaded": loaded, "version": version}
            staging = self.path.with_suffix(f".{os.getpid()}.tmp")
            staging.write_text(json.dumps(
                {"generation": record.generation, "models": record.models}, indent=2) + "\n")
            os.replace(staging, self.path)
            return record
