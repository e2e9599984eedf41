"""The ``ctrserve`` command. Subcommands import their modules lazily, so that commands which do
not train (and the server) never import torch."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from ctrserve.models.generate import add_generate_arguments


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def add_data_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=required, help="training data file")
    group.add_argument("--format", choices=("criteo", "avazu", "libfm", "csv", "parquet"),
                       help="file format (default: from the extension; criteo for .tsv)")
    group.add_argument("--spec", help="column spec JSON (csv and parquet)")
    group.add_argument("--test-data", help="a separate test file (then --fractions has two parts)")
    group.add_argument("--split", choices=("position", "random"), default="position",
                       help="position: contiguous, train first (time-ordered data); "
                            "random: seeded hash of the row number")
    group.add_argument("--fractions", type=_floats,
                       help="train,valid,test fractions (default 0.8,0.1,0.1; "
                            "0.9,0.1 with --test-data)")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--skip-malformed", action="store_true",
                       help="count and skip malformed lines instead of stopping at the first")


def data_config(args: argparse.Namespace):
    from ctrserve.models.data import DataConfig

    fmt = args.format or _format_from_path(args.data)
    fractions = args.fractions or ((0.9, 0.1) if args.test_data else (0.8, 0.1, 0.1))
    return DataConfig(
        path=args.data, format=fmt, spec_path=args.spec, test_path=args.test_data,
        split=args.split, fractions=fractions, seed=args.seed,
        on_error="skip" if args.skip_malformed else "raise",
    )


def _format_from_path(path: str) -> str:
    suffixes = {".tsv": "criteo", ".txt": "criteo", ".libfm": "libfm", ".libsvm": "libfm",
                ".parquet": "parquet", ".csv": "csv"}
    for suffix, fmt in suffixes.items():
        if path.endswith(suffix):
            return fmt
    raise SystemExit(f"cannot tell the format of {path}: pass --format")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (flags override --config)")
    group.add_argument("--config", help="model config JSON (kind, dim, bottom, top, embeddings "
                                        "with a default scheme and per-table overrides)")
    group.add_argument("--model", dest="kind", choices=("dlrm", "lr"))
    group.add_argument("--dim", type=int)
    group.add_argument("--bottom", type=_ints, help="bottom MLP hidden widths, e.g. 512,256,64")
    group.add_argument("--top", type=_ints, help="top MLP hidden widths, e.g. 512,256")
    group.add_argument("--scheme",
                       choices=("full", "hash", "qr", "kpart", "pep", "int8", "fp16", "lma",
                                "robe"))
    group.add_argument("--compression", type=float,
                       help="hash: rows / buckets; lma, robe: full bytes / stored bytes")
    group.add_argument("--collisions", type=int, help="qr: ids sharing a remainder row")
    group.add_argument("--partitions", type=int, help="kpart: number of partitions k")
    group.add_argument("--operation", choices=("mult", "add", "concat"))
    group.add_argument("--min-rows", type=int, help="tables with fewer rows stay full")
    group.add_argument("--minhashes", type=int, help="lma: minhashes per value")
    group.add_argument("--sample-rows", type=int,
                       help="lma: training rows whose co-occurrence sets give the signatures")
    group.add_argument("--block", type=int, help="robe: Z, coordinates per hashed block")
    group.add_argument("--granularity", help="pep: threshold granularity (global, dimension, "
                                             "feature, feature_dimension, field, "
                                             "field_dimension)")
    group.add_argument("--pep-keep", type=float,
                       help="pep: fraction of the full tables' values the search keeps")


def model_config(args: argparse.Namespace):
    from dataclasses import replace

    from ctrserve.models.dlrm import ModelConfig

    config = ModelConfig()
    if args.config:
        with open(args.config) as handle:
            config = ModelConfig.from_dict(json.load(handle))
    top_level = {k: getattr(args, k) for k in ("kind", "dim", "bottom", "top")}
    config = replace(config, **{k: v for k, v in top_level.items() if v is not None})
    scheme_flags = {k: getattr(args, k) for k in
                    ("scheme", "compression", "collisions", "partitions", "operation", "min_rows",
                     "minhashes", "sample_rows", "block", "granularity", "pep_keep")}
    scheme_flags = {k: v for k, v in scheme_flags.items() if v is not None}
    if scheme_flags:
        embeddings = config.embeddings
        config = replace(config, embeddings=replace(
            embeddings, default=replace(embeddings.default, **scheme_flags)))
    return config


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, required=True)
    add_model_arguments(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--out", required=True, help="checkpoint directory to write")
    group.add_argument("--epochs", type=int, default=3)
    group.add_argument("--batch-size", type=int, default=512)
    group.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (MLPs)")
    group.add_argument("--embedding-lr", type=float, default=1e-2,
                       help="SparseAdam learning rate (embedding tables)")
    group.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    group.add_argument("--cache-rows", type=int, default=2_000_000,
                       help="keep training data up to this many rows in memory after epoch 1")
    group.add_argument("--min-frequency", type=int, default=1,
                       help="values seen fewer times map to the out-of-vocabulary id")
    group.add_argument("--hash-buckets", type=int, default=0,
                       help="hash categorical values into this many ids instead of a vocabulary")
    group.add_argument("--no-progress", action="store_true")


def run_train(args: argparse.Namespace) -> int:
    from ctrserve.models.train import TrainConfig, fit
    from ctrserve.models.transform import TransformConfig

    from .report import print_metrics, print_tables

    train_config = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        embedding_lr=args.embedding_lr, seed=args.seed, cache_rows=args.cache_rows,
        device=args.device, progress=not args.no_progress,
    )
    transform_config = TransformConfig(
        min_frequency=args.min_frequency, hash_buckets=args.hash_buckets, hash_seed=args.seed
    )
    result = fit(data_config(args), model_config(args), train_config, transform_config, args.out)
    print_tables(result["tables"])
    for part in ("valid", "test"):
        if result["metrics"][part]:
            print_metrics(f"{part} (best epoch {result['best_epoch']})", result["metrics"][part])
    print(f"checkpoint: {args.out}")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory written by 'ctrserve train'")
    parser.add_argument("--part", choices=("train", "valid", "test"), default="test")
    parser.add_argument("--predictions", help="write one probability per line to this file")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_data_arguments(parser, required=False)


def run_evaluate(args: argparse.Namespace) -> int:
    from ctrserve.models.evaluate import evaluate

    from .report import print_metrics

    result = evaluate(
        args.checkpoint, data_config(args) if args.data else None, args.part, args.predictions
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_metrics(f"{result['part']} ({result['rows']:,} rows)", result)
    return 0


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", default="runs/demo",
                        help="where data, checkpoint and model repository go")
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--entity-rows", type=int, default=100_000,
                        help="interactions for the ranking model")
    parser.add_argument("--rebuild", action="store_true",
                        help="build the package again even if it exists")
    parser.add_argument("--once", action="store_true",
                        help="score a few rows through the API, print them and exit")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")


def run_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args.workdir, args.rows, args.epochs, args.rebuild, args.once, args.host,
               args.port, args.entity_rows)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repo", help="model repository (env CTRSERVE_REPO)")
    parser.add_argument("--model", action="append", dest="models",
                        help="a model to load (repeatable; default: every model in the repo)")
    parser.add_argument("--host", help="default 127.0.0.1 (env CTRSERVE_HOST)")
    parser.add_argument("--port", type=int, help="default 8000 (env CTRSERVE_PORT)")
    parser.add_argument("--workers", type=int, help="uvicorn worker processes (default 1)")
    parser.add_argument("--admin-token", help="bearer token for the repository control routes")
    parser.add_argument("--max-batch-rows", type=int)
    parser.add_argument("--max-queue-delay-us", type=int)
    parser.add_argument("--max-queue-rows", type=int)
    parser.add_argument("--request-timeout-ms", type=int)
    parser.add_argument("--no-batching", dest="batching", action="store_const", const=False)
    parser.add_argument("--poll-interval-s", type=float,
                        help="scan the repository for new versions this often (0: never)")
    parser.add_argument("--provider", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--intra-op-threads", type=int)
    parser.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    parser.add_argument("--max-request-rows", type=int, help="more rows in a request get 413")
    parser.add_argument("--max-concurrency", type=int,
                        help="connections + requests per worker before an immediate 503")
    parser.add_argument("--max-body-bytes", type=int, help="larger bodies get 413")
    parser.add_argument("--body-timeout-s", type=float,
                        help="a body must arrive within this time (408 otherwise)")
    parser.add_argument("--redis-url", help="Redis for the feature store and rollout")
    parser.add_argument("--redis-timeout-ms", type=int)
    parser.add_argument("--redis-required", action="store_const", const=True,
                        help="readiness requires Redis")


def run_serve(args: argparse.Namespace) -> int:
    from ctrserve.service.server import serve, settings_from

    flags = {k: v for k, v in vars(args).items()
             if k not in ("command", "run") and v is not None}
    return serve(settings_from(flags))


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory written by 'ctrserve train'")
    parser.add_argument("--repo", required=True, help="model repository directory")
    parser.add_argument("--name", required=True, help="model name (a directory in the repo)")
    parser.add_argument("--version", type=int,
                        help="integer version (default: one above the highest present)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the version if it exists")


def run_export(args: argparse.Namespace) -> int:
    from ctrserve.export.exporter import ExportError, export_checkpoint
    from ctrserve.export.inspect import describe

    try:
        package = export_checkpoint(args.checkpoint, args.repo, args.name, args.version,
                                    args.overwrite)
    except ExportError as error:
        print(f"ctrserve export: error: {error}", file=sys.stderr)
        return 1
    print(describe(package)[0])
    return 0


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", help="package directory, e.g. repo/ctr/1")


def run_inspect(args: argparse.Namespace) -> int:
    from ctrserve.export.inspect import describe

    report, intact = describe(args.package)
    print(report, file=sys.stdout if intact else sys.stderr)
    return 0 if intact else 1


def add_features_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="{load}")
    load = actions.add_parser("load", help="write a table of entity features into Redis")
    load.add_argument("file", help="CSV or Parquet table, one row per entity")
    load.add_argument("--redis", required=True, help="Redis URL, e.g. redis://127.0.0.1:6379/0")
    load.add_argument("--entity", required=True, help="entity name, e.g. user")
    load.add_argument("--key-column", required=True, help="the column holding the entity id")
    load.add_argument("--namespace", default="ctrserve")
    load.add_argument("--ttl", type=int, default=0, help="expire entities after S seconds")
    load.add_argument("--batch-rows", type=int, default=1000)
    load.add_argument("--no-progress", action="store_true")


def run_features(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from ctrserve.service.feature_loader import load_features

    try:
        written = load_features(args.redis, args.entity, args.key_column, args.file,
                                args.namespace, args.ttl, args.batch_rows,
                                progress=not args.no_progress)
    except (RedisError, OSError) as error:
        print(f"ctrserve features: error: Redis at {args.redis}: {error}", file=sys.stderr)
        return 1
    print(f"{written:,} {args.entity} entities written to {args.redis} "
          f"({args.namespace}:{args.entity}:<{args.key_column}>)")
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from ctrserve.models.generate import run_generate as run

    return run(args)


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    benches = parser.add_subparsers(dest="bench", required=True, metavar="{accuracy,serve}")
    add_bench_serve_arguments(benches)
    accuracy = benches.add_parser(
        "accuracy", help="test AUC of every embedding scheme at byte budgets",
        description="Train and test every embedding scheme at byte budgets (fractions of the "
                    "full tables' bytes, everything counted at inference); write report.md, "
                    "report.json and auc_vs_bytes.png, caching each cell in OUT/cells.")
    add_data_arguments(accuracy, required=True)
    group = accuracy.add_argument_group("benchmark")
    group.add_argument("--out", required=True, help="report directory")
    group.add_argument("--name", help="data set name in the report (default: OUT's name)")
    group.add_argument("--budgets", default="1/2,1/4,1/8,1/16,1/64",
                       help="fractions of the full tables' bytes")
    group.add_argument("--schemes", help="comma-separated benchmark schemes (default: all)")
    group.add_argument("--seeds", type=_ints, default=(0, 1, 2), help="training seeds")
    group.add_argument("--pep-keep", type=_floats, default=(),
                       help="extra PEP cells keeping these fractions of the values")
    group.add_argument("--drift", type=float, default=0.01, help="PEP search pressure per step")
    group.add_argument("--jobs", type=int, default=1, help="cells trained at once (processes)")
    group.add_argument("--rerun", action="append", default=[],
                       metavar="SCHEME[:BUDGET[:SEED]]", help="train these cells again")
    group.add_argument("--cache", help="cell cache directory (default: OUT/cells)")
    model = accuracy.add_argument_group("model and training (the same for every scheme)")
    model.add_argument("--dim", type=int, default=16)
    model.add_argument("--bottom", type=_ints, default=(512, 256, 64))
    model.add_argument("--top", type=_ints, default=(512, 256))
    model.add_argument("--epochs", type=int, default=3)
    model.add_argument("--batch-size", type=int, default=512)
    model.add_argument("--lr", type=float, default=1e-3)
    model.add_argument("--embedding-lr", type=float, default=1e-2)
    model.add_argument("--min-frequency", type=int, default=1)
    model.add_argument("--device", default="auto")


def add_bench_serve_arguments(benches) -> None:
    from ctrserve.loadtest.options import add_arguments

    serve = benches.add_parser(
        "serve", help="serving throughput and latency: closed and open loop, the in-process "
                      "ceiling, batching on and off",
        description="Serving benchmark (server pinned to one core, load generator on the "
                    "other): write results.json, report.md and PNG plots to OUT.")
    add_arguments(serve)


def run_bench(args: argparse.Namespace) -> int:
    if args.bench == "serve":
        from ctrserve.loadtest.driver import main as serve_main

        return serve_main(args)
    from ctrserve.models.bench_accuracy import main

    return main(args, data_config(args))

COMMANDS: dict[str, tuple[str, Callable, Callable[[argparse.Namespace], int]]] = {
    "demo": ("build the demo model package (generate, train, export) if missing, and serve it",
             add_demo_arguments, run_demo),
    "generate": ("write synthetic CTR data", add_generate_arguments, run_generate),
    "train": ("train a CTR model and write a checkpoint", add_train_arguments, run_train),
    "evaluate": ("score a checkpoint on a data split: AUC, logloss, NE, calibration",
                 add_evaluate_arguments, run_evaluate),
    "export": ("turn a checkpoint into an ONNX model package in a model repository",
               add_export_arguments, run_export),
    "inspect": ("describe a model package and verify its files",
                add_inspect_arguments, run_inspect),
    "serve": ("serve the models of a repository over HTTP", add_serve_arguments, run_serve),
    "features": ("online feature store: load entity tables into Redis",
                 add_features_arguments, run_features),
    "bench": ("benchmarks: accuracy against embedding memory, serving speed",
              add_bench_arguments, run_bench),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctrserve",
        description="Train, export and serve CTR models with compressed embedding tables.",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"ctrserve {args.command}: error: {error}", file=sys.stderr)
        return 1
