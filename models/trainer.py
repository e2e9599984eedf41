"""One training step of a CTR model and the epoch loop around it: the optimizers (SparseAdam for
sparse embedding weights, Adam for the rest), the values hidden as unknown, CCE's re-clustering
schedule, and the device.
``train.py`` streams the data through it; the PEP mask search (``pep_search.py``) steps it too.
As one of several processes (``distributed.py``) it steps the model's DDP replica."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .distributed import TableGradients, World, replicate, sums
from .dlrm import CTRModel
from .embeddings.cce import CCETable
from .transform import MISSING_ID, TransformedBatch


@dataclass(frozen=True)
class TrainConfig:
    #: The most epochs; fewer when validation stops improving (``patience``).
    epochs: int = 3
    #: Stop after this many epochs in a row without a better validation AUC (0: never early).
    patience: int = 2
    batch_size: int = 512
    lr: float = 1e-3
    embedding_lr: float = 1e-2
    seed: int = 0
    #: Rows read and transformed at a time.
    chunk_rows: int = 65536
    #: Training data up to this many rows is kept in memory after the first epoch and shuffled
    #: as a whole; larger data is streamed again each epoch, shuffled within each chunk.
    cache_rows: int = 2_000_000
    device: str = "auto"
    progress: bool = True
    #: Share of the training rows with values shown as unknown (``hide_values``).
    unknown_rate: float = 0.1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.patience < 0:
            raise ValueError(f"epochs must be positive and patience non-negative, got "
                             f"{self.epochs} and {self.patience}")
        if not 0 <= self.unknown_rate <= 1:
            raise ValueError(f"unknown_rate must lie in [0, 1], got {self.unknown_rate}")

    def to_dict(self) -> dict:
        return asdict(self)


def hide_values(sparse: np.ndarray, rate: float, unseen_ids: np.ndarray,
                rng: np.random.Generator) -> np.ndarray:
    """``sparse`` with values hidden in a ``rate`` share of its rows: in each such row every
    value is hidden with a chance drawn for the row from (0, 1), so rows with one hidden value
    and rows with all of them hidden are about equally common. A hidden value takes the missing
    id or the id of its column's unseen values (``FeatureTransform.unseen_ids``), equally often.

    Serving meets values training never saw (every new ad id) and columns a request leaves out;
    they take the out-of-vocabulary and missing rows. Where the training data has no such value
    those rows would keep their random initialisation, and a row of several unknown values
    scores far off the base rate. Shown as unknown now and then, alone and together, they learn
    what unknown values predict, in every scheme, since the ids change before any table.
    """
    rows, columns = sparse.shape
    chance = np.where(rng.random(rows) < rate, rng.random(rows), 0.0)
    hidden = rng.random((rows, columns)) < chance[:, None]
    replacement = np.where(rng.random((rows, columns)) < 0.5, unseen_ids[None, :], MISSING_ID)
    return np.where(hidden, replacement, sparse)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def optimizers(model: CTRModel, config: TrainConfig) -> list[torch.optim.Optimizer]:
    """SparseAdam for embedding weights with sparse gradients, Adam for everything else."""
    sparse_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, nn.Embedding) and module.sparse
    }
    sparse = [p for p in model.parameters() if id(p) in sparse_ids]
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    result: list[torch.optim.Optimizer] = []
    if sparse:
        result.append(torch.optim.SparseAdam(sparse, lr=config.embedding_lr))
    if dense:
        result.append(torch.optim.Adam(dense, lr=config.lr))
    return result


class Trainer:
    """Steps ``model``; with ``unseen_ids`` (one id per table, ``FeatureTransform.unseen_ids``)
    and a positive ``config.unknown_rate`` it hides values in that share of the training rows
    (``hide_values``).

    With ``world`` this process is one of several: it steps ``config.batch_size`` rows, its share
    of the global batch, on the device of its rank, through the model's DDP replica, its
    gradients averaged with the other processes' (DDP's, and ``table_gradients``, which also
    counts the bytes exchanged), and shuffles and hides values with a generator of its own."""

    def __init__(self, model: CTRModel, config: TrainConfig,
                 unseen_ids: np.ndarray | None = None, world: World | None = None) -> None:
        self.config = config
        self.world = world
        self.device = pick_device(config.device) if world is None else world.device
        self.model = model.to(self.device)
        self.table_gradients: TableGradients | None = None
        self.network: nn.Module = self.model
        if world is not None:
            self.network, self.table_gradients = replicate(self.model, world)
        self.optimizers = optimizers(model, config)
        self.loss = nn.BCEWithLogitsLoss()
        self.rng = np.random.default_rng(config.seed if world is None
                                         else [config.seed, world.rank])
        self.unseen_ids = unseen_ids
        #: Tables re-clustered on a schedule of steps (CCE's ``step_done``).
        self.clustered = [table for table in model.embedding_tables()
                          if isinstance(table, CCETable)]

    def step(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> float:
        self.model.train()
        if self.unseen_ids is not None and self.config.unknown_rate > 0:
            sparse = hide_values(sparse, self.config.unknown_rate, self.unseen_ids, self.rng)
        logits = self.network(
            torch.from_numpy(dense).to(self.device), torch.from_numpy(sparse).to(self.device)
        )
        loss = self.loss(logits, torch.from_numpy(labels).to(self.device))
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.table_gradients is not None:
            self.table_gradients.average()
        for optimizer in self.optimizers:
            optimizer.step()
        for table in self.clustered:
            table.step_done()
        return float(loss.detach())

    def epoch(self, chunks: Iterable[TransformedBatch], bar: tqdm) -> tuple[int, float]:
        """One pass, shuffled within each chunk; returns rows seen and mean loss (of every
        process, with ``world``)."""
        rows, loss_sum, running = 0, 0.0, None
        size = self.config.batch_size
        processes = 1 if self.world is None else self.world.size
        for chunk in chunks:
            labels = chunk.training_labels()
            order = self.rng.permutation(len(chunk))
            for start in range(0, len(order), size):
                index = order[start:start + size]
                loss = self.step(chunk.dense[index], chunk.sparse[index], labels[index])
                rows += len(index)
                loss_sum += loss * len(index)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                bar.update(len(index) * processes)
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        if self.world is not None:
            total_rows, loss_sum = sums(rows, loss_sum)
            rows = int(total_rows)
        return rows, loss_sum / max(rows, 1)
