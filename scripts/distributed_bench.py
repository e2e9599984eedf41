"""Data-parallel training against one process, measured on this machine.

Every training goes through the command line: one process (``ctrserve train``) against two
(``torchrun --standalone --nproc-per-node 2 -m ctrserve train --distributed``) with the same
flags, so the same global batch and seed. Two studies:

- ``equivalence``: test AUC over several seeds, on generated data (QR tables) and on Frappe
  (full tables; ``../shared/data/frappe``, left out where absent). Two processes match one when
  the difference of their mean test AUC lies within the spread of one process's over the seeds.
- ``scaling``: training rows per second of one epoch, and the bytes each process hands to the
  collectives per step (the dense gradients DDP buckets; the tables' sparse gradients, gathered
  or all-reduced whole, ``models/distributed.py``), for full tables, QR and ROBE-Z on generated
  Criteo-shaped data, streamed from disk.

    python scripts/distributed_bench.py equivalence --out runs/distributed/equivalence
    python scripts/distributed_bench.py scaling --out runs/distributed/scaling

A training whose checkpoint is already under OUT is not run again (delete it to retrain). The
results go to OUT/results.json and are printed as Markdown tables, with the commands.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAPPE = ROOT.parent / "shared" / "data" / "frappe"
ONE = [sys.executable, "-m", "ctrserve", "train"]
TWO = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
       "-m", "ctrserve", "train", "--distributed"]


def run(command: list[str]) -> float:
    """Runs ``command`` (printed first), failing on an error; returns its wall seconds."""
    print("$ " + " ".join(command), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    return time.perf_counter() - started


def train(launcher: list[str], flags: list[str], out: Path) -> dict:
    """The checkpoint record of a training, with its command and wall time."""
    command = [*launcher, *flags, "--no-progress", "--out", str(out)]
    if not (out / "config.json").exists():
        seconds = run(command)
        (out / "wall_seconds.txt").write_text(f"{seconds:.1f}\n")
    record = json.loads((out / "config.json").read_text())
    wall = out / "wall_seconds.txt"
    return {**record, "command": " ".join(command),
            "wall_seconds": float(wall.read_text()) if wall.exists() else None}


def generated(out: Path, rows: int, scale: float) -> Path:
    """Generated Criteo-shaped rows (tables Criteo's sizes / ``scale``), made once."""
    data = out / f"data-{rows}-{scale:g}"
    if not (data / "data.parquet").exists():
        run([sys.executable, "-m", "ctrserve", "generate", "criteo", "--rows", str(rows),
             "--scale", str(scale), "--out", str(data)])
    return data


def equivalence(args: argparse.Namespace) -> dict:
    data = generated(args.out, args.rows, args.scale)
    sets = {"generated": [
        "--data", str(data / "data.parquet"), "--spec", str(data / "spec.json"), "--split",
        "random", "--scheme", "qr", "--collisions", "4", "--min-rows", "2000", "--dim", "16",
        "--bottom", "64,16", "--top", "64", "--epochs", "2", "--batch-size", "1024"]}
    if FRAPPE.is_dir():
        sets["frappe"] = [
            "--data", str(FRAPPE / "frappe.validation.libfm"), "--test-data",
            str(FRAPPE / "frappe.test.libfm"), "--split", "random", "--dim", "16", "--top",
            "256,128", "--scheme", "full", "--epochs", "20", "--patience", "3"]
    else:
        print(f"{FRAPPE} not found: Frappe left out", file=sys.stderr)
    results: dict = {}
    for name, flags in sets.items():
        if name not in args.sets:
            continue
        runs: dict[str, list[dict]] = {"one": [], "two": []}
        for seed in args.seeds:
            for mode, launcher in (("one", ONE), ("two", TWO)):
                record = train(launcher, [*flags, "--seed", str(seed)],
                               args.out / name / f"{mode}-{seed}")
                runs[mode].append({"seed": seed, "test_auc": record["metrics"]["test"]["auc"],
                                   "epochs": len(record["history"]),
                                   "best_epoch": record["best_epoch"],
                                   "wall_seconds": record["wall_seconds"],
                                   "command": record["command"]})
        aucs = {mode: [r["test_auc"] for r in runs[mode]] for mode in runs}
        spread = max(aucs["one"]) - min(aucs["one"])
        difference = statistics.mean(aucs["two"]) - statistics.mean(aucs["one"])
        results[name] = {"runs": runs, "mean_one": statistics.mean(aucs["one"]),
                         "mean_two": statistics.mean(aucs["two"]), "spread_one": spread,
                         "spread_two": max(aucs["two"]) - min(aucs["two"]),
                         "difference": difference, "within_spread": abs(difference) <= spread}
    print("\n| data | 1 process: test AUC (min–max) | 2 processes | difference | 1-process "
          "seed spread | within it |\n|---|---|---|---|---|---|")
    for name, result in results.items():
        one, two = ([r["test_auc"] for r in result["runs"][m]] for m in ("one", "two"))
        print(f"| {name} | {result['mean_one']:.4f} ({min(one):.4f}–{max(one):.4f}) | "
              f"{result['mean_two']:.4f} ({min(two):.4f}–{max(two):.4f}) | "
              f"{result['difference']:+.4f} | {result['spread_one']:.4f} | "
              f"{'yes' if result['within_spread'] else 'no'} |")
    return results


SCALING_SCHEMES = {
    "full": ["--scheme", "full"],
    "qr": ["--scheme", "qr", "--collisions", "4", "--min-rows", "2000"],
    "robe": ["--scheme", "robe", "--compression", "4", "--block", "4", "--min-rows", "2000"],
}


def scaling(args: argparse.Namespace) -> dict:
    data = generated(args.out, args.rows, args.scale)
    common = ["--data", str(data / "data.parquet"), "--spec", str(data / "spec.json"),
              "--split", "random", "--fractions", "0.98,0.01,0.01", "--dim", "16", "--bottom",
              "64,16", "--top", "64", "--epochs", "1", "--batch-size", str(args.batch_size),
              "--cache-rows", "0"]
    results: dict = {}
    for scheme in args.schemes:
        flags = [*common, *SCALING_SCHEMES[scheme]]
        one = train(ONE, flags, args.out / scheme / "one")
        two = train(TWO, flags, args.out / scheme / "two")
        epoch = two["history"][0]
        results[scheme] = {
            "rows_per_second_one": one["history"][0]["rows_per_second"],
            "rows_per_second_two": epoch["rows_per_second"],
            "table_bytes_per_step": epoch["table_bytes_per_step"],
            "dense_bytes_per_step": epoch["dense_bytes_per_step"],
            "tables_bytes": sum(table["bytes"] for table in two["tables"]),
            "test_auc_one": one["metrics"]["test"]["auc"],
            "test_auc_two": two["metrics"]["test"]["auc"],
            "commands": [one["command"], two["command"]]}
    print("\n| scheme | table bytes | rows/s, 1 process | rows/s, 2 processes | speed-up | "
          "table gradients per step | dense gradients per step |\n|---|---|---|---|---|---|---|")
    for scheme, result in results.items():
        speedup = result["rows_per_second_two"] / result["rows_per_second_one"]
        print(f"| {scheme} | {result['tables_bytes'] / 2**20:.1f} MiB | "
              f"{result['rows_per_second_one']:,.0f} | {result['rows_per_second_two']:,.0f} | "
              f"{speedup:.2f}x | {result['table_bytes_per_step'] / 2**10:,.0f} KiB | "
              f"{result['dense_bytes_per_step'] / 2**10:,.0f} KiB |")
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    studies = parser.add_subparsers(dest="study", required=True)
    for name in ("equivalence", "scaling"):
        study = studies.add_parser(name)
        study.add_argument("--out", type=Path, required=True)
        study.add_argument("--rows", type=int, default=200_000 if name == "equivalence"
                           else 1_000_000, help="generated rows")
        study.add_argument("--scale", type=float, default=1000 if name == "equivalence" else 100,
                           help="Criteo's table sizes divided by this")
    studies.choices["equivalence"].add_argument(
        "--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2])
    studies.choices["equivalence"].add_argument(
        "--sets", type=lambda text: text.split(","), default=["generated", "frappe"],
        help="data sets to compare on: generated, frappe")
    studies.choices["scaling"].add_argument("--schemes", type=lambda text: text.split(","),
                                            default=list(SCALING_SCHEMES))
    studies.choices["scaling"].add_argument("--batch-size", type=int, default=4096)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = equivalence(args) if args.study == "equivalence" else scaling(args)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwritten to {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
