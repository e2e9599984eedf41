"""Options of ``ctrserve bench peers`` (``peers.py``). The ``ctrserve`` command builds its parser
from them also on an install without the bench extra, so this module imports the standard
library only (``peer_venvs`` does too)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .peer_venvs import PINS, default_cache

#: What the run measures, in this order: the in-process ceiling, the naive endpoint's /echo (the
#: framework's floor), the naive endpoint, MLServer, BentoML, the service.
TARGETS = ("ceiling", "echo", "naive", "mlserver", "bentoml", "service")


@dataclass
class PeersConfig:
    out: Path
    #: The package every server serves; None: the standard one, built under ``work``.
    package: Path | None = None
    work: Path = Path("runs/bench-peers")
    targets: tuple[str, ...] = TARGETS
    #: Rows per request and clients of the batch scenario; clients of the single-row one.
    rows: int = 256
    clients: int = 8
    single_clients: int = 64
    #: Single-row requests per second (open loop) at which each server's CPU use is measured.
    idle_rate: float = 200.0
    #: The service's Poisson scenario: this fraction of its closed-loop peak, found over these
    #: client counts of ``rows``-row requests.
    open_fraction: float = 0.8
    peak_clients: tuple[int, ...] = (8, 16)
    bound_ms: float = 60.0
    #: Times every target (but the ceiling) is measured, in turn; the report takes medians.
    rounds: int = 1
    duration_s: float = 12.0
    warmup_s: float = 2.0
    ceiling_s: float = 3.0
    #: The load generator's HTTP client (``load.CLIENTS``).
    client: str = "aiohttp"
    #: More configurations of the service to measure beside its defaults: label -> flags.
    service_variants: dict[str, list[str]] = field(default_factory=dict)
    venvs: Path = field(default_factory=default_cache)
    #: Peers run with another interpreter than their pinned venv's: peer -> python.
    peer_python: dict[str, str] = field(default_factory=dict)
    #: A large full-table package (``memory_scale``'s ``full``): one and two workers' memory.
    memory_package: Path | None = None
    memory_duration_s: float = 20.0
    #: Run the service's batch and single-row scenarios once more under py-spy.
    profile: bool = False
    timeout_s: float = 30.0
    log: Callable[[str], None] = field(default=print, repr=False)


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _targets(text: str) -> tuple[str, ...]:
    names = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = [name for name in names if name not in TARGETS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown: {', '.join(unknown)} (choose from "
                                         f"{', '.join(TARGETS)})")
    return tuple(name for name in TARGETS if name in names)


def _pair(text: str) -> tuple[str, str]:
    name, equals, value = text.partition("=")
    if not equals or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PeersConfig(Path("."))
    parser.add_argument("--out", required=True, help="report directory (results.json, "
                                                     "report.md, logs/)")
    parser.add_argument("--package", help="the model package every server serves (inputs "
                                          "dense and sparse); default: the standard one "
                                          "(26 tables of 1,000 rows, D=16, generated weights), "
                                          "built under --work with the train extra")
    parser.add_argument("--work", default=str(defaults.work), help="where the standard "
                                                                   "package is built")
    parser.add_argument("--targets", type=_targets, default=defaults.targets,
                        help=f"comma-separated, from {','.join(TARGETS)} (default: all)")
    parser.add_argument("--rows", type=int, default=defaults.rows,
                        help="rows per request of the batch scenario")
    parser.add_argument("--clients", type=int, default=defaults.clients,
                        help="clients of the batch scenario")
    parser.add_argument("--single-clients", type=int, default=defaults.single_clients,
                        help="clients of the single-row scenario")
    parser.add_argument("--idle-rate", type=float, default=defaults.idle_rate,
                        help="single-row requests/s at which each server's CPU is measured")
    parser.add_argument("--open-fraction", type=float, default=defaults.open_fraction,
                        help="the service's Poisson rate, as a fraction of its closed-loop "
                             "peak")
    parser.add_argument("--peak-clients", type=_ints, default=defaults.peak_clients,
                        help="client counts over which the service's closed-loop peak is "
                             "found")
    parser.add_argument("--bound-ms", type=float, default=defaults.bound_ms,
                        help="p99 bound (MLPerf DLRMv2 server: 60 ms)")
    parser.add_argument("--rounds", type=int, default=defaults.rounds,
                        help="measure every target this many times in turn; the report takes "
                             "each figure's median (a machine whose other load drifts)")
    parser.add_argument("--duration", type=float, default=defaults.duration_s,
                        help="measured seconds per scenario")
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s,
                        help="unmeasured seconds before each scenario")
    parser.add_argument("--ceiling-seconds", type=float, default=defaults.ceiling_s)
    parser.add_argument("--client", choices=("aiohttp", "raw"), default=defaults.client,
                        help="the load generator's HTTP client (aiohttp: the reference "
                             "harness's)")
    parser.add_argument("--service-variant", type=_pair, action="append", default=[],
                        metavar="LABEL=FLAGS",
                        help="also measure the service with these flags, e.g. "
                             "'one worker=--workers 1' (repeatable)")
    parser.add_argument("--venvs", default=str(defaults.venvs),
                        help="where the peers' pinned venvs are created and kept")
    parser.add_argument("--peer-python", type=_pair, action="append", default=[],
                        metavar="PEER=PYTHON",
                        help=f"run a peer ({', '.join(PINS)}) with this interpreter instead of "
                             "its pinned venv, e.g. naive=.venv/bin/python (repeatable)")
    parser.add_argument("--memory-package", help="a full-table package at Criteo's sizes "
                                                 "(python -m ctrserve.loadtest.memory_scale "
                                                 "--variants full --phase build --keep): "
                                                 "also measure one and two workers' memory")
    parser.add_argument("--memory-duration", type=float, default=defaults.memory_duration_s)
    parser.add_argument("--profile", action="store_true",
                        help="run the service's batch and single-row scenarios once more under "
                             "py-spy (the bench extra), every worker sampled: where its time "
                             "goes")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s,
                        help="per-request client timeout, seconds")


def config_from(args: argparse.Namespace) -> PeersConfig:
    unknown = [peer for peer, _ in args.peer_python if peer not in PINS]
    if unknown:
        raise ValueError(f"--peer-python: unknown peer {unknown[0]!r} (choose from "
                         f"{', '.join(PINS)})")
    return PeersConfig(
        out=Path(args.out).resolve(),
        package=Path(args.package).resolve() if args.package else None,
        work=Path(args.work).resolve(), targets=args.targets, rows=args.rows, clients=args.clients,
        single_clients=args.single_clients, idle_rate=args.idle_rate,
        open_fraction=args.open_fraction, peak_clients=args.peak_clients,
        bound_ms=args.bound_ms, rounds=args.rounds, duration_s=args.duration,
        warmup_s=args.warmup,
        ceiling_s=args.ceiling_seconds, client=args.client,
        service_variants={label: flags.split() for label, flags in args.service_variant},
        venvs=Path(args.venvs), peer_python=dict(args.peer_python),
        memory_package=Path(args.memory_package).resolve() if args.memory_package else None,
        memory_duration_s=args.memory_duration, profile=args.profile, timeout_s=args.timeout,
    )
