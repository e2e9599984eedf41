"""Training on several processes with torch.distributed: the process group torchrun describes, the
model replicated with DistributedDataParallel, and how its embedding gradients are averaged.

Data parallel: every process holds the whole model (compressed tables are small enough to be
replicated, which is what compressing them buys), steps its own rows (``sharded_data.py``) at
``1 / size`` of the global batch, and averages its gradients with the others' after every step,
so every replica takes the step one process would take on the whole global batch.

DDP buckets and all-reduces the dense gradients (the MLPs, PEP's small thresholds). The tables'
gradients are sparse (``nn.Embedding(sparse=True)``: only the rows a batch touched, which is
what SparseAdam updates). NCCL has no sparse all-reduce, and DDP would reduce each sparse
gradient on its own, a few collectives per table and step, and on busy cores every collective
waits for the other processes to be scheduled. So DDP leaves the tables alone, and
``TableGradients`` averages all of them after the backward pass in at most four collectives, the
same way on gloo and NCCL: the tables' counts of touched rows; every process's touched rows of
all tables, gathered (their union is what one process stepping the global batch touches); and
the tables small enough that all-reducing them whole moves fewer bytes than gathering, all
together in one all-reduce, each with one more column marking the rows touched anywhere. Either
way SparseAdam updates exactly the rows it would update in one process, with the mean gradient.

Buffers are not broadcast at each step (``broadcast_buffers=False``): every buffer is fixed when
the model is built (LMA's signatures come from rank 0, ``from_leader``) or changes the same way
on every rank (PEP's threshold scale and masks, computed from identical weights);
``replica_difference`` checks at the end of training that the replicas are still identical.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .embeddings.pep import PEPTable

A = TypeVar("A")
B = TypeVar("B")

#: What torchrun sets for each process it starts: the process group reads them.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")
#: Bytes of one index of a sparse gradient (int64).
_INDEX_BYTES = 8


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    #: Processes on this host (they share its cores).
    local_size: int
    device: torch.device

    @property
    def leads(self) -> bool:
        """Rank 0 gathers the metrics, reports and writes the checkpoint."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def start(device: torch.device) -> World:
    """Joins the process group of the processes torchrun started. On CPU everything goes through
    gloo; on GPUs each process takes the GPU of its ``LOCAL_RANK``, tensors on it go through
    NCCL, and objects (the vocabulary, metrics) through gloo."""
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(
            f"distributed training joins the processes torchrun starts and reads what it sets "
            f"({', '.join(missing)} not set): torchrun --nproc-per-node N -m ctrserve train ...")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend)
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_WORLD_SIZE"]),
                 device)


def stop() -> None:
    dist.destroy_process_group()


def training_threads(processes_on_host: int) -> int:
    """torch threads for each training process on this host: its share of the cores, less one
    for the thread that reads and transforms the next chunk (``train.prefetch``)."""
    return max(1, (os.cpu_count() or 1) // processes_on_host - 1)


# --------------------------------------------------------------------------- collectives


def from_leader(value: A) -> A:
    """``value`` as rank 0 has it, on every rank."""
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather_at_leader(world: World, value: A) -> list[A]:
    """Every rank's ``value``, in rank order, on rank 0; an empty list elsewhere."""
    gathered: list | None = [None] * world.size if world.leads else None
    dist.gather_object(value, gathered, dst=0)
    return gathered or []


def shared_work(world: World, items: list[A], work: Callable[[A], B]) -> list[B]:
    """``work(item)`` for every item, in order, on every rank; item ``i`` computed by rank
    ``i % size`` only."""
    mine = [work(item) for item in items[world.rank::world.size]]
    everyone: list[list[B]] = [[] for _ in range(world.size)]
    dist.all_gather_object(everyone, mine)
    return [everyone[i % world.size][i // world.size] for i in range(len(items))]


def sums(*numbers: float) -> list[float]:
    """Each of ``numbers`` summed over the ranks."""
    totals = torch.tensor(numbers, dtype=torch.float64)
    dist.all_reduce(totals)
    return [float(value) for value in totals]


@torch.no_grad()
def replica_difference(model: nn.Module) -> float:
    """The largest difference between a value of the model's state on any rank and on rank 0:
    0 while the replicas are identical, as data parallel training keeps them."""
    largest = torch.zeros(1, dtype=torch.float64)
    for value in model.state_dict().values():
        if not value.numel():
            continue
        # A copy, in a type every backend sends (gloo has no bool).
        leader = value.to(torch.float64, copy=True)
        dist.broadcast(leader, src=0)
        difference = (value.double() - leader).abs().max().cpu()
        largest = torch.maximum(largest, difference)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return float(largest)


# --------------------------------------------------------------------------- gradients


def sparse_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of the model's sparse-gradient embeddings that train (the tables, shared
    memories, PEP's per-row thresholds), by name, each once."""
    return {f"{name}.weight": module.weight for name, module in model.named_modules()
            if isinstance(module, nn.Embedding) and module.sparse
            and module.weight.requires_grad}


class TableGradients:
    """Averages the sparse gradients of ``parameters`` over the processes after each backward
    pass, all tables in one exchange (see the module docstring), and counts the bytes this
    process hands to the collectives: ``dense_bytes`` a step for DDP's all-reduce of the other
    gradients, and those of the tables."""

    def __init__(self, world_size: int, parameters: list[torch.Tensor], dense_bytes: int) -> None:
        self.world_size = world_size
        self.parameters = parameters
        self.dense_bytes = dense_bytes
        self.table_bytes = 0
        self.steps = 0

    def take(self) -> dict[str, float]:
        """Bytes per step since the last call; counting starts again."""
        per_step = {"dense_bytes_per_step": float(self.dense_bytes),
                    "table_bytes_per_step": self.table_bytes / max(self.steps, 1)}
        self.table_bytes = self.steps = 0
        return per_step

    def average(self) -> None:
        """Replaces each parameter's gradient by the mean over the processes, holding every row
        some process touched."""
        local = []
        for parameter in self.parameters:
            if parameter.grad is None:
                raise ValueError("every table takes part in every step; one has no gradient")
            local.append(parameter.grad.coalesce())
        counts = torch.tensor([gradient._nnz() for gradient in local],
                              device=local[0].device)
        everyone = [torch.empty_like(counts) for _ in range(self.world_size)]
        dist.all_gather(everyone, counts)
        counts_by_rank = torch.stack(everyone).cpu()
        longest = counts_by_rank.max(dim=0).values.tolist()
        whole = [self._cheaper_whole(gradient, rows)
                 for gradient, rows in zip(local, longest, strict=True)]
        means: dict[int, torch.Tensor] = {}
        self.table_bytes += counts.numel() * counts.element_size()
        chosen = [i for i, is_whole in enumerate(whole) if is_whole]
        if chosen:
            means.update(zip(chosen, self._reduce_whole([local[i] for i in chosen]),
                             strict=True))
        chosen = [i for i, is_whole in enumerate(whole) if not is_whole]
        if chosen:
            means.update(zip(chosen, self._gather([local[i] for i in chosen],
                                                  counts_by_rank[:, chosen]), strict=True))
        for index, parameter in enumerate(self.parameters):
            parameter.grad = means[index]
        self.steps += 1

    def _cheaper_whole(self, gradient: torch.Tensor, longest: int) -> bool:
        """Whether all-reducing the whole table (a ring all-reduce moves about twice its tensor
        in and out of each process) moves fewer bytes than gathering every process's rows
        (padded to the longest)."""
        rows, width = gradient.shape
        value_bytes = gradient.element_size()
        whole = rows * (width + 1) * value_bytes
        gathered = longest * (width * value_bytes + _INDEX_BYTES)
        return 2 * whole <= self.world_size * gathered

    def _reduce_whole(self, gradients: list[torch.Tensor]) -> list[torch.Tensor]:
        """Means of whole tables: each with one more column that marks the rows this process
        touched, all in one all-reduce."""
        tables = []
        for gradient in gradients:
            rows, width = gradient.shape
            table = torch.zeros(rows, width + 1, dtype=gradient.dtype, device=gradient.device)
            table[gradient.indices()[0], :width] = gradient.values()
            table[gradient.indices()[0], width] = 1
            tables.append(table)
        buffer = torch.cat([table.flatten() for table in tables])
        dist.all_reduce(buffer)
        self.table_bytes += buffer.numel() * buffer.element_size()
        means = []
        for table, summed in zip(tables, buffer.split([t.numel() for t in tables]), strict=True):
            summed = summed.view(table.shape)
            touched = summed[:, -1].nonzero().squeeze(1)
            means.append(torch.sparse_coo_tensor(
                touched.unsqueeze(0), summed[touched, :-1] / self.world_size,
                (table.shape[0], table.shape[1] - 1), check_invariants=True))
        return means

    def _gather(self, gradients: list[torch.Tensor],
                counts_by_rank: torch.Tensor) -> list[torch.Tensor]:
        """Means of tables from every process's rows: all tables' indices in one all-gather,
        their values in another, each table's part as long as its longest count of rows."""
        longest = counts_by_rank.max(dim=0).values.tolist()
        widths = [gradient.shape[1] for gradient in gradients]
        index_starts = _starts(longest)
        value_starts = _starts([n * width for n, width in zip(longest, widths, strict=True)])
        device, dtype = gradients[0].device, gradients[0].dtype
        indices = torch.zeros(sum(longest), dtype=torch.int64, device=device)
        values = torch.zeros(sum(n * width for n, width in zip(longest, widths, strict=True)),
                             dtype=dtype, device=device)
        for gradient, index_start, value_start in zip(gradients, index_starts, value_starts,
                                                      strict=True):
            count = gradient._nnz()
            indices[index_start:index_start + count] = gradient.indices()[0]
            values[value_start:value_start + count * gradient.shape[1]] = (
                gradient.values().flatten())
        all_indices = [torch.empty_like(indices) for _ in range(self.world_size)]
        all_values = [torch.empty_like(values) for _ in range(self.world_size)]
        dist.all_gather(all_indices, indices)
        dist.all_gather(all_values, values)
        self.table_bytes += (indices.numel() * indices.element_size()
                             + values.numel() * values.element_size())
        means = []
        for table, gradient in enumerate(gradients):
            index_start, value_start = index_starts[table], value_starts[table]
            width = widths[table]
            rows, row_values = [], []
            for rank_indices, rank_values, count in zip(
                    all_indices, all_values, counts_by_rank[:, table].tolist(), strict=True):
                rows.append(rank_indices[index_start:index_start + count])
                row_values.append(rank_values[value_start:value_start + count * width])
            mean = torch.cat(row_values).view(-1, width) / self.world_size
            means.append(torch.sparse_coo_tensor(torch.cat(rows).unsqueeze(0), mean,
                                                 tuple(gradient.shape), check_invariants=True))
        return means


def _starts(sizes: list[int]) -> list[int]:
    """Where each of consecutive parts of ``sizes`` starts."""
    return [0, *np.cumsum(sizes[:-1], dtype=np.int64).tolist()]


def replicate(model: nn.Module, world: World) -> tuple[DistributedDataParallel, TableGradients]:
    """``model`` wrapped by DDP for its dense parameters (DDP broadcasts rank 0's to every
    rank), and the averaging of its tables' sparse gradients, which DDP leaves alone (their
    rank 0 values broadcast here).

    A PEP table in its retrain form serves ``v * mask`` and never reads its thresholds; DDP waits
    for a gradient of every parameter that requires one, so they stop requiring one.
    """
    for table in model.modules():
        if isinstance(table, PEPTable) and table.masked:
            table.threshold.requires_grad_(False)
    tables = sparse_parameters(model)
    for parameter in tables.values():
        dist.broadcast(parameter.data, src=0)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, list(tables))
    dense = [p for p in model.parameters()
             if p.requires_grad and all(p is not t for t in tables.values())]
    device_ids = [world.device] if world.device.type == "cuda" else None
    with warnings.catch_warnings():
        # torch 2.13 renames the flag forward_sync_buffers; the name torch 2.4 knows still works.
        warnings.filterwarnings("ignore", "`broadcast_buffers` is deprecated", FutureWarning)
        replica = DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)
    dense_bytes = sum(p.numel() * p.element_size() for p in dense)
    return replica, TableGradients(world.size, list(tables.values()), dense_bytes)
