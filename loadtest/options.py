"""Options of ``ctrserve bench serve`` (``driver.py``). The ``ctrserve`` command builds its
parser from them for every sub-command, also on an install without the bench extra, so this
module imports the standard library only."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

APIS = ("v2-binary", "v2-json", "columns", "rows")
EXPERIMENTS = ("ceiling", "generator", "closed", "single", "open", "grid", "profile")
DEFAULT_EXPERIMENTS = ("ceiling", "generator", "closed", "single", "open", "grid")


@dataclass
class BenchConfig:
    package: Path
    out: Path
    data: Path | None = None
    experiments: tuple[str, ...] = DEFAULT_EXPERIMENTS
    rows: int = 256
    open_rows: int = 270
    apis: tuple[str, ...] = ("v2-binary", "columns")
    single_apis: tuple[str, ...] = ("v2-binary", "columns", "rows")
    #: The service with batching on, off, or both (in this order).
    batching: tuple[bool, ...] = (True, False)
    concurrency: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    single_clients: int = 64
    open_concurrency: tuple[int, ...] = (2, 4, 8, 16, 32)
    fractions: tuple[float, ...] = (0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
    refine_steps: int = 3
    bound_ms: float = 60.0
    duration_s: float = 10.0
    warmup_s: float = 2.0
    ceiling_s: float = 3.0
    grid_delays_us: tuple[int, ...] = (0, 500, 2000, 8000)
    grid_batch_rows: tuple[int, ...] = (256, 1024, 4096)
    grid_duration_s: float = 6.0
    grid_concurrency: int = 8
    profile_s: float = 10.0
    server_cpu: int | None = 0
    client_cpu: int | None = 1
    timeout_s: float = 30.0
    #: The generator's HTTP client: ``raw`` (rawhttp.py) or ``aiohttp``.
    client: str = "raw"
    max_in_flight: int = 4096
    seed: int = 0
    #: Where progress lines go.
    log: Callable[[str], None] = field(default=print, repr=False)


# -- command line ---------------------------------------------------------------------------------


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def _names(choices: tuple[str, ...]):
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [n for n in names if n not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown: {', '.join(unknown)} (choose from "
                                             f"{', '.join(choices)})")
        return names
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = BenchConfig(Path("."), Path("."))
    parser.add_argument("--package", required=True, help="model package, e.g. "
                                                         "runs/demo/repo/demo/1")
    parser.add_argument("--data", help="raw rows to send (Parquet); default: synthesised from "
                                       "the package's vocabularies")
    parser.add_argument("--out", required=True, help="report directory (results.json, "
                                                     "report.md, PNGs)")
    parser.add_argument("--experiments", type=_names(EXPERIMENTS),
                        default=defaults.experiments,
                        help=f"comma-separated, from {','.join(EXPERIMENTS)} (default: all "
                             "but profile)")
    parser.add_argument("--rows", type=int, default=defaults.rows,
                        help="rows per request (closed loop)")
    parser.add_argument("--open-rows", type=int, default=defaults.open_rows,
                        help="rows per request (open loop)")
    parser.add_argument("--apis", type=_names(APIS), default=defaults.apis)
    parser.add_argument("--single-apis", type=_names(APIS), default=defaults.single_apis)
    parser.add_argument("--batching", choices=("both", "on", "off"), default="both",
                        help="run the service with batching on, off, or both")
    parser.add_argument("--concurrency", type=_ints, default=defaults.concurrency)
    parser.add_argument("--single-clients", type=int, default=defaults.single_clients)
    parser.add_argument("--open-concurrency", type=_ints, default=defaults.open_concurrency,
                        help="closed-loop sweep that finds the max sustained rate")
    parser.add_argument("--fractions", type=_floats, default=defaults.fractions,
                        help="Poisson rates as fractions of the max sustained rate")
    parser.add_argument("--refine-steps", type=int, default=defaults.refine_steps)
    parser.add_argument("--bound-ms", type=float, default=defaults.bound_ms,
                        help="p99 bound (MLPerf DLRMv2 server: 60 ms)")
    parser.add_argument("--duration", type=float, default=defaults.duration_s,
                        help="measured seconds per point")
    parser.add_argument("--warmup", type=float, default=defaults.warmup_s,
                        help="unmeasured seconds before each point")
    parser.add_argument("--ceiling-seconds", type=float, default=defaults.ceiling_s)
    parser.add_argument("--grid-delays-us", type=_ints, default=defaults.grid_delays_us)
    parser.add_argument("--grid-batch-rows", type=_ints, default=defaults.grid_batch_rows)
    parser.add_argument("--grid-duration", type=float, default=defaults.grid_duration_s)
    parser.add_argument("--grid-concurrency", type=int, default=defaults.grid_concurrency)
    parser.add_argument("--profile-seconds", type=float, default=defaults.profile_s)
    parser.add_argument("--server-cpu", type=int, default=defaults.server_cpu)
    parser.add_argument("--client-cpu", type=int, default=defaults.client_cpu)
    parser.add_argument("--no-pin", action="store_true",
                        help="run server and generator on any core (not the protocol)")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s,
                        help="per-request client timeout, seconds")
    parser.add_argument("--client", choices=("raw", "aiohttp"), default=defaults.client,
                        help="the generator's HTTP client: raw (a minimal keep-alive client, "
                             "the cheapest per request) or aiohttp")
    parser.add_argument("--seed", type=int, default=0)


def config_from(args: argparse.Namespace) -> BenchConfig:
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2
    return BenchConfig(
        package=Path(args.package), out=Path(args.out),
        data=Path(args.data) if args.data else None, experiments=args.experiments,
        batching={"both": (True, False), "on": (True,), "off": (False,)}[args.batching],
        rows=args.rows, open_rows=args.open_rows, apis=args.apis, single_apis=args.single_apis,
        concurrency=args.concurrency, single_clients=args.single_clients,
        open_concurrency=args.open_concurrency, fractions=args.fractions,
        refine_steps=args.refine_steps, bound_ms=args.bound_ms, duration_s=args.duration,
        warmup_s=args.warmup, ceiling_s=args.ceiling_seconds,
        grid_delays_us=args.grid_delays_us, grid_batch_rows=args.grid_batch_rows,
        grid_duration_s=args.grid_duration, grid_concurrency=args.grid_concurrency,
        profile_s=args.profile_seconds,
        server_cpu=args.server_cpu if pin else None, client_cpu=args.client_cpu if pin else None,
        timeout_s=args.timeout, client=args.client, seed=args.seed,
    )


