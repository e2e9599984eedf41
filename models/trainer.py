"""One training step of a CTR model and the epoch loop around it: the optimizers (SparseAdam for
sparse embedding weights, Adam for the rest) and the device. ``train.py`` streams the data through
it; the PEP mask search (``pep_search.py``) steps it too."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from .dlrm import CTRModel
from .transform import TransformedBatch


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 3
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

    def to_dict(self) -> dict:
        return asdict(self)


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
    def __init__(self, model: CTRModel, config: TrainConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.model = model.to(self.device)
        self.optimizers = optimizers(model, config)
        self.loss = nn.BCEWithLogitsLoss()
        self.rng = np.random.default_rng(config.seed)

    def step(self, dense: np.ndarray, sparse: np.ndarray, labels: np.ndarray) -> float:
        self.model.train()
        logits = self.model(
            torch.from_numpy(dense).to(self.device), torch.from_numpy(sparse).to(self.device)
        )
        loss = self.loss(logits, torch.from_numpy(labels).to(self.device))
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in self.optimizers:
            optimizer.step()
        return float(loss.detach())

    def epoch(self, chunks: Iterable[TransformedBatch], bar: tqdm) -> tuple[int, float]:
        """One pass, shuffled within each chunk; returns rows seen and mean loss."""
        rows, loss_sum, running = 0, 0.0, None
        size = self.config.batch_size
        for chunk in chunks:
            labels = chunk.training_labels()
            order = self.rng.permutation(len(chunk))
            for start in range(0, len(order), size):
                index = order[start:start + size]
                loss = self.step(chunk.dense[index], chunk.sparse[index], labels[index])
                rows += len(index)
                loss_sum += loss * len(index)
                running = loss if running is None else 0.98 * running + 0.02 * loss
                bar.update(len(index))
                bar.set_postfix(loss=f"{running:.4f}", refresh=False)
        return rows, loss_sum / max(rows, 1)
