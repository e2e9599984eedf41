"""The report of ``ctrserve bench peers`` (``peers.py``): the side-by-side table, every goal with
its figure and verdict, every scenario's figures and, when measured, the workers' memory.

    python -m ctrserve.loadtest.peer_report OUT     # report.md again from OUT/results.json
"""

from __future__ import annotations

import json
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .profiles import AREA_NAMES

MiB = 1 << 20


@dataclass(frozen=True)
class Goal:
    """A goal of the peer comparison: its text, and its figure and whether it is met, or None
    when the run did not measure what it needs."""

    text: str
    judge: Callable[[dict[str, Any]], tuple[str, bool] | None]


def runs_of(results: dict[str, Any], target: str, variant: str = "defaults") -> dict[str, dict]:
    """A target's runs by scenario (the service's: those of one variant), each scenario's
    rounds as one run of their medians."""
    entry = results["targets"].get(target)
    if entry is None:
        return {}
    if target == "service":
        entry = entry["variants"].get(variant, {"runs": []})
    by_scenario: dict[str, list[dict]] = {}
    for run in entry["runs"]:
        by_scenario.setdefault(run["scenario"], []).append(run)
    return {scenario: median_run(runs) for scenario, runs in by_scenario.items()}


#: The figures of a run that a scenario's rounds are summarised by (their medians).
MEDIAN_FIELDS = ("req_per_s", "rows_per_s", "server_cpu", "client_cpu", "offered_rate", "peak")


def median_run(runs: list[dict]) -> dict:
    """One run standing for ``runs`` (rounds of one scenario): the median of each figure and of
    each latency percentile, the errors of all of them."""
    if len(runs) == 1:
        return runs[0]
    merged = {**runs[0], "rounds": len(runs)}
    for field in MEDIAN_FIELDS:
        if runs[0].get(field) is not None:
            merged[field] = statistics.median(run[field] for run in runs)
    merged["latency_ms"] = {key: statistics.median(run["latency_ms"].get(key, float("inf"))
                                                   for run in runs)
                            for key in runs[0]["latency_ms"]}
    errors: dict[str, int] = {}
    for run in runs:
        for kind, count in run["errors"].items():
            errors[kind] = errors.get(kind, 0) + count
    merged["errors"] = errors
    return merged


def _ratio(scenario: str, peer: str, at_least: float, field: str):
    def judge(results: dict[str, Any]) -> tuple[str, bool] | None:
        service = runs_of(results, "service").get(scenario)
        other = runs_of(results, peer).get(scenario)
        if service is None or other is None or not other[field]:
            return None
        ratio = service[field] / other[field]
        unit = "rows/s" if field == "rows_per_s" else "req/s"
        errors = _errors(service) + _errors(other)
        figure = (f"{ratio:.2f}x ({service[field]:,.0f} against {other[field]:,.0f} {unit})"
                  + (f"; {errors} errors" if errors else ""))
        return figure, ratio >= at_least and not errors
    return judge


def _closed_p99(bound_ms: float):
    def judge(results: dict[str, Any]) -> tuple[str, bool] | None:
        runs = runs_of(results, "service")
        closed = [runs[name] for name in ("batch", "single") if name in runs]
        if not closed:
            return None
        worst = max(run["latency_ms"].get("p99", float("inf")) for run in closed)
        figure = ", ".join(f"{name} {run['latency_ms'].get('p99', float('nan')):.1f} ms"
                           for name, run in zip(("batch", "single"), closed, strict=False))
        return figure, worst <= bound_ms and not sum(_errors(run) for run in closed)
    return judge


def _idle_cpu(limit: float):
    def judge(results: dict[str, Any]) -> tuple[str, bool] | None:
        run = runs_of(results, "service").get("idle")
        if run is None:
            return None
        return f"{run['server_cpu']:.3f} cores", run["server_cpu"] <= limit
    return judge


def _poisson(bound_ms: float):
    def judge(results: dict[str, Any]) -> tuple[str, bool] | None:
        run = runs_of(results, "service").get("poisson")
        if run is None:
            return None
        p99 = run["latency_ms"].get("p99", float("inf"))
        errors = _errors(run)
        figure = (f"p99 {p99:.1f} ms at {run['offered_rate']:.1f} req/s "
                  f"({run['fraction']:.0%} of the peak {run['peak']:.1f} req/s)"
                  + (f"; {errors} errors" if errors else ""))
        return figure, p99 <= bound_ms and not errors
    return judge


def memory_ratio(memory: dict[str, Any]) -> tuple[float, float, float]:
    """One worker's PSS, two workers' PSS summed (their supervisor and multiprocessing's
    resource tracker left out: they are not workers) and their ratio."""
    one, two = (sum(p["pss_bytes"] for p in memory[f"workers_{n}"]["processes"]
                    if p["role"] == "worker") for n in (1, 2))
    return one, two, two / max(1, one)


def _memory(at_most: float):
    def judge(results: dict[str, Any]) -> tuple[str, bool] | None:
        memory = results.get("memory")
        if memory is None:
            return None
        one, two, ratio = memory_ratio(memory)
        return (f"{ratio:.2f}x ({two / MiB:,.0f} MiB against {one / MiB:,.0f} MiB)",
                ratio <= at_most)
    return judge


def goals(config: dict[str, Any]) -> list[Goal]:
    rows, clients, single = config["rows"], config["clients"], config["single_clients"]
    bound = config["bound_ms"]
    return [
        Goal(f"{rows} rows x {clients} clients: >= 1.15x the naive endpoint",
             _ratio("batch", "naive", 1.15, "rows_per_s")),
        Goal(f"{rows} rows x {clients} clients: >= 1.8x MLServer",
             _ratio("batch", "mlserver", 1.8, "rows_per_s")),
        Goal(f"1 row x {single} clients: >= 1.3x the naive endpoint",
             _ratio("single", "naive", 1.3, "req_per_s")),
        Goal(f"1 row x {single} clients: >= 2x MLServer",
             _ratio("single", "mlserver", 2.0, "req_per_s")),
        Goal(f"p99 <= {bound:g} ms in every closed-loop scenario", _closed_p99(bound)),
        Goal(f"server CPU at {config['idle_rate']:g} single-row req/s <= 0.15 cores",
             _idle_cpu(0.15)),
        Goal(f"Poisson arrivals of {rows}-row requests at {config['open_fraction']:.0%} of the "
             f"service's closed-loop peak: p99 <= {bound:g} ms", _poisson(bound)),
        Goal("a full-table package at Criteo's sizes: two workers' PSS summed <= 1.2x one "
             "worker's", _memory(1.2)),
    ]


def _errors(run: dict[str, Any]) -> int:
    return sum(run["errors"].values())


def _cell(run: dict[str, Any] | None, field: str) -> str:
    if run is None:
        return "-"
    errors = _errors(run)
    text = f"{run[field]:,.0f} ({run['latency_ms'].get('p99', float('nan')):.0f})"
    return text + (f", {errors} errors" if errors else "")


def side_by_side(results: dict[str, Any]) -> list[str]:
    config = results["config"]
    lines = [f"| server (its settings) | {config['rows']} rows x {config['clients']} clients, "
             f"rows/s (p99 ms) | 1 row x {config['single_clients']} clients, req/s (p99 ms) | "
             f"server CPU at {config['idle_rate']:g} single-row req/s |",
             "|---|---:|---:|---:|"]
    targets = results["targets"]
    ceiling = targets.get("ceiling")
    if ceiling:
        by_rows = {r["rows"]: r["rows_per_s"] for r in ceiling["results"]}
        lines.append(f"| in-process ONNX Runtime, {ceiling['threads']} threads (no HTTP) | "
                     f"{by_rows.get(config['rows'], 0):,.0f} | "
                     f"{by_rows.get(1, 0):,.0f} (batch 1) | - |")
    labels = {
        "echo": "FastAPI echo, no inference (the framework's floor)",
        "naive": "naive FastAPI + ONNX Runtime per request ({threads} threads, spinning off)",
        "mlserver": "MLServer {version}, adaptive batching (up to {size} requests, {time} ms)",
        "bentoml": "BentoML {version}, adaptive batching",
    }
    rows: list[tuple[str, dict[str, dict]]] = []
    service = targets.get("service")
    if service:
        for variant, entry in service["variants"].items():
            label = ("ctrserve, defaults" if variant == "defaults"
                     else f"ctrserve `{' '.join(entry['flags'])}` ({variant})")
            rows.append((label, runs_of(results, "service", variant)))
    for target, label in labels.items():
        entry = targets.get(target)
        if entry is None:
            continue
        rows.append((label.format(
            threads=entry.get("threads"),
            version=entry["versions"].get(target, "?"),
            size=entry.get("max_batch_size"),
            time=1000 * entry.get("max_batch_time_s", 0)), runs_of(results, target)))
    for label, runs in rows:
        idle = runs.get("idle")
        lines.append(f"| {label} | {_cell(runs.get('batch'), 'rows_per_s')} | "
                     f"{_cell(runs.get('single'), 'req_per_s')} | "
                     f"{'-' if idle is None else format(idle['server_cpu'], '.2f')} |")
    return lines


def goal_table(results: dict[str, Any]) -> list[str]:
    lines = ["| goal | figure | verdict |", "|---|---|---|"]
    for goal in goals(results["config"]):
        judged = goal.judge(results)
        if judged is None:
            lines.append(f"| {goal.text} | - | not measured |")
        else:
            figure, met = judged
            lines.append(f"| {goal.text} | {figure} | {'met' if met else '**missed**'} |")
    return lines


def scenario_table(results: dict[str, Any]) -> list[str]:
    lines = ["| server | scenario | round | rows | clients or rate | req/s | rows/s | p50 ms | "
             "p90 ms | p99 ms | errors | server cores | client cores |",
             "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    every: list[dict[str, Any]] = []
    for target, entry in results["targets"].items():
        if target == "service":
            for variant in entry["variants"].values():
                every += variant["runs"]
        elif "runs" in entry:
            every += entry["runs"]
    for run in every:
        name = run["target"] + (f" ({run['variant']})" if run.get("variant") else "")
        load = (f"{run['concurrency']} clients" if run["mode"] == "closed"
                else f"{run['offered_rate']:,.1f}/s")
        latency = run["latency_ms"]
        lines.append(
            f"| {name} | {run['scenario']} | {run.get('round', 0) + 1} | {run['rows']:.0f} | "
            f"{load} | "
            f"{run['req_per_s']:,.1f} | {run['rows_per_s']:,.0f} | "
            f"{latency.get('p50', float('nan')):.1f} | {latency.get('p90', float('nan')):.1f} | "
            f"{latency.get('p99', float('nan')):.1f} | {_errors(run)} | "
            f"{run['server_cpu']:.2f} | {run['client_cpu']:.2f} |")
    return lines


def profile_table(results: dict[str, Any]) -> list[str]:
    """The shares of py-spy's samples of the service's workers by area, per profiled scenario
    (none when the run had no ``--profile``)."""
    runs = [run for run in runs_of(results, "service").values() if run.get("profile")]
    if not runs:
        return []
    areas = [area for area in AREA_NAMES if any(area in run["profile"] for run in runs)]
    lines = [f"| scenario | req/s | {' | '.join(areas)} |",
             f"|---|---:|{'---:|' * len(areas)}"]
    for run in runs:
        rows = f"{run['rows']:.0f} row" + ("s" if run["rows"] != 1 else "")
        lines.append(f"| {run['scenario']} ({rows}, {run['concurrency']} clients) | "
                     f"{run['req_per_s']:,.0f} | "
                     + " | ".join(f"{run['profile'].get(area, 0):.0%}" for area in areas) + " |")
    return lines


def memory_table(memory: dict[str, Any]) -> list[str]:
    lines = ["| workers | process | PSS MiB | RSS MiB |", "|---:|---|---:|---:|"]
    for workers in (1, 2):
        for process in memory[f"workers_{workers}"]["processes"]:
            lines.append(f"| {workers} | {process['role']} {process['pid']} | "
                         f"{process['pss_bytes'] / MiB:,.0f} | "
                         f"{process['rss_bytes'] / MiB:,.0f} |")
    one, two, ratio = memory_ratio(memory)
    lines += ["", f"Two workers' PSS summed over one worker's: {two / MiB:,.0f} / "
                  f"{one / MiB:,.0f} MiB = **{ratio:.2f}x** ({memory['package']}, "
                  f"{memory['duration_s']:g} s of load each)."]
    return lines


def markdown(results: dict[str, Any]) -> str:
    config, machine = results["config"], results["machine"]
    versions = {target: entry.get("versions", {})
                for target, entry in results["targets"].items() if entry.get("versions")}
    lines = [
        "# ctrserve beside the servers a user would pick instead", "",
        f"{machine['date']}: {machine['summary']}; load average at the end "
        f"{machine.get('load_average_end', [float('nan')])[0]:.2f}, CPU time taken by the host "
        f"over the run (steal) {machine.get('steal_share', 0):.1%}. ONNX Runtime "
        f"{machine['onnxruntime']} in this process; Python {machine['python']}.", "",
        f"Model: `{results['model']['package']}` ({results['model']['tables']} tables, "
        f"{results['model']['dense']} dense inputs), served by every server. Requests: Open "
        f"Inference Protocol v2 JSON tensors (BentoML: its own body with the same rows), from "
        f"one load generator ({config['client']} client) on the same machine. Each scenario: "
        f"{config['warmup_s']:g} s of warm-up, then {config['duration_s']:g} s measured; "
        "latency from each send (closed loop) or scheduled send (open loop)."
        + (f" The servers were measured in turn {config['rounds']} times: every figure but "
           "those of the last table is the median over these rounds."
           if config.get("rounds", 1) > 1 else ""), "",
        "Versions: " + "; ".join(f"{target}: " + ", ".join(f"{k} {v}" for k, v in found.items())
                                 for target, found in versions.items()), "",
        "## Side by side", "", *side_by_side(results), "",
        "## Goals", "", *goal_table(results), "",
        "## Every scenario", "", *scenario_table(results), "",
    ]
    ceiling_end = results.get("ceiling_end")
    if ceiling_end:
        lines += ["In-process ceiling again at the end (drift): " + ", ".join(
            f"{r['rows']} rows {r['rows_per_s']:,.0f} rows/s" for r in ceiling_end["results"])
            + ".", ""]
    profiles = profile_table(results)
    if profiles:
        lines += ["## Where the service's time goes", "",
                  "py-spy's samples of every worker during the scenario (run again under the "
                  "profiler), each sample assigned to the innermost frame of a known area:", "",
                  *profiles, ""]
    if results.get("memory"):
        lines += ["## Memory of one and two workers", "", *memory_table(results["memory"]), ""]
    return "\n".join(lines)


def write_report(results: dict[str, Any], out: Path) -> list[Path]:
    path = out / "report.md"
    path.write_text(markdown(results))
    return [path]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m ctrserve.loadtest.peer_report OUT", file=sys.stderr)
        return 2
    out = Path(argv[0])
    for path in write_report(json.loads((out / "results.json").read_text()), out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
