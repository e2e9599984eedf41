"""PEP's search, mask and retrain (Liu et al., ICLR 2021): a lottery ticket for embeddings.

1. ``search_mask``: snapshot the model's initial state, then train it, the thresholds of its PEP
   tables learning while their scale grows by ``exp(drift)`` per step (the pressure, see
   ``embeddings/pep.py``). When the non-zero values of all the model's tables fall to ``target``
   of their full count, the masks ``|v| > scale * g(s)`` of that moment are the result.
2. ``rewind``: back to the snapshot (every weight of the model, not only the tables), then
   ``apply_masks``: masked values are zero and never updated.
3. Train normally (``models/train.py``), e.g. ``fit``'s loop, which runs these steps for a
   model with PEP tables (``train.search_pep_mask``).

``compression_report`` gives what the paper counts (non-zero values) and the real serving bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .distributed import World
from .dlrm import CTRModel
from .embeddings.pep import PEPTable, share_thresholds
from .trainer import TrainConfig, Trainer
from .transform import TransformedBatch


@dataclass(frozen=True)
class SearchConfig:
    #: Fraction of the full values (rows * dim, over all the model's tables) to keep, in (0, 1).
    #: A budget of B values is ``target = B / sum(rows * dim)``.
    target: float
    #: Log-growth of the thresholds' scale per training step (logits of ``s``, while ``g`` is
    #: small). 0.01 reaches 10% on Frappe in 800 to 1,600 steps.
    drift: float = 0.01
    #: The search fails past this many steps without reaching ``target``.
    max_steps: int = 100_000
    #: Steps between counts of the non-zero values. Each count scans every PEP table, so huge
    #: tables want a larger value; the mask is then taken up to ``check_every - 1`` steps late,
    #: below the target by what those steps pruned.
    check_every: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.target < 1:
            raise ValueError(f"target is a fraction of the full values, in (0, 1); "
                             f"got {self.target}")


@dataclass
class SearchResult:
    #: Table name -> bool [rows, dim], the values kept.
    masks: dict[str, torch.Tensor]
    #: The model's state dict before the search (on CPU).
    initial_state: dict[str, torch.Tensor]
    steps: int
    nonzeros: int
    full: int
    #: One record per count: step, non-zero fraction, mean loss since the previous count.
    history: list[dict] = field(default_factory=list)


def pep_tables(model: CTRModel) -> dict[str, PEPTable]:
    """The PEP tables of ``model`` by table name."""
    tables = zip(model.table_names, model.embedding_tables(), strict=True)
    return {name: table for name, table in tables if isinstance(table, PEPTable)}


def nonzero_count(model: CTRModel) -> tuple[int, int]:
    """Values of all the model's tables (non-zero ones, for PEP tables), and the full count.

    Tables of other schemes count their ``parameter_count``, which the search does not change.
    """
    tables = model.embedding_tables()
    return (sum(t.parameter_count() for t in tables), sum(t.num_embeddings * t.dim for t in tables))


def shuffled_batches(trainer: Trainer, batches: Callable[[], Iterable[TransformedBatch]]
                     ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Endless epochs of ``batches()``, each chunk shuffled and cut as ``Trainer.epoch`` does."""
    size = trainer.config.batch_size
    while True:
        empty = True
        for chunk in batches():
            labels = chunk.training_labels()
            order = trainer.rng.permutation(len(chunk))
            for start in range(0, len(order), size):
                index = order[start:start + size]
                empty = False
                yield chunk.dense[index], chunk.sparse[index], labels[index]
        if empty:
            raise ValueError("batches() gave no training rows")


def search_mask(model: CTRModel, batches: Callable[[], Iterable[TransformedBatch]],
                config: SearchConfig, train_config: TrainConfig,
                unseen_ids: np.ndarray | None = None, world: World | None = None) -> SearchResult:
    """Trains ``model`` in place until its tables keep ``config.target`` of their full values.

    Only the PEP tables shrink; the others count as they are. ``batches`` gives one epoch of
    training chunks per call. Shares the ``global`` / ``dimension`` thresholds first
    (``share_thresholds``). Raises if ``config.max_steps`` pass first. ``train_config`` gives
    the batch size, learning rates, seed and device (its ``epochs`` is not used), and with
    ``unseen_ids`` the share of values hidden as unknown (``trainer.hide_values``), so the rows
    of unknown values are trained, and judged by the mask, like the others. With ``world`` every
    process searches on its rows, the thresholds' gradients averaged like the others; the
    replicas stay identical, so every process stops at the same step with the same masks.
    """
    tables = pep_tables(model)
    if not tables:
        raise ValueError("the model has no PEP tables to search")
    nonzeros, full = nonzero_count(model)
    fixed = nonzeros - sum(table.parameter_count() for table in tables.values())
    if fixed > config.target * full:
        raise ValueError(f"the tables that are not PEP alone keep {fixed / full:.4f} of the "
                         f"values, above the target {config.target}")
    share_thresholds(model)
    initial_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    trainer = Trainer(model, train_config, unseen_ids, world)
    growth = math.exp(config.drift)
    history: list[dict] = []
    loss_sum, losses = 0.0, 0
    for step, batch in enumerate(shuffled_batches(trainer, batches), start=1):
        loss_sum += trainer.step(*batch)
        losses += 1
        for table in tables.values():
            table.threshold_scale *= growth
        if step % config.check_every and step < config.max_steps:
            continue
        nonzeros, _ = nonzero_count(model)
        history.append({"step": step, "fraction": nonzeros / full, "loss": loss_sum / losses})
        loss_sum, losses = 0.0, 0
        if nonzeros <= config.target * full:
            masks = {name: table.current_mask().cpu() for name, table in tables.items()}
            return SearchResult(masks, initial_state, step, nonzeros, full, history)
        if step >= config.max_steps:
            break
    raise RuntimeError(
        f"PEP search kept {history[-1]['fraction']:.4f} of the values after "
        f"{config.max_steps} steps, above the target {config.target}: raise drift or max_steps"
    )


def apply_masks(model: CTRModel, masks: dict[str, torch.Tensor]) -> None:
    """Puts the named PEP tables in their retrain form (``PEPTable.fix_mask``)."""
    tables = pep_tables(model)
    missing = set(masks) - set(tables)
    if missing:
        raise ValueError(f"no PEP table named {', '.join(sorted(missing))}")
    for name, mask in masks.items():
        tables[name].fix_mask(mask)


def rewind(model: CTRModel, result: SearchResult) -> None:
    """The lottery ticket: the model's weights from before the search, with the search's masks."""
    model.load_state_dict(result.initial_state)
    apply_masks(model, result.masks)


def compression_report(model: CTRModel) -> dict:
    """Values (non-zero ones, for PEP: what the paper counts) and serving bytes of all tables."""
    nonzeros, full = nonzero_count(model)
    tables = model.embedding_tables()
    stored = sum(t.inference_bytes() for t in tables)
    full_bytes = sum(t.full_bytes() for t in tables)
    return {"nonzeros": nonzeros, "full_values": full, "kept_fraction": nonzeros / full,
            "bytes": stored, "full_bytes": full_bytes, "ratio": full_bytes / stored}
