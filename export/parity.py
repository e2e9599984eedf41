"""Does the ONNX graph compute what the torch model computes? Checked on the batches that break
exports: random rows, every table's largest id, ids near 2**31 and 2**40 where a table's id space
reaches them, the missing and out-of-vocabulary ids (0 and 1), and batch sizes 1, 7 and 4096."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch

from ctrserve.models.dlrm import CTRModel
from ctrserve.models.transform import MISSING_ID, OOV_ID

from .graph import DENSE_INPUT, SPARSE_INPUT

TOLERANCE = 1e-5
BATCH_SIZES = (1, 7, 4096)
#: Ids past the float32-exact range and past int32, tried wherever a table has that many rows.
LARGE_IDS = (2**24 + 1, 2**31 - 1, 2**31, 2**31 + 1, 2**40 - 1, 2**40, 2**40 + 3)


@dataclass(frozen=True)
class ParityResult:
    max_abs_diff: float
    rows: int
    batches: list[str]
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "tolerance": self.tolerance,
                "rows": self.rows, "batches": self.batches, "passed": self.passed}


def edge_ids(rows: int) -> list[int]:
    """The ids of one table worth trying: reserved ids, the last id, large ids in range."""
    candidates = [MISSING_ID, OOV_ID, rows - 1, rows - 2, *LARGE_IDS]
    return sorted({i for i in candidates if 0 <= i < rows})


def parity_batches(table_sizes: list[int], n_dense: int,
                   seed: int = 0) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(description, dense float32 [N, n_dense], sparse int64 [N, n_tables]) batches."""
    rng = np.random.default_rng(seed)
    sizes = np.array(table_sizes, dtype=np.int64)

    def dense(n: int) -> np.ndarray:
        # Transformed dense values are signed log1p of counts: mostly 0..10, some negative.
        return (rng.standard_normal((n, n_dense)) * 3).astype(np.float32)

    batches = []
    for size in BATCH_SIZES:
        sparse = (rng.random((size, len(sizes))) * sizes).astype(np.int64)
        batches.append((f"random rows, batch {size}", dense(size), sparse))
    per_table = [edge_ids(int(n)) for n in sizes]
    longest = max(len(ids) for ids in per_table)
    sparse = np.stack([np.resize(np.array(ids), longest) for ids in per_table], axis=1)
    batches.append(("edge ids (0 missing, 1 out of vocabulary, last id, ids >= 2**24 in range)",
                    dense(longest), sparse))
    return batches


def session_options() -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return options


@torch.no_grad()
def check_parity(model: CTRModel, session: ort.InferenceSession, seed: int = 0) -> ParityResult:
    """Max |p_torch - p_onnx| over the parity batches."""
    model.eval()
    sizes = [table.num_embeddings for table in model.embedding_tables()]
    worst, rows, names = 0.0, 0, []
    for description, dense, sparse in parity_batches(sizes, model.n_dense, seed):
        expected = torch.sigmoid(model(torch.from_numpy(dense), torch.from_numpy(sparse))).numpy()
        feed = {SPARSE_INPUT: sparse}
        if model.n_dense:
            feed[DENSE_INPUT] = dense
        (actual,) = session.run(None, feed)
        if actual.shape != expected.shape:
            raise ValueError(f"{description}: ONNX gave shape {actual.shape}, torch "
                             f"{expected.shape}")
        worst = max(worst, float(np.abs(actual.astype(np.float64) - expected).max()))
        rows += len(sparse)
        names.append(description)
    return ParityResult(max_abs_diff=worst, rows=rows, batches=names)
