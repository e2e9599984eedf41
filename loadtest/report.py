"""The serving benchmark's report: the goals with their measured figures, Markdown tables, PNG
plots (matplotlib, Agg), from the driver's ``results.json``.

    python -m ctrserve.loadtest.report docs/benchmarks/serve   # again from results.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .profiles import AREA_NAMES

GOAL_BINARY = 0.70
GOAL_COLUMNS = 0.40
GOAL_SINGLE = 0.50


def _best(records: list[dict], **match) -> dict | None:
    chosen = [r for r in records if all(r.get(k) == v for k, v in match.items())
              and not r["errors"]]
    return max(chosen, key=lambda r: r["rows_per_s"], default=None)


def _ceiling(results: dict, rows: int, what: str = "session") -> float | None:
    for record in results["experiments"].get("ceiling", []):
        if record["rows"] == rows and record["what"] == what:
            return record["rows_per_s"]
    return None


def goals(results: dict) -> list[dict]:
    """Each goal of the scoring-service issue with its measured figure."""
    config = results["config"]
    experiments = results["experiments"]
    out = []
    closed = experiments.get("closed", [])
    ceiling = _ceiling(results, config["rows"])
    for api, goal, name in (("v2-binary", GOAL_BINARY, "binary v2 API"),
                            ("columns", GOAL_COLUMNS, "columnar friendly API")):
        best = _best(closed, target="service", api=api, batching=True)
        if best and ceiling:
            ratio = best["rows_per_s"] / ceiling
            out.append({
                "goal": f"{config['rows']}-row requests through the {name} >= "
                        f"{goal:.0%} of the in-process ceiling",
                "measured": f"{best['rows_per_s']:,.0f} rows/s (c={best['concurrency']}) = "
                            f"{ratio:.0%} of {ceiling:,.0f} rows/s",
                "ratio": ratio, "target": goal, "met": ratio >= goal,
                "short_by": max(0.0, goal - ratio)})
    single = experiments.get("single", [])
    for api in config["single_apis"]:
        service = _best(single, target="service", api=api, batching=True)
        parse = _best(single, target="parse-only", api=api)
        if service and parse:
            ratio = service["req_per_s"] / parse["req_per_s"]
            out.append({
                "goal": f"single-row requests ({api}) from {config['single_clients']} clients "
                        f">= {GOAL_SINGLE:.0%} of the parse-only route",
                "measured": f"{service['req_per_s']:,.0f} req/s = {ratio:.0%} of "
                            f"{parse['req_per_s']:,.0f} req/s",
                "ratio": ratio, "target": GOAL_SINGLE, "met": ratio >= GOAL_SINGLE,
                "short_by": max(0.0, GOAL_SINGLE - ratio)})
    opened = experiments.get("open")
    if opened:
        at80 = [r for r in opened["poisson"] if r.get("batching") is True
                and abs(r.get("fraction", 0) - 0.8) < 1e-9 and not r.get("refine")]
        if at80:
            record = at80[0]
            p99 = record["latency_ms"].get("p99", float("inf"))
            met = p99 <= opened["bound_ms"] and not record["errors"]
            out.append({
                "goal": f"p99 <= {opened['bound_ms']:.0f} ms for {opened['rows']}-row requests "
                        "at 80% of the max sustained rate",
                "measured": f"p99 {p99:.1f} ms at {record['offered_rate']:.0f} req/s (80% of "
                            f"{opened['max_sustained_on']:.0f}), errors "
                            f"{record['errors'] or 0}",
                "ratio": p99, "target": opened["bound_ms"], "met": met,
                "short_by": max(0.0, p99 - opened["bound_ms"])})
    return out


def _f(value, digits: int = 0) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _lat(record: dict, key: str) -> str:
    return _f(record["latency_ms"].get(key), 1) if record["latency_ms"] else "–"


def _errors(record: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(record["errors"].items())) or "0"


def _run_table(records: list[dict], columns: tuple[str, ...]) -> list[str]:
    heads = {"target": "server", "api": "API", "batching": "batching", "rows": "rows/req",
             "concurrency": "clients", "offered_rate": "offered req/s",
             "max_queue_delay_us": "delay us", "max_batch_rows": "max batch"}
    names = [heads[c] for c in columns] + ["req/s", "rows/s", "p50 ms", "p90 ms", "p99 ms",
                                           "p99.9 ms", "errors", "server cores",
                                           "generator cores", "rows/batch", "steal"]
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for r in records:
        cells = []
        for c in columns:
            value = r.get(c)
            if c == "batching":
                value = "–" if value is None else ("on" if value else "off")
            elif c == "rows":
                value = _f(value)
            elif c == "offered_rate":
                value = _f(value, 1)
            cells.append(str(value if value is not None else "–"))
        cells += [_f(r["req_per_s"]), _f(r["rows_per_s"]), _lat(r, "p50"), _lat(r, "p90"),
                  _lat(r, "p99"), _lat(r, "p99.9"), _errors(r), _f(r["server_cpu"], 2),
                  _f(r["client_cpu"], 2), _f(r.get("rows_per_batch"), 1),
                  f"{r['server_core_steal']:.1%}" if "server_core_steal" in r else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def markdown(results: dict, plots: list[str]) -> str:
    config, machine = results["config"], results["machine"]
    experiments = results["experiments"]
    lines = [
        f"# Serving benchmark: {results['model']['name']}",
        "",
        f"Machine: {machine['summary']}. Load average at the end "
        f"{machine.get('load_average_end', ['?'])[0]:.2f}. {machine['date']}. ONNX Runtime "
        f"{machine['onnxruntime']}, Python {machine['python']}.",
        "",
        f"Protocol: {machine['pinning']}. The service runs with one uvicorn worker and one "
        "ONNX Runtime intra-op thread. Each point: "
        f"{config['warmup_s']:g} s of warm-up, then {config['duration_s']:g} s measured. "
        f"Rows: {results['model']['rows_source']}.",
        "",
    ]
    found = goals(results)
    if found:
        lines += ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
        for goal in found:
            verdict = "yes" if goal["met"] else (
                f"no ({100 * goal['short_by']:.0f} points short)" if goal["target"] < 1 else
                f"no (over by {goal['short_by']:.1f} ms)")
            lines.append(f"| {goal['goal']} | {goal['measured']} | {verdict} |")
        lines.append("")
    if "ceiling" in experiments:
        lines += ["## In-process ceiling (one ONNX Runtime thread, server's core)", "",
                  "| what | rows/batch | rows/s | ms/batch |", "|---|---|---|---|"]
        for r in experiments["ceiling"]:
            lines.append(f"| {r['what']} | {r['rows']} | {_f(r['rows_per_s'])} | "
                         f"{r['ms_per_batch']:.3f} |")
        lines.append("")
    if "generator" in experiments:
        lines += ["## The load generator against a server that does no work", ""]
        lines += _run_table(experiments["generator"], ("target", "rows", "concurrency"))
        lines.append("")
        measured = [r for name in ("closed", "single") for r in experiments.get(name, [])]
        if "open" in experiments:
            measured += experiments["open"]["sustained"] + experiments["open"]["poisson"]
        for generator in experiments["generator"]:
            same = [r for r in measured if round(r["rows"]) == round(generator["rows"])]
            if same:
                top = max(same, key=lambda r: r["req_per_s"])
                lines.append(
                    f"- {generator['rows']:.0f}-row requests: the generator reached "
                    f"{generator['req_per_s']:,.0f} req/s against {generator['target']}; the "
                    f"fastest server measured with them answered {top['req_per_s']:,.0f} req/s "
                    f"({top['req_per_s'] / generator['req_per_s']:.0%} of the generator's "
                    "ceiling).")
        lines.append("")
    if "closed" in experiments:
        lines += [f"## Closed loop, {config['rows']}-row requests", ""]
        lines += _run_table(experiments["closed"], ("target", "api", "batching",
                                                    "concurrency"))
        lines.append("")
    if "single" in experiments:
        lines += [f"## Single-row requests, {config['single_clients']} clients", ""]
        lines += _run_table(experiments["single"], ("target", "api", "batching",
                                                    "concurrency"))
        lines.append("")
    if "open" in experiments:
        opened = experiments["open"]
        lines += [f"## Open loop: Poisson arrivals of {opened['rows']}-row requests "
                  f"({opened['api']})", "",
                  f"Max sustained rate (closed-loop peak): batching on "
                  f"{opened.get('max_sustained_on', 0):,.1f} req/s, off "
                  f"{opened.get('max_sustained_off', 0):,.1f} req/s. Max Poisson rate with "
                  f"p99 <= {opened['bound_ms']:.0f} ms and no errors: batching on "
                  f"**{opened.get('max_rate_meeting_bound_on', 0):,.1f} req/s** "
                  f"({opened.get('max_rate_meeting_bound_on', 0) * opened['rows']:,.0f} rows/s),"
                  " off "
                  f"{opened.get('max_rate_meeting_bound_off', 0):,.1f} req/s. Latency is timed "
                  "from each request's scheduled send time.", "",
                  "Closed-loop sweep (max sustained rate):", ""]
        lines += _run_table(opened["sustained"], ("batching", "concurrency"))
        lines += ["", "Poisson arrivals:", ""]
        ordered = sorted(opened["poisson"], key=lambda r: (not r["batching"],
                                                           r["offered_rate"]))
        lines += _run_table(ordered, ("batching", "offered_rate"))
        lines.append("")
    if "grid" in experiments:
        lines += ["## Batcher settings: max_queue_delay_us and max_batch_rows", ""]
        lines += _run_table(experiments["grid"], ("max_queue_delay_us", "max_batch_rows",
                                                  "rows", "concurrency"))
        lines.append("")
    if experiments.get("profile"):
        lines += ["## Where the time goes (py-spy, active samples of the service process)", "",
                  "| API | rows/req | clients | rows/s | " + " | ".join(AREA_NAMES) + " |",
                  "|" + "---|" * (4 + len(AREA_NAMES))]
        for p in experiments["profile"]:
            lines.append(f"| {p['api']} | {p['rows']} | {p['concurrency']} | "
                         f"{_f(p['rows_per_s'])} | " + " | ".join(
                             f"{p['areas'].get(a, 0):.0%}" for a in AREA_NAMES) + " |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    experiments = results["experiments"]
    config = results["config"]
    opened = experiments.get("open")
    if opened:
        fig, ax = plt.subplots(figsize=(8, 5))
        styles = {"p50": "o", "p90": "s", "p99": "^", "p99.9": "v"}
        for batching, line in ((True, "-"), (False, "--")):
            runs = sorted((r for r in opened["poisson"] if r["batching"] is batching
                           and r["latency_ms"]), key=lambda r: r["offered_rate"])
            if not runs:
                continue
            rates = [r["offered_rate"] * opened["rows"] for r in runs]
            for key, marker in styles.items():
                ax.plot(rates, [r["latency_ms"][key] for r in runs], line, marker=marker,
                        label=f"{key}, batching {'on' if batching else 'off'}")
        ax.axhline(opened["bound_ms"], color="red", linewidth=1,
                   label=f"{opened['bound_ms']:.0f} ms bound (MLPerf DLRMv2 server)")
        ceiling = _ceiling(results, opened["rows"])
        if ceiling:
            ax.axvline(ceiling, color="black", linestyle=":", label="in-process ceiling")
        if "max_sustained_on" in opened:
            ax.axvline(opened["max_sustained_on"] * opened["rows"], color="grey",
                       linestyle="-.", label="max sustained (closed loop, batching on)")
        ax.set_yscale("log")
        ax.set_xlabel(f"offered load, rows/s (Poisson arrivals of {opened['rows']}-row "
                      "requests)")
        ax.set_ylabel("latency from scheduled send, ms")
        ax.set_title("Latency percentiles against offered load")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
        fig.tight_layout()
        fig.savefig(out / "latency_vs_load.png", dpi=110)
        plt.close(fig)
        written.append("latency_vs_load.png")
    closed = experiments.get("closed")
    if closed:
        fig, ax = plt.subplots(figsize=(8, 5))
        for api in config["apis"]:
            # batched: None for the parse-only server, which has no batcher
            for target, batched, line in (("service", True, "-"), ("service", False, "--"),
                                          ("parse-only", None, ":")):
                runs = sorted((r for r in closed if r["api"] == api and r["target"] == target
                               and r.get("batching") is batched),
                              key=lambda r: r["concurrency"])
                if runs:
                    label = f"{api}, {target}" + (
                        "" if batched is None else f", batching {'on' if batched else 'off'}")
                    ax.plot([r["concurrency"] for r in runs], [r["rows_per_s"] for r in runs],
                            line, marker="o", label=label)
        for what, color in (("session", "black"), ("transform + session", "grey")):
            ceiling = _ceiling(results, config["rows"], what)
            if ceiling:
                ax.axhline(ceiling, color=color, linestyle="-.",
                           label=f"in-process ceiling ({what}, 1 thread)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("concurrent clients (closed loop)")
        ax.set_ylabel("rows/s")
        ax.set_title(f"Throughput of {config['rows']}-row requests")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_concurrency.png", dpi=110)
        plt.close(fig)
        written.append("throughput_vs_concurrency.png")
    grid = experiments.get("grid")
    if grid:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, rows, key, label in ((axes[0], 1, "req_per_s", "single-row req/s"),
                                     (axes[1], config["open_rows"], "rows_per_s", "rows/s")):
            for size in config["grid_batch_rows"]:
                runs = sorted((r for r in grid if r["max_batch_rows"] == size
                               and round(r["rows"]) == rows),
                              key=lambda r: r["max_queue_delay_us"])
                ax.plot([max(r["max_queue_delay_us"], 1) for r in runs],
                        [r[key] for r in runs], marker="o", label=f"max_batch_rows {size}")
            ceiling = _ceiling(results, rows if rows > 1 else 1)
            if ceiling:
                ax.axhline(ceiling / (rows if key == "req_per_s" else 1), color="black",
                           linestyle="-.", label="in-process ceiling at this size")
            ax.set_xscale("log")
            ax.set_xlabel("max_queue_delay_us (0 plotted at 1)")
            ax.set_ylabel(label)
            clients = config["single_clients"] if rows == 1 else config["grid_concurrency"]
            ax.set_title(f"{rows}-row requests, {clients} clients")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "throughput_vs_batching.png", dpi=110)
        plt.close(fig)
        written.append("throughput_vs_batching.png")
    return written


def write_report(results: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    plots = plot(results, out)
    (out / "report.md").write_text(markdown(results, plots))
    return [out / "results.json", out / "report.md", *(out / p for p in plots)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0] if argv else "docs/benchmarks/serve")
    for path in write_report(json.loads((out / "results.json").read_text()), out):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
