"""PEP: learnable embedding sizes by soft-thresholded pruning (Liu et al., ICLR 2021).

A table holds a plain weight ``v [n, D]`` and serves ``v' = sign(v) * relu(|v| - g(s))`` with
``g = sigmoid`` and a learnable threshold logit ``s`` at one granularity:

================== ======================= ==========================================
granularity        shape of ``s``          shared by
================== ======================= ==========================================
global             ``[1]``                 every PEP table of a model (``share_thresholds``)
dimension          ``[D]``                 every PEP table of a model (``share_thresholds``)
field              ``[1]``                 this table only
field_dimension    ``[D]``                 this table only
feature            ``[n, 1]``              this table only (a sparse-gradient embedding)
feature_dimension  ``[n, D]``              this table only (a sparse-gradient embedding)
================== ======================= ==========================================

The per-row thresholds are ``nn.Embedding(sparse=True)`` weights, so the project's optimizers
give them SparseAdam like ``v``; the small ones are dense parameters that Adam updates. Sharing:
a table built for ``global`` or ``dimension`` owns its threshold until ``share_thresholds(model)``
makes every such table of the model use one ``nn.Parameter`` (or a caller passes one as
``shared_threshold``). Call it before the optimizers are built: they must see one parameter.
``forward`` gathers the rows (and per-row thresholds) of the requested ids and thresholds only
those; the whole thresholded table is never built during training.

The pitfall, and the pressure used here
---------------------------------------
The reference initialises ``s`` at -15 or -150. ``sigmoid(-150)`` underflows to 0 in fp32; at -15
the loss gradient on ``s`` is ``g'(s) ~ 3e-7`` times an upstream gradient of ~1e-3, far under
Adam's ``eps = 1e-8``, so Adam's step shrinks to a few percent of its learning rate. The reference
prunes only because Adam's coupled L2 weight decay (``1e-5 * s``) is a gradient of constant sign
that Adam normalises to a step of about ``lr``: ``s`` climbs ~1e-3 logits per step, 10,000 steps
before -15 means anything. That is a schedule in disguise, and it moves every row's ``s`` at
every step because the reference thresholds the whole table at every step.

Here both ingredients are explicit:

* ``s`` starts at ``DEFAULT_THRESHOLD_INIT = logit(INIT_STD / 100)`` (-6.9): a threshold of 0.001
  against values of scale 0.1 prunes under 1% at the start, and ``g'(s0) ~ 1e-3`` leaves the loss
  a usable gradient on ``s``.
* The pressure is a schedule on the thresholds' scale: a table thresholds at
  ``threshold_scale * g(s)``, and the search multiplies the buffer ``threshold_scale`` by
  ``exp(drift)`` after every step (``models/pep_search.py``). While ``g`` is small this is
  ``g(s + log scale)``, every ``s`` raised by ``drift`` logits per step as in the reference, but
  unlike an offset inside the sigmoid it is not capped at 1: our embeddings outgrow 1 (Frappe,
  ``embedding_lr`` 0.05: mean ``|v|`` 0.1 at the start, 0.3 after 100 steps, 1.1 after 1,500, the
  largest 9.5), and with ``g(s + c)`` the search stalled at 47% non-zeros once the sigmoid
  saturated. The schedule costs O(1) per step at every granularity and reaches rows that no batch
  touches: a penalty on the gathered thresholds would move a row's ``s`` only when its id occurs,
  so rare ids (most of a large table, the ones PEP should shrink first) would keep their width.
  The learnable ``s`` and ``v`` let the loss resist where an entry matters.

Observed: on generated data (``tests/test_pep.py``) ``s`` at -15 without the schedule prunes
nothing in 300 steps (no ``s`` moved by more than 0.44); ``s0 = -6.9`` without the schedule keeps
99.0% after 300 steps, the loss pulling the mean ``s`` down (-6.91 to -7.06), so pressure is
necessary; with ``drift = 0.05`` 25% is reached in about 110 steps. On Frappe (16 wide, 5,300
rows, batch 512) ``drift = 0.01`` reaches 10% in 800 to 1,600 steps, depending on the
granularity; frequent ids keep more of their width (for the 4,084 items: 0.9 of 16 values for
ids seen 3 to 9 times, 6.4 for ids seen 100 times or more). Retrained at 10% (``field_dimension``,
three seeds, ``docs/accuracy``) the test AUC is 0.933 against 0.945 for the full model at D = 16,
and 0.943 against 0.951 at D = 64, where the wider rows leave more to prune.

Retraining and serving
----------------------
``fix_mask(mask)`` turns a table into its retrain form: ``v`` keeps only the masked-in values,
the forward is ``v * mask`` (no threshold), so masked values always serve zero, get zero
gradient and, starting at zero with fresh optimizer state (``rewind`` then a new ``Trainer``),
stay exactly zero in ``v`` too. The mask lives in ``mask_bits`` (packed, the
layout serving uses), and the mode travels in the state dict as extra state, so a checkpoint of a
retrained model loads back masked.

Serving stores, per table (``pack``): ``values`` fp32 [nnz], the kept values row-major; ``offsets``
[n + 1], where row ``i``'s values start (int32 while ``nnz < 2**31``, int64 beyond); ``mask_bits``
uint8 [n, ceil(D / 8)], bit ``j % 8`` of byte ``j // 8`` telling whether column ``j`` is kept;
``dim`` int64 [1]. A lookup (``packed_lookup``) is gathers and integer arithmetic only, expressible
in ONNX standard ops with CUDA kernels (Gather, Div and Mod to unpack the bits, CumSum, Add,
Where): unpack the row's bits, an exclusive prefix count of them gives each kept column's rank,
``offsets[id] + rank`` indexes ``values``.

Why about 9x, not 50x, at 98% pruning: a row costs ``4 p D`` bytes of values plus a fixed
``ceil(D / 8) + b`` bytes of index data (mask bits and a ``b``-byte offset), against ``4 D`` for
the full row, so the ratio is ``4 D / (4 p D + ceil(D / 8) + b)`` and the index data bounds it
by ``4 D / (ceil(D / 8) + b)`` however hard the pruning. At ``D = 16``, ``p = 0.02``, int32
offsets: values 1.28 B/row, index data 2 + 4 = 6 B/row (82% of the bytes), ratio 64 / 7.28 =
8.8x; with int64 offsets 5.7x; at ``D = 32`` 12.1x. Only at ``p`` near ``(D/8 + b) / (4 D)``
(9% at D = 16) do values and index data weigh the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from .base import EmbeddingTable, sparse_table
from .constants import FLOAT32_BYTES, INT32_BYTES, INT64_BYTES, index_bytes
from .scheme_settings import DEFAULT_THRESHOLD_INIT

GRANULARITIES: tuple[str, ...] = (
    "global", "dimension", "field", "field_dimension", "feature", "feature_dimension",
)
#: Granularities whose one threshold is meant to be shared by every PEP table of a model.
SHARED_GRANULARITIES: tuple[str, ...] = ("global", "dimension")
#: Rows handled at a time when a whole table is scanned (masks, counts, packing).
SCAN_ROWS = 1 << 16


def soft_threshold(values: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    return torch.sign(values) * torch.relu(values.abs() - threshold)


def threshold_shape(granularity: str, num_embeddings: int, dim: int) -> tuple[int, ...]:
    shapes = {
        "global": (1,), "dimension": (dim,), "field": (1,), "field_dimension": (dim,),
        "feature": (num_embeddings, 1), "feature_dimension": (num_embeddings, dim),
    }
    if granularity not in shapes:
        raise ValueError(
            f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}"
        )
    return shapes[granularity]


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [N, D] -> uint8 [N, ceil(D / 8)]; column ``j`` is bit ``j % 8`` of byte ``j // 8``."""
    rows, dim = mask.shape
    padded = torch.zeros(rows, math.ceil(dim / 8) * 8, dtype=torch.uint8, device=mask.device)
    padded[:, :dim] = mask
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    return (padded.view(rows, -1, 8) << shifts).sum(dim=2, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, dim: int) -> torch.Tensor:
    """uint8 [N, ceil(D / 8)] -> bool [N, D], the inverse of ``pack_bits``."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    unpacked = (bits.unsqueeze(-1) >> shifts) & 1
    return unpacked.reshape(bits.shape[0], bits.shape[1] * 8)[:, :dim].bool()


def packed_bytes(num_embeddings: int, dim: int, nonzeros: int) -> int:
    """Bytes of the serving layout: values, offsets, mask bits and the width."""
    return (nonzeros * FLOAT32_BYTES + (num_embeddings + 1) * index_bytes(nonzeros)
            + num_embeddings * math.ceil(dim / 8) + INT64_BYTES)


def packed_lookup(tensors: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """Rows of ``ids`` from the serving layout of ``pack``: int64 [N] -> float32 [N, D]."""
    values = tensors["values"]
    kept = unpack_bits(tensors["mask_bits"][ids], int(tensors["dim"][0]))
    counts = kept.to(torch.int64)
    rank = torch.cumsum(counts, dim=1) - counts  # kept columns before this one in the row
    index = tensors["offsets"][ids].to(torch.int64).unsqueeze(1) + rank
    if values.numel() == 0:
        return torch.zeros(kept.shape, dtype=torch.float32, device=values.device)
    gathered = values[index.clamp(max=values.numel() - 1)]  # a dropped column may point past
    return torch.where(kept, gathered, torch.zeros((), dtype=values.dtype, device=values.device))


class PEPTable(EmbeddingTable):
    """A PEP table (see the module docstring).

    The default granularity is ``field_dimension``: on Frappe at 10% of the values it did as well
    as the paper's ``feature_dimension`` (within seed noise), and its threshold is ``D`` floats
    where ``feature_dimension``'s is ``n * D`` plus as much again twice in SparseAdam state.
    """

    scheme = "pep"
    threshold_scale: torch.Tensor
    mask_bits: torch.Tensor

    def __init__(self, num_embeddings: int, dim: int, granularity: str = "field_dimension",
                 threshold_init: float = DEFAULT_THRESHOLD_INIT,
                 shared_threshold: nn.Parameter | None = None) -> None:
        super().__init__(num_embeddings, dim)
        shape = threshold_shape(granularity, num_embeddings, dim)
        self.granularity = granularity
        self.threshold_init = float(threshold_init)
        self.table = sparse_table(num_embeddings, dim)
        self.row_thresholds: nn.Embedding | None = None
        self.threshold_logits: nn.Parameter | None = None
        if granularity in ("feature", "feature_dimension"):
            if shared_threshold is not None:
                raise ValueError(f"a {granularity} threshold is per row and cannot be shared")
            self.row_thresholds = nn.Embedding(num_embeddings, shape[1], sparse=True)
            nn.init.constant_(self.row_thresholds.weight, self.threshold_init)
        elif shared_threshold is not None:
            self.share(shared_threshold)
        else:
            self.threshold_logits = nn.Parameter(torch.full(shape, self.threshold_init))
        #: The search's schedule: thresholds are ``threshold_scale * sigmoid(s)``.
        self.register_buffer("threshold_scale", torch.ones(()))
        every_column = pack_bits(torch.ones(1, dim, dtype=torch.bool))
        self.register_buffer("mask_bits", every_column.expand(num_embeddings, -1).clone())
        self.masked = False

    @property
    def threshold(self) -> torch.Tensor:
        """The learnable logits ``s`` in their granularity's shape."""
        if self.row_thresholds is not None:
            return self.row_thresholds.weight
        assert self.threshold_logits is not None
        return self.threshold_logits

    def share(self, parameter: nn.Parameter) -> None:
        """Uses ``parameter`` (owned elsewhere) as this table's threshold logits."""
        if self.granularity not in SHARED_GRANULARITIES:
            raise ValueError(f"only {' and '.join(SHARED_GRANULARITIES)} thresholds are shared")
        expected = threshold_shape(self.granularity, self.num_embeddings, self.dim)
        if tuple(parameter.shape) != expected:
            raise ValueError(f"a shared {self.granularity} threshold must have shape {expected}, "
                             f"got {tuple(parameter.shape)}")
        self.threshold_logits = parameter

    def thresholds(self, ids: torch.Tensor) -> torch.Tensor:
        """``scale * g(s)`` for the rows ``ids``, broadcastable to [len(ids), D]."""
        logits = self.row_thresholds(ids) if self.row_thresholds is not None else self.threshold
        return self.threshold_scale * torch.sigmoid(logits)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.table(ids)
        if self.masked:
            return rows * unpack_bits(self.mask_bits[ids], self.dim)
        return soft_threshold(rows, self.thresholds(ids))

    def row_blocks(self) -> Iterator[torch.Tensor]:
        device = self.table.weight.device
        for start in range(0, self.num_embeddings, SCAN_ROWS):
            yield torch.arange(start, min(start + SCAN_ROWS, self.num_embeddings), device=device)

    @torch.no_grad()
    def kept(self, ids: torch.Tensor) -> torch.Tensor:
        """Which values of rows ``ids`` are non-zero: the fixed mask, or ``|v| > scale * g(s)``."""
        if self.masked:
            return unpack_bits(self.mask_bits[ids], self.dim)
        return self.table.weight[ids].abs() > self.thresholds(ids)

    def current_mask(self) -> torch.Tensor:
        """bool [n, D]: the whole table's ``kept``."""
        return torch.cat([self.kept(ids) for ids in self.row_blocks()])

    @torch.no_grad()
    def fix_mask(self, mask: torch.Tensor) -> None:
        """Retrain form: zeroes the masked-out values and keeps them zero from now on."""
        if tuple(mask.shape) != (self.num_embeddings, self.dim) or mask.dtype != torch.bool:
            raise ValueError(f"a mask must be bool [{self.num_embeddings}, {self.dim}]")
        mask = mask.to(self.table.weight.device)
        self.table.weight.mul_(mask)
        self.mask_bits.copy_(pack_bits(mask))
        self.masked = True

    def get_extra_state(self) -> torch.Tensor:
        return torch.tensor(self.masked)

    def set_extra_state(self, state: torch.Tensor) -> None:
        self.masked = bool(state)

    def settings(self) -> dict:
        return {"granularity": self.granularity, "threshold_init": self.threshold_init,
                "masked": self.masked}

    def parameter_count(self) -> int:
        return int(sum(self.kept(ids).sum() for ids in self.row_blocks()))

    def inference_bytes(self) -> int:
        return packed_bytes(self.num_embeddings, self.dim, self.parameter_count())

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        return pack(self)


@torch.no_grad()
def pack(table: PEPTable) -> dict[str, torch.Tensor]:
    """The serving layout of ``table`` as it serves now (see the module docstring)."""
    values, bits, counts = [], [], []
    for ids in table.row_blocks():
        kept = table.kept(ids)
        values.append(table(ids)[kept])
        bits.append(pack_bits(kept))
        counts.append(kept.sum(dim=1))
    row_counts = torch.cat(counts)
    nonzeros = int(row_counts.sum())
    offset_type = torch.int32 if index_bytes(nonzeros) == INT32_BYTES else torch.int64
    offsets = torch.zeros(table.num_embeddings + 1, dtype=torch.int64, device=row_counts.device)
    offsets[1:] = torch.cumsum(row_counts, dim=0)
    return {
        "values": torch.cat(values).float(),
        "offsets": offsets.to(offset_type),
        "mask_bits": torch.cat(bits),
        "dim": torch.tensor([table.dim], dtype=torch.int64, device=row_counts.device),
    }


def share_thresholds(model: nn.Module) -> nn.Parameter | None:
    """Makes every ``global`` / ``dimension`` PEP table of ``model`` use one threshold.

    The first such table's parameter becomes everyone's; returns it (None without such tables).
    Idempotent. Mixing the two granularities, or widths, in one model is refused.
    """
    tables = [m for m in model.modules()
              if isinstance(m, PEPTable) and m.granularity in SHARED_GRANULARITIES]
    if not tables:
        return None
    if len({(t.granularity, t.dim) for t in tables}) > 1:
        raise ValueError("shared thresholds need one granularity and one width for all tables")
    shared = tables[0].threshold_logits
    assert shared is not None
    for table in tables[1:]:
        table.share(shared)
    return shared
