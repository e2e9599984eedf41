"""The accuracy-versus-memory benchmark (``ctrserve bench accuracy``).

Every scheme is trained with the same model, training budget and seeds at several byte budgets,
each a fraction of the full fp32 tables (everything counted at inference, see ``budget.py``), and
evaluated on the test part. A budget a scheme cannot reach is reported as unreachable, with the
reason, never moved. PEP can also be asked for at fixed fractions of non-zero values
(``pep_keep``), the way its paper counts, and is then reported with the bytes it really takes.

A cell is one (scheme, budget, seed). Each trained cell is one JSON file under
``<cache>/<scheme>/<budget>/seed<k>.json`` (``cache`` defaults to ``<out>/cells``) holding its
full configuration: a later run reuses it when the configuration is unchanged (an interrupted
run resumes; ``rerun`` forces cells to be trained again), and cells of one scheme whose budgets
resolve to the same settings are trained once. Outputs in ``<out>``: ``report.json`` (every
cell and the aggregate rows), ``report.md`` and ``auc_vs_bytes.png``.

Each cell also keeps its test predictions (``seed<k>.npz`` beside its JSON). Spread: each row
shows the mean and the min–max over seeds; every difference the report states, against the full
model and against hashing and QR (mult) at the same budget, comes with a 95% paired bootstrap
interval over test rows and seeds (``bootstrap.py``). A difference whose interval holds zero is
not a result; the tables mark it with ≈.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from fractions import Fraction
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from .bootstrap import Interval, PairedBootstrap
from .budget import Fit, fit_pep_keep, full_bytes
from .data import DataConfig
from .dlrm import ModelConfig
from .embeddings.scheme_settings import FullSettings, PEPSettings, SchemeSettings
from .schemes import SCHEMES, scheme_of
from .train import fit
from .trainer import TrainConfig
from .transform import TransformConfig, fit_transform

#: The benchmark's schemes (each registered scheme's ``benchmark`` variants): a name and the
#: settings the budget does not choose.
VARIANTS: dict[str, SchemeSettings] = {
    name: settings for scheme in SCHEMES.values() for name, settings in scheme.benchmark.items()
}
DEFAULT_BUDGETS: tuple[Fraction, ...] = tuple(Fraction(1, d) for d in (2, 4, 8, 16, 32, 64))
METRICS = ("auc", "logloss", "ne")


@dataclass(frozen=True)
class Budget:
    """A byte budget (``fraction`` of the full tables) or, for PEP, a kept fraction of values."""

    label: str
    fraction: Fraction | None = None
    keep: float | None = None

    @property
    def slug(self) -> str:
        return self.label.replace("/", "-").replace(" ", "-")


FULL = Budget("full", Fraction(1))


@dataclass(frozen=True)
class BenchConfig:
    name: str
    out: Path
    schemes: tuple[str, ...] = tuple(VARIANTS)
    budgets: tuple[Fraction, ...] = DEFAULT_BUDGETS
    seeds: tuple[int, ...] = (0, 1, 2)
    #: Extra PEP cells keeping these fractions of the values (whatever the bytes).
    pep_keep: tuple[float, ...] = ()
    #: PEP's search pressure (logits per step, see ``embeddings/pep.py``).
    drift: float = 0.01
    #: Cells trained at once, each in its own process.
    jobs: int = 1
    #: Cells to train again although cached: ``scheme[:budget[:seed]]``.
    rerun: tuple[str, ...] = ()
    #: Where the cells are cached (default ``<out>/cells``).
    cache: Path | None = None

    def __post_init__(self) -> None:
        unknown = set(self.schemes) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown schemes {', '.join(sorted(unknown))}; "
                             f"choose from {', '.join(VARIANTS)}")
        if any(not 0 < f < 1 for f in self.budgets):
            raise ValueError("budgets are fractions of the full tables, in (0, 1)")

    @property
    def cells(self) -> Path:
        return self.cache or self.out / "cells"


@dataclass(frozen=True)
class Cell:
    scheme: str
    budget: Budget
    seed: int
    fit: Fit
    budget_bytes: int | None

    @property
    def id(self) -> tuple[str, str, int]:
        return self.scheme, self.budget.label, self.seed

    def path(self, cells: Path) -> Path:
        return cells / self.scheme / self.budget.slug / f"seed{self.seed}.json"

    def predictions_path(self, cells: Path) -> Path:
        """The test labels and probabilities (``labels``, ``probabilities``), in row order."""
        return self.path(cells).with_suffix(".npz")

    def matches(self, pattern: str) -> bool:
        """``scheme[:budget[:seed]]``, e.g. ``hash``, ``hash:1/4``, ``hash:1/4:0``."""
        parts = pattern.split(":")
        wanted = [self.scheme, self.budget.label, str(self.seed)]
        return all(p == w for p, w in zip(parts, wanted, strict=False))


@dataclass(frozen=True)
class Job:
    """What one training needs; picklable, for worker processes."""

    data: DataConfig
    model: ModelConfig
    train: TrainConfig
    transform: TransformConfig

    def key(self) -> dict:
        """The configuration a cached result must match."""
        return json.loads(json.dumps({
            "data": self.data.to_dict(), "model": self.model.to_dict(),
            "train": self.train.to_dict(), "transform": asdict(self.transform),
        }))


def table_sizes(data: DataConfig, transform: TransformConfig,
                chunk_rows: int) -> tuple[list[str], list[int]]:
    """Column names and table sizes, from the transform ``fit`` will fit on the same data."""
    spec = data.spec()
    fitted = fit_transform(spec, data.batches("train", batch_rows=chunk_rows), transform)
    return list(spec.categorical_names), list(fitted.table_sizes)


def plan(bench: BenchConfig, names: list[str], sizes: list[int], dim: int) -> list[Cell]:
    """Every cell, reachable or not, in scheme then budget then seed order."""
    total = full_bytes(sizes, dim)
    cells = []
    for scheme in bench.schemes:
        base = VARIANTS[scheme]
        if isinstance(base, PEPSettings):
            base = replace(base, drift=bench.drift)
        budgets = [FULL] if isinstance(base, FullSettings) else [
            Budget(str(f), fraction=f) for f in bench.budgets]
        for budget in budgets:
            assert budget.fraction is not None
            limit = math.floor(budget.fraction * total)
            fitted = scheme_of(base).fit_budget(base, names, sizes, dim, limit)
            cells += [Cell(scheme, budget, seed, fitted, limit) for seed in bench.seeds]
        if isinstance(base, PEPSettings):
            for keep in bench.pep_keep:
                fitted = fit_pep_keep(base, sizes, dim, keep)
                cells += [Cell(scheme, Budget(f"keep {keep:g}", keep=keep), seed, fitted, None)
                          for seed in bench.seeds]
    return cells


def train_job(job: Job) -> tuple[dict, dict[str, np.ndarray]]:
    """Trains and tests one configuration (the shared-memory hashes follow the training seed,
    as in every training); the checkpoint is thrown away. Returns the measures and the test
    labels and probabilities."""
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        result = fit(job.data, job.model, job.train, job.transform, scratch)
    tables = result["tables"]
    predictions = {"labels": result["test_labels"].astype(np.uint8),
                   "probabilities": result["test_probabilities"].astype(np.float32)}
    return {
        **{name: float(result["metrics"]["test"][name]) for name in METRICS},
        "valid_auc": float(result["metrics"]["valid"]["auc"]),
        "best_epoch": result["best_epoch"],
        "train_seconds": result["train_seconds"],
        "total_seconds": result["total_seconds"],
        "pep_search": result["pep_search"],
        "bytes": sum(t["bytes"] for t in tables),
        "parameters": sum(t["parameters"] for t in tables),
        "full_bytes": sum(t["full_bytes"] for t in tables),
        "tables": [{k: t[k] for k in ("table", "scheme", "settings", "rows", "parameters",
                                      "bytes")} for t in tables],
    }, predictions


def cell_record(cell: Cell, job: Job, measured: dict) -> dict:
    """A trained cell's result file; refuses results that break the budget's contract."""
    fitted = cell.fit
    if cell.budget.keep is None and measured["bytes"] > (cell.budget_bytes or 0):
        raise RuntimeError(f"{cell.scheme} at {cell.budget.label}: {measured['bytes']:,} bytes "
                           f"exceed the budget of {cell.budget_bytes:,}")
    if fitted.exact and measured["bytes"] != fitted.bytes:
        raise RuntimeError(f"{cell.scheme} at {cell.budget.label}: the tables take "
                           f"{measured['bytes']:,} bytes, the closed form said {fitted.bytes:,}")
    return {
        "scheme": cell.scheme, "budget": cell.budget.label, "seed": cell.seed,
        "fraction": None if cell.budget.fraction is None else float(cell.budget.fraction),
        "keep": cell.budget.keep, "budget_bytes": cell.budget_bytes,
        "settings": fitted.settings, "predicted_bytes": fitted.bytes,
        **measured, "key": job.key(),
    }


def run_benchmark(bench: BenchConfig, data: DataConfig, model: ModelConfig,
                  train: TrainConfig, transform: TransformConfig) -> dict:
    """Trains the cells not cached, then writes the reports; returns ``report.json``'s content
    plus ``trained``, the number of trainings this run did."""
    train = replace(train, progress=False)
    names, sizes = table_sizes(data, transform, train.chunk_rows)
    cells = plan(bench, names, sizes, model.dim)
    records: dict[tuple[str, str, int], dict] = {}
    pending: dict[str, tuple[Job, list[Cell]]] = {}
    for cell in cells:
        if not cell.fit.reachable:
            continue
        assert cell.fit.embeddings is not None
        job = Job(data, replace(model, embeddings=cell.fit.embeddings),
                  replace(train, seed=cell.seed), transform)
        cached = _load(cell.path(bench.cells))
        forced = any(cell.matches(pattern) for pattern in bench.rerun)
        if (cached is not None and cached["key"] == job.key() and not forced
                and cell.predictions_path(bench.cells).is_file()):
            records[cell.id] = cached
            continue
        pending.setdefault(json.dumps(job.key(), sort_keys=True), (job, []))[1].append(cell)
    for done, (job, group, (measured, predictions)) in enumerate(
            _train_all(pending.values(), bench.jobs), 1):
        for cell in group:
            record = cell_record(cell, job, measured)
            path = cell.path(bench.cells)
            path.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cell.predictions_path(bench.cells), labels=predictions["labels"],
                     probabilities=predictions["probabilities"])
            path.write_text(json.dumps(record, indent=1) + "\n")
            records[cell.id] = record
        print(f"[{done}/{len(pending)}] {', '.join(f'{c.scheme} {c.budget.label}' for c in group)}"
              f" seed {group[0].seed}: AUC {measured['auc']:.4f}, {measured['bytes']:,} bytes, "
              f"{measured['total_seconds']:.1f} s", flush=True)
    report = build_report(bench, data, model, train, transform, names, sizes, cells, records)
    report["intervals"] = intervals(report["rows"], cells, bench)
    write_report(report, bench.out)
    return {**report, "trained": len(pending)}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _train_all(jobs: Iterable[tuple[Job, list[Cell]]], workers: int
               ) -> Iterable[tuple[Job, list[Cell], tuple[dict, dict[str, np.ndarray]]]]:
    """Trainings in this process (``workers`` 1) or in a pool, as they finish."""
    jobs = list(jobs)
    if workers <= 1:
        for job, group in jobs:
            yield job, group, train_job(job)
        return
    # spawn: a forked child would inherit torch's OpenMP state from the parent.
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_job, job): (job, group) for job, group in jobs}
        for future in as_completed(futures):
            job, group = futures[future]
            yield job, group, future.result()


# ------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(min(values)), "max": float(max(values))}


def build_report(bench: BenchConfig, data: DataConfig, model: ModelConfig, train: TrainConfig,
                 transform: TransformConfig, names: list[str], sizes: list[int],
                 cells: list[Cell], records: dict[tuple[str, str, int], dict]) -> dict:
    """Aggregate rows (one per scheme and budget, over seeds) and every cell's record."""
    rows: dict[tuple[str, str], dict] = {}
    for cell in cells:
        row = rows.setdefault((cell.scheme, cell.budget.label), {
            "scheme": cell.scheme, "budget": cell.budget.label,
            "fraction": None if cell.budget.fraction is None else float(cell.budget.fraction),
            "keep": cell.budget.keep, "budget_bytes": cell.budget_bytes,
            "reachable": cell.fit.reachable, "settings": cell.fit.settings,
            "reason": cell.fit.reason, "fewest_bytes": None if cell.fit.reachable
            else cell.fit.bytes, "seeds": [],
        })
        if cell.id in records:
            row["seeds"].append(cell.seed)
    for (scheme, label), row in rows.items():
        done = [records[(scheme, label, seed)] for seed in row["seeds"]]
        if done:
            for name in (*METRICS, "bytes", "parameters", "total_seconds"):
                row[name] = _spread([r[name] for r in done])
    full = rows.get(("full", FULL.label))
    return {
        "name": bench.name,
        "data": data.to_dict(),
        "model": {k: v for k, v in model.to_dict().items() if k != "embeddings"},
        "train": {k: v for k, v in train.to_dict().items() if k not in ("seed", "progress")},
        "transform": asdict(transform),
        "seeds": list(bench.seeds),
        "drift": bench.drift,
        "tables": dict(zip(names, sizes, strict=True)),
        "full_bytes": full_bytes(sizes, model.dim),
        "full_auc": full.get("auc") if full else None,
        "rows": list(rows.values()),
        "cells": [{k: v for k, v in r.items() if k not in ("key", "tables")}
                  for r in records.values()],
    }


#: The rows every other row is compared with, at the same budget (``full``: at any budget), and
#: how the report names them.
BASELINES = {"full": "the full model",
             "hash": "hashing at the same budget (positive: ahead of hashing)",
             "qr-mult": "QR (mult) at the same budget (positive: ahead of QR; the hybrid's tail "
                        "is QR mult, so its row says what the head adds)"}


def intervals(rows: list[dict], cells: list[Cell], bench: BenchConfig) -> list[dict]:
    """Each row run with every seed against each baseline run with every seed (the full model;
    hashing and QR at the same budget): the difference in mean test AUC and its 95% paired bootstrap
    interval over test rows and seeds."""
    paths = {cell.id: cell.predictions_path(bench.cells) for cell in cells}
    complete = [row for row in rows if sorted(row["seeds"]) == sorted(bench.seeds)]
    predictions: dict[tuple[str, str], np.ndarray] = {}
    labels = None
    for row in complete:
        per_seed = []
        for seed in bench.seeds:
            with np.load(paths[(row["scheme"], row["budget"], seed)]) as arrays:
                if labels is None:
                    labels = arrays["labels"]
                elif not np.array_equal(labels, arrays["labels"]):
                    raise RuntimeError(f"{row['scheme']} {row['budget']} seed {seed} was "
                                       "tested on other rows than the rest")
                per_seed.append(arrays["probabilities"])
        predictions[(row["scheme"], row["budget"])] = np.stack(per_seed)
    if labels is None:
        return []
    bootstrap = PairedBootstrap(labels, len(bench.seeds))
    replicates = {key: bootstrap.auc_replicates(values) for key, values in predictions.items()}
    found = []
    for scheme, budget in predictions:
        for baseline in BASELINES:
            against = (baseline, FULL.label if baseline == "full" else budget)
            if scheme == baseline or against not in predictions:
                continue
            interval = bootstrap.interval(predictions[(scheme, budget)], predictions[against],
                                          replicates[(scheme, budget)], replicates[against])
            found.append({"scheme": scheme, "budget": budget, "against": baseline,
                          **interval.to_dict()})
    return found


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "auc_vs_bytes.png")


def _bytes_text(count: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if count < 1024:
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1024
    return f"{count:,.2f} GiB"


def _range_text(spread: dict, digits: int = 4) -> str:
    if spread["min"] == spread["max"]:
        return f"{spread['mean']:.{digits}f}"
    return f"{spread['mean']:.{digits}f} ({spread['min']:.{digits}f}–{spread['max']:.{digits}f})"


def markdown(report: dict) -> str:
    full_bytes_ = report["full_bytes"]
    found = _intervals_by_key(report)
    lines = [
        f"# Accuracy against embedding memory: {report['name']}",
        "",
        f"Data: `{report['data']['path']}`"
        + (f", valid `{report['data']['valid_path']}`" if report["data"]["valid_path"] else "")
        + (f", test `{report['data']['test_path']}`" if report["data"]["test_path"] else "")
        + f" ({report['data']['split']} split, fractions {report['data']['fractions']}, split "
        f"seed {report['data']['split_seed']}).",
        f"Model: {report['model']['kind']}, D = {report['model']['dim']}, bottom "
        f"{report['model']['bottom']}, top {report['model']['top']}. Training: epochs "
        f"{report['train']['epochs']} at most (patience {report['train']['patience']}; the best "
        f"validation AUC kept), batch {report['train']['batch_size']}, lr "
        f"{report['train']['lr']}, embedding lr {report['train']['embedding_lr']}, unknown "
        f"values {report['train']['unknown_rate']}; PEP drift {report['drift']}. Seeds "
        f"{report['seeds']}: mean (min–max). ΔAUC: the difference in mean test AUC with its 95% "
        "paired bootstrap interval over test rows and seeds; ≈: the interval holds zero, so the "
        "difference is not a result.",
        f"{len(report['tables'])} tables, {sum(report['tables'].values()):,} rows; full fp32 "
        f"tables {_bytes_text(full_bytes_)} ({full_bytes_:,} bytes). Bytes: everything the "
        "tables need at inference. Parameters: stored values (PEP: non-zero values). "
        "Time: seconds per fit (transform, PEP search, epochs, evaluation), on a shared "
        "machine: indicative only.",
        "",
        "| scheme | budget | settings | embedding bytes | parameters | ratio | test AUC | "
        "ΔAUC vs full | logloss | NE | time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["rows"]:
        if not row["reachable"]:
            lines.append(f"| {row['scheme']} | {row['budget']} | unreachable: {row['reason']} | "
                         f"needs ≥ {_bytes_text(row['fewest_bytes'])} | | | | | | | |")
            continue
        if "auc" not in row:
            lines.append(f"| {row['scheme']} | {row['budget']} | {row['settings']} | "
                         "not run yet | | | | | | | |")
            continue
        stored = row["bytes"]["mean"]
        delta = _delta_text(found, row["scheme"], row["budget"], "full")
        lines.append(
            f"| {row['scheme']} | {row['budget']} | {row['settings']} | {_bytes_text(stored)} | "
            f"{row['parameters']['mean']:,.0f} | {full_bytes_ / stored:.2f}x | "
            f"{_range_text(row['auc'])} | {delta} | {_range_text(row['logloss'])} | "
            f"{_range_text(row['ne'])} | {row['total_seconds']['mean']:.1f} |")
    for baseline in BASELINES:
        lines += ["", *_delta_table(report, found, baseline)]
    lines += ["", *_goal_lines(report, found)]
    return "\n".join([*lines, ""])


#: The goal the report judges: this many times fewer bytes than the full tables ...
GOAL_RATIO = 16
#: ... within this much test AUC of the full model.
GOAL_AUC = 0.005


def goal_verdict(interval: Interval) -> str:
    """``met`` when the whole 95% interval of ΔAUC lies above ``-GOAL_AUC``, ``missed`` when it
    lies below, else ``not shown`` (the interval straddles the line)."""
    if interval.low > -GOAL_AUC:
        return "met"
    if interval.high < -GOAL_AUC:
        return "missed"
    return "not shown"


def _goal_lines(report: dict, found: dict[tuple[str, str, str], Interval]) -> list[str]:
    """The goal's verdict for every row at least ``GOAL_RATIO`` times smaller than the full
    tables, by its ΔAUC interval against the full model."""
    full_bytes_ = report["full_bytes"]
    rows = [row for row in report["rows"] if "bytes" in row
            and full_bytes_ / row["bytes"]["mean"] >= GOAL_RATIO
            and (row["scheme"], row["budget"], "full") in found]
    lines = [f"Goal: {GOAL_RATIO}x fewer embedding bytes than the full tables within "
             f"{GOAL_AUC} AUC of the full model: met where the whole 95% interval of ΔAUC lies "
             f"above -{GOAL_AUC}, missed where it lies below, not shown where it straddles.", ""]
    if not rows:
        return [*lines, f"No scheme ran at {GOAL_RATIO}x or more with every seed."]
    lines += ["| scheme | budget | ratio | ΔAUC vs full | goal |", "|---|---|---|---|---|"]
    for row in rows:
        interval = found[(row["scheme"], row["budget"], "full")]
        lines.append(f"| {row['scheme']} | {row['budget']} | "
                     f"{full_bytes_ / row['bytes']['mean']:.1f}x | "
                     f"{_delta_text(found, row['scheme'], row['budget'], 'full')} | "
                     f"{goal_verdict(interval)} |")
    return lines


def _intervals_by_key(report: dict) -> dict[tuple[str, str, str], Interval]:
    return {(i["scheme"], i["budget"], i["against"]): Interval(i["difference"], i["low"],
                                                              i["high"])
            for i in report.get("intervals", [])}


def _delta_text(found: dict[tuple[str, str, str], Interval], scheme: str, budget: str,
                against: str) -> str:
    """The interval against ``against``, or '' where there is none (the baseline itself, a
    row or baseline not run with every seed)."""
    interval = found.get((scheme, budget, against))
    return "" if interval is None else interval.text().replace("-0.0000", "+0.0000")


def _delta_table(report: dict, found: dict[tuple[str, str, str], Interval],
                 against: str) -> list[str]:
    """ΔAUC against ``against`` (one of ``BASELINES``), by scheme and budget, with the 95%
    paired bootstrap intervals."""
    schemes = [scheme for scheme in dict.fromkeys(r["scheme"] for r in report["rows"])
               if scheme not in ("full", against)]
    budgets = list(dict.fromkeys(r["budget"] for r in report["rows"] if r["scheme"] != "full"))
    if not any(key[2] == against for key in found) or not budgets:
        return []
    title = BASELINES[against]
    lines = [
        f"ΔAUC against {title}, with the 95% paired bootstrap interval over test rows and "
        "seeds; ≈: the interval holds zero, so the difference is not a result; –: unreachable.",
        "",
        "| scheme | " + " | ".join(budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    by_key = {(r["scheme"], r["budget"]): r for r in report["rows"]}
    for scheme in schemes:
        cells = []
        for budget in budgets:
            row = by_key.get((scheme, budget))
            if row is None:
                cells.append("")
            elif not row["reachable"]:
                cells.append("–")
            else:
                missing = "not run" if against == "full" else ""
                cells.append(_delta_text(found, scheme, budget, against) or missing)
        lines.append(f"| {scheme} | " + " | ".join(cells) + " |")
    return lines


#: The zoomed panel shows AUC down to this far below the full model.
ZOOM_AUC = 0.04


def plot(report: dict, path: Path) -> None:
    """Test AUC against embedding bytes (log x): one line per scheme, min–max bars, the full
    model as a reference line and band; the right panel zooms in near the full model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (whole, zoom) = plt.subplots(1, 2, figsize=(14, 5.5), sharex=True)
    for axes in (whole, zoom):
        _draw(axes, report)
    full = report["full_auc"]
    if full is not None:
        top = max([full["max"]] + [r["auc"]["max"] for r in report["rows"] if "auc" in r])
        zoom.set_ylim(full["mean"] - ZOOM_AUC, top + ZOOM_AUC / 20)
    whole.set_title("all cells", fontsize=9, pad=14)
    zoom.set_title(f"within {ZOOM_AUC} AUC of the full model", fontsize=9, pad=14)
    figure.suptitle(f"{report['name']}: test AUC against embedding memory "
                    f"(mean, min–max over {len(report['seeds'])} seeds)", fontsize=11)
    zoom.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _draw(axes, report: dict) -> None:
    from matplotlib.ticker import FuncFormatter, LogLocator

    rows = [r for r in report["rows"] if "auc" in r]
    full = report["full_auc"]
    if full is not None:
        axes.axhline(full["mean"], color="black", linewidth=1, label="full (fp32)")
        axes.axhspan(full["min"], full["max"], color="black", alpha=0.08, linewidth=0)
    budgets = {r["budget"]: r["budget_bytes"] for r in report["rows"] if r["budget_bytes"]
               and r["scheme"] != "full"}
    for label, limit in budgets.items():
        axes.axvline(limit, color="grey", linestyle=":", linewidth=0.8)
        axes.annotate(label, (limit, 1), xycoords=("data", "axes fraction"), fontsize=8,
                      ha="center", va="bottom", color="grey")
    markers = "osD^vP*Xhp<>"
    schemes = [s for s in dict.fromkeys(r["scheme"] for r in rows) if s != "full"]
    for index, scheme in enumerate(schemes):
        points = sorted((r for r in rows if r["scheme"] == scheme),
                        key=lambda r: r["bytes"]["mean"])
        x = [r["bytes"]["mean"] for r in points]
        y = np.array([r["auc"]["mean"] for r in points])
        errors = np.array([[m - r["auc"]["min"], r["auc"]["max"] - m]
                           for r, m in zip(points, y, strict=True)]).T
        axes.errorbar(x, y, yerr=errors, marker=markers[index % len(markers)], markersize=5,
                      capsize=2, linewidth=1.2, label=scheme,
                      linestyle="-" if index < 10 else "--")
    axes.set_xscale("log", base=2)
    low, high = axes.get_xlim()
    if high < 4 * low:  # cells of nearly equal bytes: widen to show at least two ticks
        middle = math.sqrt(low * high)
        axes.set_xlim(middle / 2, middle * 2)
    axes.xaxis.set_major_locator(LogLocator(base=2))
    axes.xaxis.set_major_formatter(FuncFormatter(lambda x, _: _bytes_text(x).replace(".0 ", " ")))
    axes.tick_params(axis="x", labelsize=8)
    axes.set_xlabel("embedding bytes at inference (everything counted)")
    axes.set_ylabel("test AUC")
    axes.grid(True, which="major", alpha=0.3)


def parse_budgets(text: str) -> tuple[Fraction, ...]:
    """``1/2,1/4,0.125`` -> fractions of the full tables."""
    return tuple(Fraction(part.strip()) for part in text.split(",") if part.strip())


def main(args: argparse.Namespace, data: DataConfig) -> int:
    """``ctrserve bench accuracy``: ``args`` as ``ctrserve/cli.py`` parses them."""
    started = time.perf_counter()
    bench = BenchConfig(
        name=args.name or Path(args.out).name, out=Path(args.out),
        schemes=tuple(s.strip() for s in args.schemes.split(",")) if args.schemes
        else tuple(VARIANTS),
        budgets=parse_budgets(args.budgets), seeds=tuple(args.seeds),
        pep_keep=tuple(args.pep_keep), drift=args.drift, jobs=args.jobs,
        rerun=tuple(args.rerun), cache=Path(args.cache) if args.cache else None,
    )
    model = ModelConfig(dim=args.dim, bottom=tuple(args.bottom), top=tuple(args.top))
    train = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                        embedding_lr=args.embedding_lr, device=args.device)
    transform = TransformConfig(min_frequency=args.min_frequency)
    report = run_benchmark(bench, data, model, train, transform)
    print(f"{report['trained']} trainings in {time.perf_counter() - started:.0f} s; "
          f"{bench.out / 'report.md'}")
    return 0
