"""Starting and stopping the servers that benchmarks and load tests measure.

Every server (the service, the parse-only app, nginx ``return 200`` or the Python null server
where nginx is absent, or any command given to ``ServerProcess``) runs on a free loopback port,
pinned to a core with ``taskset`` when asked, in its own process group; the wait until it is
ready is bounded, its CPU time and memory are those of its processes (the group and any
descendant that left it: some servers start workers in sessions of their own), and it is
stopped by process group id, then any descendant left over is killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Self, TextIO

HOST = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A loopback port that was free a moment ago (the kernel's pick)."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def pinned(command: list[str], cpu: int | None) -> list[str]:
    """``command`` run by ``taskset`` on core ``cpu`` (unchanged when ``cpu`` is None)."""
    if cpu is None:
        return command
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("taskset is not installed (util-linux): cannot pin a process")
    return [taskset, "-c", str(cpu), *command]


def server_pids(pgid: int) -> list[int]:
    """The live processes of a server that leads process group ``pgid``: the group's members
    and every descendant of them (by parent PID), whatever group it moved to."""
    parents: dict[int, int] = {}
    members = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        if int(fields[2]) == pgid:
            members.add(int(entry))
    found = set(members)
    grew = True
    while grew:
        children = {pid for pid, parent in parents.items() if parent in found} - found
        found |= children
        grew = bool(children)
    return sorted(found)


def proportional_bytes(pid: int) -> int:
    """Proportional set size of one process (``Pss`` in ``/proc/PID/smaps_rollup``: each page
    it maps counted as its share among the processes that map it; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime


def resident_bytes(pid: int) -> int:
    """Resident set size of one process (VmRSS; 0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def stop_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to ``process``'s group (it leads one: ``start_new_session``), SIGKILL after
    ``timeout`` seconds, and wait for it."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=timeout)


def kill_left_over(pids: list[int], timeout: float = 15) -> None:
    """SIGTERM to those of ``pids`` still alive (a server's descendants that left its process
    group, found before it was stopped), SIGKILL to any left after ``timeout`` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [pid for pid in pids if _alive(pid)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [pid for pid in alive if _alive(pid)]
        if not alive:
            return


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class ServerProcess:
    """A command serving HTTP on ``self.port``, its output in ``log_path``; a context manager
    (started and ready inside, stopped on the way out)."""

    kind = "server"
    ready_path = "/"

    def __init__(self, command: list[str], cpu: int | None = None,
                 env: dict[str, str] | None = None, log_dir: str | Path | None = None,
                 port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://{HOST}:{self.port}"
        log_dir = Path(log_dir or tempfile.gettempdir())
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{self.kind}-{self.port}.log"
        self.command = pinned(command, cpu)
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self._log: TextIO | None = None
        self.started = 0.0

    def start(self) -> None:
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT,
                                        env=self.env, start_new_session=True)

    def _running(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise RuntimeError(f"{self.kind} was not started")
        return self.process

    @property
    def pid(self) -> int:
        """The server's PID, which is also its process group's id."""
        return self._running().pid

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds from start until ``ready_path`` answered 200."""
        process = self._running()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited ({process.returncode}):\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + self.ready_path, timeout=2) as answer:
                    if answer.status == 200:
                        return time.monotonic() - self.started
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.05)
        raise TimeoutError(f"{self.kind} was not ready within {timeout} s:\n{self.log()}")

    def cpu_seconds(self) -> float:
        """CPU seconds of the server's live processes so far."""
        return sum(cpu_seconds(pid) for pid in server_pids(self.pid))

    def resident_bytes(self) -> int:
        """Resident memory of the server's processes now, summed."""
        return sum(resident_bytes(pid) for pid in server_pids(self.pid))

    def log(self) -> str:
        """The last 5,000 characters the server wrote."""
        if self._log is not None:
            self._log.flush()
        return self.log_path.read_text()[-5000:] if self.log_path.is_file() else ""

    def stop(self) -> None:
        if self.process is not None:
            left_over = server_pids(self.process.pid) if self.process.poll() is None else []
            stop_group(self.process)
            kill_left_over(left_over)
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> Self:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


class ServiceServer(ServerProcess):
    """``ctrserve serve`` with one model version; by default with one worker and one ONNX
    Runtime thread (the benchmarks' protocol: the server pinned to one core), with
    ``defaults=True`` at the service's own defaults (its workers, threads and log level)."""

    kind = "service"
    ready_path = "/v2/health/ready"

    def __init__(self, package: str | Path, flags: list[str] | tuple[str, ...] = (),
                 cpu: int | None = None, log_dir: str | Path | None = None,
                 threads: int = 1, defaults: bool = False) -> None:
        package = Path(package).resolve()
        port = free_port()
        protocol = [] if defaults else ["--workers", "1", "--intra-op-threads", str(threads),
                                        "--log-level", "warning"]
        command = [sys.executable, "-m", "ctrserve", "serve", "--repo", str(package.parents[1]),
                   "--models", package.parent.name, "--host", HOST, "--port", str(port),
                   *protocol, *flags]
        env = {"CTRSERVE_VERSIONS": f'{{"{package.parent.name}": {int(package.name)}}}'}
        super().__init__(command, cpu, env, log_dir, port)
        self.model = package.parent.name


class ParseOnlyServer(ServerProcess):
    """``loadtest/parse_only.py``: the same routes, parsing only."""

    kind = "parse-only"
    ready_path = "/v2/health/ready"

    def __init__(self, package: str | Path, cpu: int | None = None,
                 log_dir: str | Path | None = None) -> None:
        port = free_port()
        command = [sys.executable, "-m", "ctrserve.loadtest.parse_only", "--package",
                   str(Path(package).resolve()), "--host", HOST, "--port", str(port)]
        super().__init__(command, cpu, None, log_dir, port)


class NullServer(ServerProcess):
    """The Python null server (``loadtest/null_server.py``)."""

    kind = "null-server"

    def __init__(self, cpu: int | None = None, log_dir: str | Path | None = None) -> None:
        port = free_port()
        command = [sys.executable, "-m", "ctrserve.loadtest.null_server", "--host", HOST,
                   "--port", str(port)]
        super().__init__(command, cpu, None, log_dir, port)


NGINX_CONFIG = """worker_processes 1;
daemon off;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {root}/body;
    proxy_temp_path {root}/proxy;
    fastcgi_temp_path {root}/fastcgi;
    uwsgi_temp_path {root}/uwsgi;
    scgi_temp_path {root}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    client_max_body_size 64m;
    server {{
        listen {host}:{port} backlog=4096;
        location / {{ return 200 '{{}}'; }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None)


class NginxServer(ServerProcess):
    """nginx, one worker process, answering ``200 {}`` to every request (``return 200``)."""

    kind = "nginx"

    def __init__(self, cpu: int | None = None, log_dir: str | Path | None = None) -> None:
        binary = nginx_binary()
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install -y nginx)")
        port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="ctrserve-nginx-"))
        config = self.root / "nginx.conf"
        config.write_text(NGINX_CONFIG.format(root=self.root, host=HOST, port=port))
        command = [binary, "-c", str(config), "-p", str(self.root), "-e", str(self.root /
                                                                          "error.log")]
        super().__init__(command, cpu, None, log_dir, port)

    def stop(self) -> None:
        super().stop()
        shutil.rmtree(self.root, ignore_errors=True)


def no_work_server(cpu: int | None = None, log_dir: str | Path | None = None) -> ServerProcess:
    """nginx where installed, else the Python null server."""
    if nginx_binary() is not None:
        return NginxServer(cpu, log_dir)
    return NullServer(cpu, log_dir)
