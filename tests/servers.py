"""Starting real servers for tests: free loopback ports, bounded waits, stopped by PID."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ctrserve.loadtest.servers import HOST, free_port, stop_group


class ServiceProcess:
    """``ctrserve serve`` in a subprocess on a free loopback port; a context manager."""

    def __init__(self, repo: Path | str, *flags: str, python_prefix: str = "",
                 env: dict[str, str] | None = None, ready_path: str = "/v2/health/ready",
                 log_dir: Path | None = None) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        # Beside the repository unless told (an s3:// repository has no folder here).
        self.log_path = (log_dir or Path(repo).parent) / f"server-{self.port}.log"
        # One worker unless a test asks for more (the default is one per CPU): a test that reads
        # the statistics of the worker that answers it then sees every request.
        workers = () if "--workers" in flags else ("--workers", "1")
        command = ["serve", "--repo", str(repo), "--host", HOST, "--port", str(self.port),
                   "--log-level", "warning", *workers, *flags]
        code = (f"{python_prefix}\nimport sys\nfrom ctrserve.cli import main\n"
                f"sys.exit(main({command!r}))")
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-c", code], stdout=self._log, stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})}, start_new_session=True,
        )
        self.ready_path = ready_path

    def wait_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"the server was not ready within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-5000:]

    def stop(self) -> None:
        stop_group(self.process, timeout=20)
        self._log.close()

    def __enter__(self) -> ServiceProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_) -> None:
        self.stop()


def wait_until(condition, what: str, timeout: float) -> None:
    """Polls ``condition()`` every 0.1 s until it holds; fails naming ``what`` after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def request_rows(rows_file: Path) -> list[dict]:
    """A file's rows as the scoring API takes them, labels dropped: missing values are sent as
    null in even rows and left out in odd ones."""
    import pyarrow.parquet as pq

    rows = []
    for index, record in enumerate(pq.read_table(rows_file).to_pylist()):
        record.pop("label", None)
        present = {k: v for k, v in record.items()
                   if v is not None and not (isinstance(v, float) and math.isnan(v))}
        rows.append(present if index % 2 else {k: present.get(k) for k in record})
    return rows


def scored_offline(checkpoint: Path, data_path: str, spec_path: str | None, rows: int,
                   scratch: Path) -> tuple[Path, list[float]]:
    """The first ``rows`` rows of the parquet file ``data_path`` written to ``scratch``, and
    ``ctrserve evaluate``'s probabilities for them in order: what a server of the checkpoint's
    package must answer."""
    import numpy as np
    import pyarrow.parquet as pq

    from ctrserve.models.data import DataConfig
    from ctrserve.models.evaluate import evaluate

    rows_file = scratch / "rows.parquet"
    pq.write_table(pq.read_table(data_path).slice(0, rows), rows_file)
    offline = DataConfig(path=data_path, format="parquet", spec_path=spec_path,
                         test_path=str(rows_file), fractions=(0.9, 0.1))
    evaluate(checkpoint, offline, "test", scratch / "probabilities.txt")
    return rows_file, np.loadtxt(scratch / "probabilities.txt").tolist()
