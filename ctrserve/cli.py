"""The ``ctrserve`` command.

Only the command that runs builds its arguments, and every module beyond the standard library is
imported inside the functions that need it: ``ctrserve serve`` never imports torch, and an
install without the training code or an extra's packages (the serving image) still runs the
commands it has, and names what is missing for the others.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version as package_version


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(part) for part in text.split(",") if part.strip())


def add_data_arguments(parser: argparse.ArgumentParser, required: bool) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=required, help="training data file")
    group.add_argument("--format", choices=("criteo", "avazu", "libfm", "csv", "parquet"),
                       help="file format (default: what the file's content shows)")
    group.add_argument("--spec", help="column spec JSON (csv and parquet; default: inferred "
                                      "from the data, see 'ctrserve spec infer')")
    group.add_argument("--label", help="with an inferred spec: the label column (default: one "
                                       "named label, click, y, target, ...)")
    group.add_argument("--label-threshold", type=float,
                       help="with an inferred spec: label values of this and above are positive "
                            "(e.g. 4 for 1-5 ratings)")
    group.add_argument("--valid-data", help="a separate validation file (not cut from --data)")
    group.add_argument("--test-data", help="a separate test file (not cut from --data)")
    group.add_argument("--split", choices=("position", "random"), default="position",
                       help="position: contiguous, train first (time-ordered data); "
                            "random: rows ranked by a seeded hash of the row number")
    group.add_argument("--fractions", type=_floats,
                       help="fractions of the parts cut from --data: train,valid,test (default "
                            "0.8,0.1,0.1); 0.9,0.1 when one part has its own file; exact to "
                            "the row")
    group.add_argument("--split-seed", type=int, default=0,
                       help="seed of the random split, its own: --seed never moves it")
    group.add_argument("--skip-malformed", action="store_true",
                       help="count and skip malformed lines instead of stopping at the first")


def data_config(args: argparse.Namespace, infer_spec: bool = True):
    """The data a command reads. A csv or parquet file without ``--spec`` gets an inferred spec
    (printed, and kept in the data config) where ``infer_spec``; else none here (``evaluate``
    reads such data with its checkpoint's spec)."""
    from ctrserve.models.data import DataConfig
    from ctrserve.models.readers import sniff_format

    if args.format:
        fmt = args.format
    else:
        fmt, evidence = sniff_format(args.data)
        print(f"{args.data}: format {fmt} ({evidence}; --format to choose another)",
              file=sys.stderr)
    column_spec = None
    if fmt in ("csv", "parquet") and not args.spec and infer_spec:
        column_spec = _inferred_spec(args.data, fmt, args.label, args.label_threshold)
    parts = 3 - bool(args.valid_data) - bool(args.test_data)
    fractions = args.fractions or {3: (0.8, 0.1, 0.1), 2: (0.9, 0.1), 1: (1.0,)}[parts]
    return DataConfig(
        path=args.data, format=fmt, spec_path=args.spec, test_path=args.test_data,
        valid_path=args.valid_data, split=args.split, fractions=fractions,
        split_seed=args.split_seed, on_error="skip" if args.skip_malformed else "raise",
        column_spec=column_spec,
    )


def _inferred_spec(path: str, fmt: str, label: str | None, threshold: float | None) -> dict:
    """The spec inferred from ``path``, printed with the reason for each column."""
    from ctrserve.models.spec_inference import infer_spec

    inferred = infer_spec(path, fmt, label, threshold)
    print(f"column spec inferred from the first {inferred.sample_rows:,} rows of {path} "
          "(--spec to give one):")
    print(inferred.describe())
    return inferred.spec.to_dict()


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from ctrserve.models.embeddings.scheme_settings import SETTINGS

    group = parser.add_argument_group("model (flags override --config)")
    group.add_argument("--config", help="model config JSON (kind, dim, bottom, top, embeddings "
                                        "with a default scheme and per-table overrides)")
    group.add_argument("--model", dest="kind", choices=("dlrm", "lr"))
    group.add_argument("--dim", type=int)
    group.add_argument("--bottom", type=_ints, help="bottom MLP hidden widths, e.g. 512,256,64")
    group.add_argument("--top", type=_ints, help="top MLP hidden widths, e.g. 512,256")
    group.add_argument("--scheme", choices=tuple(SETTINGS),
                       help="the default scheme; a flag its scheme has no setting for is an "
                            "error")
    group.add_argument("--compression", type=float,
                       help="hash: rows / buckets; hybrid: rows / head and tail rows; cce: "
                            "rows / rows a part; lma, robe: full bytes / stored bytes")
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
    from ctrserve.models.embeddings.scheme_settings import settings_from_dict

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
            embeddings, default=settings_from_dict(scheme_flags, inherit=embeddings.default)))
    return config


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    add_data_arguments(parser, required=True)
    add_model_arguments(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--out", required=True, help="checkpoint directory to write")
    group.add_argument("--seed", type=int, default=0,
                       help="training seed: initialisation, shuffling, the values hidden as "
                            "unknown, and LMA's and ROBE's hashes (not the split)")
    group.add_argument("--epochs", type=int, default=3,
                       help="the most epochs; the best validation epoch is kept")
    group.add_argument("--patience", type=int, default=2,
                       help="stop after this many epochs without a better validation AUC "
                            "(0: run every epoch)")
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
    group.add_argument("--unknown-rate", type=float, default=0.1,
                       help="share of training rows with values shown as unknown (missing or "
                            "out-of-vocabulary), so the rows unseen values take in serving "
                            "learn (0: none)")
    group.add_argument("--no-progress", action="store_true")
    group.add_argument("--distributed", action="store_true",
                       help="train as one of the processes torchrun starts (torchrun "
                            "--nproc-per-node N -m ctrserve train ...; assumed under torchrun "
                            "without the flag): each reads its share of the rows, --batch-size "
                            "is the global batch, rank 0 writes the checkpoint")


def run_train(args: argparse.Namespace) -> int:
    from ctrserve.models import distributed
    from ctrserve.models.train import TrainConfig, fit
    from ctrserve.models.trainer import pick_device
    from ctrserve.models.transform import TransformConfig

    from .tables import print_metrics, print_tables

    model = model_config(args)  # a flag its scheme has no setting for fails before any read
    data = data_config(args)
    train_config = TrainConfig(
        epochs=args.epochs, patience=args.patience, batch_size=args.batch_size, lr=args.lr,
        embedding_lr=args.embedding_lr, seed=args.seed, cache_rows=args.cache_rows,
        device=args.device, progress=not args.no_progress, unknown_rate=args.unknown_rate,
    )
    transform_config = TransformConfig(
        min_frequency=args.min_frequency, hash_buckets=args.hash_buckets, hash_seed=args.seed
    )
    world = None
    if args.distributed or distributed.launched_by_torchrun():
        world = distributed.start(pick_device(args.device))
    try:
        result = fit(data, model, train_config, transform_config, args.out, world)
    finally:
        if world is not None:
            distributed.stop()
    if world is not None and not world.leads:
        return 0
    print_tables(result["tables"])
    if result["stopped_early"]:
        print(f"stopped after epoch {len(result['history'])}: no better validation AUC in "
              f"{args.patience} epochs")
    for part in ("valid", "test"):
        if result["metrics"][part]:
            print_metrics(f"{part} (best epoch {result['best_epoch']})", result["metrics"][part])
    if world is not None:
        print(f"trained by {world.size} processes ({world.device.type}), the global batch "
              f"{args.batch_size} rows, {args.batch_size // world.size} a process")
    print(f"checkpoint: {args.out} (its column spec: {args.out}/spec.json)")
    return 0


def add_evaluate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory written by 'ctrserve train'")
    parser.add_argument("--part", choices=("train", "valid", "test"), default="test")
    parser.add_argument("--predictions", help="write one probability per line to this file")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    add_data_arguments(parser, required=False)


def run_evaluate(args: argparse.Namespace) -> int:
    from ctrserve.models.evaluate import evaluate

    from .tables import print_metrics, print_unseen

    result = evaluate(
        args.checkpoint, data_config(args, infer_spec=False) if args.data else None, args.part,
        args.predictions
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    if result["labeled"]:
        print_metrics(f"{result['part']} ({result['rows']:,} rows)", result)
    else:
        written = f"; predictions written to {args.predictions}" if args.predictions else ""
        print(f"{result['part']} ({result['rows']:,} rows): the data has no labels, so no "
              f"metrics{written}")
    print_unseen(result["by_unseen_fields"])
    return 0


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+",
                        help="checkpoints of one model, one per training seed")
    parser.add_argument("--against", nargs="+", required=True,
                        help="checkpoints of the other model, the same seeds in the same order")
    parser.add_argument("--part", choices=("train", "valid", "test"), default="test")
    parser.add_argument("--replicates", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run_compare(args: argparse.Namespace) -> int:
    from ctrserve.models.bootstrap import Interval
    from ctrserve.models.evaluate import compare

    result = compare(args.checkpoints, args.against, args.part, args.replicates)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    interval = Interval(result["difference"], result["low"], result["high"])
    verdict = ("the interval excludes zero: a difference" if interval.excludes_zero
               else "the interval holds zero: no difference shown")
    print(f"{result['part']} ({result['rows']:,} rows, {result['seeds']} seeds): AUC "
          f"{result['auc'][0]:.4f} against {result['auc'][1]:.4f}; difference "
          f"{interval.text().removesuffix(' ≈')} (95% paired bootstrap over rows and seeds): "
          f"{verdict}")
    return 0


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="{infer}")
    infer = actions.add_parser(
        "infer", help="propose a column spec for a CSV or Parquet file",
        description="Propose a column spec from the first rows of a CSV (with a header line) or "
                    "Parquet file: the label by name (or --label), numbers dense unless "
                    "integers with few values or named like an id, text categorical (hex "
                    "detected), row ids ignored. Prints the reason for each column and the "
                    "spec as JSON.")
    infer.add_argument("data", help="CSV or Parquet file")
    infer.add_argument("--format", choices=("csv", "parquet"),
                       help="default: what the file's content shows")
    infer.add_argument("--label", help="the label column (default: one named label, click, "
                                       "y, target, ...)")
    infer.add_argument("--label-threshold", type=float,
                       help="label values of this and above are positive (e.g. 4 for ratings)")
    infer.add_argument("--sample-rows", type=int, default=100_000,
                       help="rows the columns are judged on")
    infer.add_argument("--out", help="also write the spec to this file")


def run_spec(args: argparse.Namespace) -> int:
    from ctrserve.models.readers import sniff_format
    from ctrserve.models.spec_inference import infer_spec

    fmt = args.format or sniff_format(args.data)[0]
    inferred = infer_spec(args.data, fmt, args.label, args.label_threshold, args.sample_rows)
    print(f"{args.data}, first {inferred.sample_rows:,} rows:", file=sys.stderr)
    print(inferred.describe(), file=sys.stderr)
    print(json.dumps(inferred.spec.to_dict(), indent=2))
    if args.out:
        inferred.spec.save(args.out)
        print(f"written to {args.out} (pass it with --spec)", file=sys.stderr)
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
    from pydantic_settings import CliSettingsSource

    from ctrserve.service.settings import ENV_PREFIX, ServiceSettings

    source: CliSettingsSource[ServiceSettings] = CliSettingsSource(
        ServiceSettings, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True)
    parser.set_defaults(settings_source=source)
    parser.epilog = (f"Every option can be set in the environment instead: {ENV_PREFIX} and its "
                     f"name in capitals, e.g. {ENV_PREFIX}MAX_BATCH_ROWS=512, "
                     f"""{ENV_PREFIX}MODELS='["ctr"]'. Flags win over the environment.""")


def run_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from ctrserve.service.server import serve
    from ctrserve.service.settings import ServiceSettings

    try:
        settings = ServiceSettings(_cli_settings_source=args.settings_source(parsed_args=args))
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in error.errors())
        raise ValueError(f"invalid settings: {problems}") from None
    return serve(settings)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    from ctrserve.models.generate import add_generate_arguments as add

    add(parser)


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
    from ctrserve.export.package_description import describe

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
    parser.add_argument("--provider", choices=["auto", "cpu", "cuda"],
                        help="also load the package as 'ctrserve serve' would with this provider "
                             "and print where ONNX Runtime placed its nodes")


def run_inspect(args: argparse.Namespace) -> int:
    from ctrserve.export.package_description import describe

    report, intact = describe(args.package)
    print(report, file=sys.stdout if intact else sys.stderr)
    if not intact or args.provider is None:
        return 0 if intact else 1
    from ctrserve.export.package import load_package
    from ctrserve.service.placement import describe as describe_placement
    from ctrserve.service.runtime import ModelLoadError, load_runtime

    try:
        runtime = load_runtime(load_package(args.package), args.provider)
    except ModelLoadError as error:
        print(f"ctrserve inspect: error: {error}", file=sys.stderr)
        return 1
    print(f"placement on {runtime.provider} ({runtime.device}), as ONNX Runtime recorded it:")
    print(describe_placement(runtime.placement.to_dict()))
    return 0


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
    benches = parser.add_subparsers(dest="bench", required=True,
                                    metavar="{accuracy,serve,peers}")
    add_bench_serve_arguments(benches)
    add_bench_peers_arguments(benches)
    accuracy = benches.add_parser(
        "accuracy", help="test AUC of every embedding scheme at byte budgets",
        description="Train and test every embedding scheme at byte budgets (fractions of the "
                    "full tables' bytes, everything counted at inference); write report.md, "
                    "report.json and auc_vs_bytes.png, caching each cell in OUT/cells.")
    add_data_arguments(accuracy, required=True)
    group = accuracy.add_argument_group("benchmark")
    group.add_argument("--out", required=True, help="report directory")
    group.add_argument("--name", help="data set name in the report (default: OUT's name)")
    group.add_argument("--budgets", default="1/2,1/4,1/8,1/16,1/32,1/64",
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


def add_bench_peers_arguments(benches) -> None:
    from ctrserve.loadtest.peer_options import add_arguments

    peers = benches.add_parser(
        "peers", help="the service beside a naive FastAPI endpoint, MLServer and BentoML: one "
                      "run, the same client and model, every goal with its verdict",
        description="Peer comparison: start each server in turn (the peers in pinned venvs "
                    "created on demand), send each the same v2 JSON requests, and write "
                    "results.json and report.md to OUT.")
    add_arguments(peers)


def run_bench(args: argparse.Namespace) -> int:
    if args.bench == "peers":
        from ctrserve.loadtest.extra import PEERS_MODULES, missing_modules

        missing = missing_modules(PEERS_MODULES)
        if missing:
            print(f"ctrserve bench peers: error: {missing}", file=sys.stderr)
            return 1
        from ctrserve.loadtest.peers import main as peers_main

        return peers_main(args)
    if args.bench == "serve":
        from ctrserve.loadtest.extra import SERVE_MODULES, missing_modules

        missing = missing_modules(SERVE_MODULES)
        if missing:
            print(f"ctrserve bench serve: error: {missing}", file=sys.stderr)
            return 1
        from ctrserve.loadtest.driver import main as serve_main

        return serve_main(args)
    from ctrserve.models.bench_accuracy import main

    return main(args, data_config(args))


@dataclass(frozen=True)
class Command:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "demo": Command("build the demo model package (generate, train, export) if missing, and "
                    "serve it", add_demo_arguments, run_demo),
    "generate": Command("write synthetic CTR data", add_generate_arguments, run_generate),
    "train": Command("train a CTR model and write a checkpoint", add_train_arguments, run_train),
    "evaluate": Command("score a checkpoint on a data split: AUC, logloss, NE, calibration, "
                        "and by the number of values unseen in training", add_evaluate_arguments,
                        run_evaluate),
    "compare": Command("test AUC of two models over seeds, with a paired bootstrap interval",
                       add_compare_arguments, run_compare),
    "spec": Command("column specs: propose one for a CSV or Parquet file", add_spec_arguments,
                    run_spec),
    "export": Command("turn a checkpoint into an ONNX model package in a model repository",
                      add_export_arguments, run_export),
    "inspect": Command("describe a model package and verify its files",
                       add_inspect_arguments, run_inspect),
    "serve": Command("serve the models of a repository over HTTP", add_serve_arguments,
                     run_serve),
    "features": Command("online feature store: load entity tables into Redis",
                        add_features_arguments, run_features),
    "bench": Command("benchmarks: accuracy against embedding memory, serving speed",
                     add_bench_arguments, run_bench),
}

#: Packages of the optional extras, by the extra that installs them.
EXTRAS = {"torch": "train", "onnx": "train", "onnxscript": "train", "matplotlib": "train",
          "aiohttp": "bench", "locust": "bench", "boto3": "s3", "botocore": "s3"}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command with its help; the arguments of ``command`` only."""
    parser = argparse.ArgumentParser(
        prog="ctrserve",
        description="Train, export and serve CTR models with compressed embedding tables.",
    )
    parser.add_argument("--version", action="version",
                        version=f"ctrserve {package_version('ctrserve')}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, spec in COMMANDS.items():
        sub = subparsers.add_parser(name, help=spec.help, description=spec.help)
        if name == command:
            spec.add_arguments(sub)
        sub.set_defaults(run=spec.run)
    return parser


def _missing_module(error: ModuleNotFoundError) -> str | None:
    """What to install for a module this installation lacks (None: not one of ours)."""
    name = error.name or ""
    extra = EXTRAS.get(name.partition(".")[0])
    if extra:
        return f"it needs {name}: pip install 'ctrserve[{extra}]'"
    if name.startswith("ctrserve."):
        return f"this installation has no {name} (the serving image carries the service only)"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    try:
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 0
        return args.run(args)
    except ModuleNotFoundError as error:
        missing = _missing_module(error)
        if missing is None:
            raise
        print(f"ctrserve {command}: error: {missing}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as error:
        print(f"ctrserve {command}: error: {error}", file=sys.stderr)
        return 1
