"""Training and offline evaluation of CTR models, streaming the data from disk.

``fit`` runs a whole training: the transform, LMA signatures, PEP's mask search, the epochs
until validation stops improving (``Trainer`` and ``TrainConfig`` are in ``trainer.py``),
quantization and the checkpoint; in one process, or as one of several (``distributed.py``,
``sharded_data.py``).
"""

from __future__ import annotations

import copy
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, replace
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import evaluation_metrics
from .checkpoint import save_checkpoint
from .data import DataConfig
from .distributed import World, from_leader, replica_difference, training_threads
from .dlrm import CTRModel, ModelConfig, build_model
from .embeddings.lma import minhash_signatures
from .embeddings.scheme_settings import HybridSettings, LMASettings, PEPSettings
from .pep_search import SearchConfig, pep_tables, rewind, search_mask
from .quantize import quantize_model
from .schema import RawBatch
from .schemes import TableData, effective_settings, with_hybrid_heads
from .sharded_data import ShardedData
from .trainer import TrainConfig, Trainer
from .transform import FeatureTransform, TransformConfig, TransformedBatch, fit_transform


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """Produces ``items`` in a background thread (reading and transforming overlap training)."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def produce() -> None:
        try:
            for item in items:
                buffer.put(item)
        except BaseException as error:  # handed to the consumer, which re-raises it
            buffer.put(error)
            return
        buffer.put(done)

    thread = threading.Thread(target=produce, daemon=True)
    thread.start()
    while True:
        item = buffer.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def transformed(data: DataConfig, part: str, transform: FeatureTransform,
                chunk_rows: int) -> Iterator[TransformedBatch]:
    return transform_rows(data.batches(part, batch_rows=chunk_rows), transform)


def transform_rows(rows: Iterable[RawBatch], transform: FeatureTransform
                   ) -> Iterator[TransformedBatch]:
    for raw in rows:
        if len(raw):
            yield transform.transform(raw)


def concatenate(chunks: list[TransformedBatch]) -> TransformedBatch:
    return TransformedBatch(
        dense=np.concatenate([c.dense for c in chunks]),
        sparse=np.concatenate([c.sparse for c in chunks]),
        labels=np.concatenate([c.training_labels() for c in chunks]),
    )


def equal_chunks(chunks: Iterable[TransformedBatch], rows: int) -> Iterator[TransformedBatch]:
    """``chunks`` regrouped into chunks of exactly ``rows`` rows, the last one holding the rest:
    processes with equally many rows then cut them into equally many batches, and step
    together."""
    pending: list[TransformedBatch] = []
    count = 0
    for chunk in chunks:
        pending.append(chunk)
        count += len(chunk)
        while count >= rows:
            whole = concatenate(pending)
            labels = whole.training_labels()
            yield TransformedBatch(whole.dense[:rows], whole.sparse[:rows], labels[:rows])
            pending = [TransformedBatch(whole.dense[rows:], whole.sparse[rows:], labels[rows:])]
            count -= rows
    if count:
        yield concatenate(pending)


@torch.no_grad()
def predict(model: CTRModel, batches: Iterable[TransformedBatch], device: torch.device,
            batch_size: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Labels and predicted probabilities over all ``batches``."""
    model.eval()
    labels, probabilities = [], []
    for chunk in batches:
        for start in range(0, len(chunk), batch_size):
            dense = torch.from_numpy(chunk.dense[start:start + batch_size]).to(device)
            sparse = torch.from_numpy(chunk.sparse[start:start + batch_size]).to(device)
            probabilities.append(torch.sigmoid(model(dense, sparse)).cpu().numpy())
        if chunk.labels is not None:
            labels.append(chunk.labels)
    empty = np.zeros(0, dtype=np.float32)
    return (
        np.concatenate(labels) if labels else empty,
        np.concatenate(probabilities) if probabilities else empty,
    )


def lma_signatures(chunks: Iterable[TransformedBatch], transform: FeatureTransform,
                   config: ModelConfig) -> dict[str, np.ndarray] | None:
    """Minhash signatures for the model's LMA tables, from the first training rows (``chunks``,
    in file order, read only as far as the sample goes)."""
    names = list(transform.spec.categorical_names)
    sizes = transform.table_sizes
    settings = [effective_settings(config.embeddings.for_table(name), size, config.table_width)
                for name, size in zip(names, sizes, strict=True)]
    lma = [(column, s) for column, s in enumerate(settings) if isinstance(s, LMASettings)]
    if not lma:
        return None
    columns = [column for column, _ in lma]
    first = lma[0][1]
    signatures = minhash_signatures(
        (chunk.sparse for chunk in chunks),
        sizes, first.minhashes, first.sample_rows, first.hash_seed, columns=columns,
    )
    return {names[column]: values for column, values in signatures.items()}


def hybrid_counts(chunks: Callable[[], Iterable[TransformedBatch]], transform: FeatureTransform,
                  config: ModelConfig, world: World | None = None) -> dict[str, np.ndarray]:
    """How often each id of each hybrid table occurs in the training rows (``chunks()``: one
    pass; with ``world``, this process's rows, added up over every process); empty, without
    reading, when no table is hybrid."""
    names = list(transform.spec.categorical_names)
    sizes = transform.table_sizes
    columns = [column for column, (name, size) in enumerate(zip(names, sizes, strict=True))
               if isinstance(effective_settings(config.embeddings.for_table(name), size,
                                                config.table_width), HybridSettings)]
    if not columns:
        return {}
    counts = {column: np.zeros(sizes[column], dtype=np.int64) for column in columns}
    for chunk in chunks():
        for column in columns:
            counts[column] += np.bincount(chunk.sparse[:, column], minlength=sizes[column])
    if world is not None:
        for column in columns:
            total = torch.from_numpy(counts[column])
            torch.distributed.all_reduce(total)
            counts[column] = total.numpy()
    return {names[column]: counts[column] for column in columns}


def search_pep_mask(model: CTRModel, chunks: Callable[[], Iterable[TransformedBatch]],
                    unseen_ids: np.ndarray, config: ModelConfig, train_config: TrainConfig,
                    world: World | None = None) -> dict | None:
    """PEP's search phase, when the model has PEP tables: prune until they keep the fraction
    configured for the first of them, then rewind the model to its initial weights with the mask
    fixed. ``chunks()`` is one pass over the training chunks."""
    tables = pep_tables(model)
    if not tables:
        return None
    name = next(iter(tables))
    first = config.embeddings.for_table(name)
    if not isinstance(first, PEPSettings):
        raise ValueError(f"table {name} is a PEP table, configured {first.scheme}")
    cache = ChunkCache(train_config.cache_rows)

    def one_pass() -> Iterable[TransformedBatch]:
        """The training chunks, read once and then kept in memory (in the same chunks and
        order, so a pass is the same as reading the file again) while they fit the cache."""
        if cache.complete:
            return cache.chunks
        return cache.record(chunks())

    result = search_mask(model, one_pass, SearchConfig(target=first.pep_keep, drift=first.drift),
                         train_config, unseen_ids, world)
    rewind(model, result)
    return {"steps": result.steps, "nonzeros": result.nonzeros, "full": result.full}


class ChunkCache:
    """Keeps the chunks of the first epoch while they total at most ``limit`` rows."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.chunks: list[TransformedBatch] = []
        self.rows = 0
        self.overflowed = False
        #: Whether ``chunks`` hold a whole pass (a pass cut short records again next time).
        self.complete = False

    def record(self, chunks: Iterable[TransformedBatch]) -> Iterator[TransformedBatch]:
        self.chunks, self.rows = [], 0
        for chunk in chunks:
            if not self.overflowed:
                self.rows += len(chunk)
                self.overflowed = self.rows > self.limit
                if self.overflowed:
                    self.chunks.clear()
                else:
                    self.chunks.append(chunk)
            yield chunk
        self.complete = not self.overflowed

    def replay(self) -> list[TransformedBatch]:
        """The whole cached data as one chunk, so an epoch shuffles across all of it."""
        return [concatenate(self.chunks)] if self.chunks else []


def fit(
    data: DataConfig,
    model_config: ModelConfig,
    train_config: TrainConfig,
    transform_config: TransformConfig,
    out_dir: str,
    world: World | None = None,
) -> dict:
    """Fits the transform, trains, validates each epoch, tests, and writes a checkpoint.

    Training stops after ``train_config.epochs`` epochs, or earlier once ``patience`` epochs in
    a row bring no better validation AUC; the weights of the epoch with the best validation AUC
    are kept. Shared-memory hashes left unseeded take the training seed. Returns the record
    written to the checkpoint's ``config.json``, plus the per-table summaries and the test
    part's ``test_labels`` and ``test_probabilities`` (row order).

    With ``world`` (``distributed.start``) this process is one of several training the model
    together: ``train_config.batch_size`` is the global batch, each process stepping its share
    of it on its share of the rows (``sharded_data.py``). Rank 0 writes the checkpoint and
    returns the test labels and probabilities of every row, the others none; the record adds
    ``distributed``, and each epoch the bytes handed to the collectives per step.
    """
    processes = 1 if world is None else world.size
    if train_config.batch_size % processes:
        raise ValueError(f"the global batch of {train_config.batch_size} rows cannot be shared "
                         f"equally by {processes} processes")
    step_config = replace(train_config, batch_size=train_config.batch_size // processes)
    leads = world is None or world.leads
    torch.manual_seed(train_config.seed)
    model_config = replace(model_config,
                           embeddings=model_config.embeddings.with_seed(train_config.seed))
    # The prefetch thread reads and transforms on one core; torch's OpenMP threads get the rest.
    # Letting them take every core makes their barriers wait on a busy core: on 2 cores that
    # cut training on real-size Criteo tables from ~25k to ~2k rows/s.
    torch.set_num_threads(training_threads(1 if world is None else world.local_size))
    started = time.perf_counter()
    spec = data.spec()
    chunk_rows = train_config.chunk_rows
    shards = None if world is None else ShardedData(data, world)
    if shards is None:
        transform = fit_transform(spec, data.batches("train", batch_rows=chunk_rows),
                                  transform_config)
        first_rows = data.batches("train", batch_rows=chunk_rows)
    else:
        transform = shards.fit_transform(spec, transform_config, chunk_rows)
        first_rows = shards.first_training_rows(chunk_rows)
    # Tables quantized after training are trained as full fp32 tables.
    training_config = replace(model_config, embeddings=model_config.embeddings.for_training())
    names = list(spec.categorical_names)
    signatures = (lma_signatures(transform_rows(first_rows, transform), transform,
                                 training_config) if leads else None)
    if world is not None:
        signatures = from_leader(signatures)

    def train_chunks() -> Iterator[TransformedBatch]:
        """One pass over this process's training rows."""
        if shards is None:
            return transformed(data, "train", transform, chunk_rows)
        return equal_chunks(transform_rows(shards.training_rows(chunk_rows), transform),
                            chunk_rows)

    counts = hybrid_counts(train_chunks, transform, training_config, world)
    if counts:
        # The split searched on the counts, named in both configurations (the saved one too).
        model_config, training_config = (
            replace(config, embeddings=with_hybrid_heads(
                config.embeddings, names, transform.table_sizes, config.table_width, counts))
            for config in (model_config, training_config))
    model = build_model(transform.n_dense, transform.table_sizes, names, training_config,
                        TableData(signatures or {}, counts))

    def evaluated(scored: CTRModel, part: str, device: torch.device
                  ) -> tuple[np.ndarray, np.ndarray, dict | None]:
        """Labels and probabilities of ``part`` (with ``world``: of all its rows on rank 0, of
        none elsewhere) and their metrics (on every process)."""
        if shards is None:
            rows = transformed(data, part, transform, chunk_rows)
            labels, probabilities = predict(scored, rows, device)
        else:
            rows = transform_rows(shards.my_rows(part, chunk_rows), transform)
            labels, probabilities = shards.gather_predictions(*predict(scored, rows, device))
        metrics = evaluation_metrics.summary(labels, probabilities) if len(labels) else None
        return labels, probabilities, metrics if world is None else from_leader(metrics)

    pep_search = search_pep_mask(model, train_chunks, transform.unseen_ids, training_config,
                                 step_config, world)
    trainer = Trainer(model, step_config, transform.unseen_ids, world)
    cache = ChunkCache(train_config.cache_rows)
    history: list[dict] = []
    best: dict | None = None
    best_state = None
    train_rows = None
    for epoch in range(1, train_config.epochs + 1):
        if epoch == 1:
            chunks: Iterable[TransformedBatch] = cache.record(prefetch(train_chunks()))
        elif not cache.overflowed:
            chunks = cache.replay()
        else:
            chunks = prefetch(train_chunks())
        bar = tqdm(total=train_rows, unit="rows", unit_scale=True, desc=f"epoch {epoch}",
                   disable=not (train_config.progress and leads), dynamic_ncols=True)
        epoch_started = time.perf_counter()
        with bar:
            train_rows, mean_loss = trainer.epoch(chunks, bar)
        seconds = time.perf_counter() - epoch_started
        record: dict[str, Any] = {
            "epoch": epoch, "rows": train_rows, "train_loss": mean_loss, "seconds": seconds,
            "rows_per_second": train_rows / max(seconds, 1e-9)}
        if trainer.table_gradients is not None:
            record.update(trainer.table_gradients.take())
        valid = evaluated(trainer.model, "valid", trainer.device)[2]
        if valid is not None:
            record["valid"] = valid
            if best is None or valid["auc"] > best["valid"]["auc"]:
                best = record
                # deepcopy keeps tensors shared between tables (a shared memory) shared.
                best_state = copy.deepcopy(trainer.model.state_dict())
        history.append(record)
        if train_config.progress and leads:
            print(_epoch_line(record), flush=True)
        if (best is not None and train_config.patience
                and epoch - best["epoch"] >= train_config.patience):
            break
    if best_state is not None:
        trainer.model.load_state_dict(best_state)
    replicas = None
    if world is not None and shards is not None:
        replicas = {"processes": world.size, "device": str(world.device),
                    "train_rows_left_out": shards.left_out,
                    "replica_difference": replica_difference(trainer.model)}
    trainer.model.to("cpu")
    quantize_model(trainer.model, model_config.embeddings)
    trainer.model.config = model_config
    labels, probabilities, test = evaluated(trainer.model, "test", torch.device("cpu"))
    result = {
        "data": data.to_dict(),
        "train": train_config.to_dict(),
        "transform_config": asdict(transform_config),
        "history": history,
        "best_epoch": best["epoch"] if best else len(history),
        "stopped_early": len(history) < train_config.epochs,
        "metrics": {
            "valid": best["valid"] if best else None,
            "test": test,
        },
        "pep_search": pep_search,
        "train_seconds": sum(record["seconds"] for record in history),
        "total_seconds": time.perf_counter() - started,
    }
    if replicas is not None:
        result["distributed"] = replicas
    if leads:
        save_checkpoint(out_dir, trainer.model, transform, result)
    return {**result, "tables": trainer.model.table_summaries(), "test_labels": labels,
            "test_probabilities": probabilities}


def _epoch_line(record: dict) -> str:
    line = (f"epoch {record['epoch']}: {record['rows']:,} rows, loss {record['train_loss']:.4f}, "
            f"{record['rows_per_second']:,.0f} rows/s")
    if "valid" in record:
        valid = record["valid"]
        line += f", valid AUC {valid['auc']:.4f} logloss {valid['logloss']:.4f}"
    return line
