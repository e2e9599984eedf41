"""Row quantization of a trained table: the cheap baseline the compressed schemes compete with.

A table is trained in fp32 and quantized after training; nothing here trains or fine-tunes.

- ``int8``: row-wise asymmetric quantization. Row ``i`` keeps ``offset[i] = min(row)`` and
  ``scale[i] = (max(row) - min(row)) / 255`` (both fp32), and each value becomes the uint8 code
  ``round((x - offset[i]) / scale[i])``, rounded to nearest (ties to even). Serving reads
  ``offset[i] + scale[i] * code``. In exact arithmetic the error of every value is at most
  ``scale[i] / 2``; fp32 arithmetic adds a few ulps of the row's magnitude on top. A constant row
  (max == min) gets ``scale = 0`` and codes 0, so it comes back exactly as its offset.
  Cost per row: ``dim`` bytes of codes plus 8 bytes of scale and offset, so the ratio to fp32 is
  ``4 * dim / (dim + 8)``: 2.67x at ``dim = 16``, 3.56x at 64; at ``dim <= 2`` it is larger
  than the fp32 row. The scale and offset stay fp32 (FBGEMM's 8-bit row-wise format does the
  same): fp16 metadata would save 4 bytes per row but put the offset's own rounding error,
  ``2**-11 * |min|``, on top of the bound above.
- ``fp16``: the weights stored as float16, rounded to nearest: relative error at most ``2**-11``
  for normal values, absolute error at most ``2**-25`` for subnormal ones. Half the fp32 bytes.

Codes, scales and weights are buffers, not parameters: they are not trained, and a state dict
round trip restores them bit for bit into a table built empty from ``(num_embeddings, dim,
kind)``, which is how a checkpoint is reloaded.
"""

from __future__ import annotations

import torch

from .base import EmbeddingTable
from .constants import FLOAT32_BYTES
from .full import FullTable

KINDS: tuple[str, ...] = ("int8", "fp16")

INT8_LEVELS = 255
UINT8_BYTES = 1
FLOAT16_BYTES = 2
#: Bytes of per-row metadata for int8: an fp32 scale and an fp32 offset.
INT8_ROW_METADATA_BYTES = 2 * FLOAT32_BYTES


def int8_bytes(rows: int, dim: int) -> int:
    """Bytes of an int8 table: a uint8 code per value, an fp32 scale and offset per row."""
    return rows * dim * UINT8_BYTES + rows * INT8_ROW_METADATA_BYTES


def fp16_bytes(rows: int, dim: int) -> int:
    """Bytes of an fp16 table."""
    return rows * dim * FLOAT16_BYTES


def quantize_int8(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 rows [n, D] -> (uint8 codes [n, D], fp32 scale [n], fp32 offset [n])."""
    offset = rows.min(dim=1).values
    scale = (rows.max(dim=1).values - offset) / INT8_LEVELS
    # Constant rows have scale 0: divide them by 1 instead, which gives codes 0.
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))
    levels = torch.round((rows - offset[:, None]) / divisor[:, None])
    codes = levels.clamp_(0, INT8_LEVELS).to(torch.uint8)
    return codes, scale, offset


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., D] with their rows' scale and offset [...] -> fp32 [..., D]."""
    return offset.unsqueeze(-1) + scale.unsqueeze(-1) * codes.to(torch.float32)


class QuantizedTable(EmbeddingTable):
    """A table of quantized rows, reported as scheme ``int8`` or ``fp16``.

    Built empty (all zeros); fill it with ``quantize_table`` or ``load_state_dict``. Its buffers
    are ``codes``, ``scale`` and ``offset`` (int8) or ``weight`` (fp16).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    weight: torch.Tensor

    def __init__(self, num_embeddings: int, dim: int, kind: str) -> None:
        super().__init__(num_embeddings, dim)
        if kind not in KINDS:
            raise ValueError(f"quantization kind must be one of {', '.join(KINDS)}, got {kind!r}")
        self.scheme = kind
        if kind == "int8":
            self.register_buffer("codes", torch.zeros(num_embeddings, dim, dtype=torch.uint8))
            self.register_buffer("scale", torch.zeros(num_embeddings, dtype=torch.float32))
            self.register_buffer("offset", torch.zeros(num_embeddings, dtype=torch.float32))
        else:
            self.register_buffer("weight", torch.zeros(num_embeddings, dim, dtype=torch.float16))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.scheme == "int8":
            return dequantize_int8(self.codes[ids], self.scale[ids], self.offset[ids])
        return self.weight[ids].to(torch.float32)

    def settings(self) -> dict:
        return {}

    def parameter_count(self) -> int:
        """The stored values, ``n * D``: the same count as the fp32 table, in fewer bits."""
        return self.num_embeddings * self.dim

    def inference_bytes(self) -> int:
        if self.scheme == "int8":
            return int8_bytes(self.num_embeddings, self.dim)
        return fp16_bytes(self.num_embeddings, self.dim)

    def inference_tensors(self) -> dict[str, torch.Tensor]:
        if self.scheme == "int8":
            return {"codes": self.codes, "scale": self.scale, "offset": self.offset}
        return {"weight": self.weight}


def quantize_table(table: EmbeddingTable, kind: str) -> QuantizedTable:
    """Quantizes a trained ``FullTable``; the result lives on the table's device.

    Only full tables are accepted: materialising a hashed or compositional table into ``n``
    quantized rows would store more than the compressed table it came from.
    """
    if not isinstance(table, FullTable):
        raise TypeError(f"only full tables can be quantized, got scheme {table.scheme!r}")
    rows = table.table.weight.detach().to(torch.float32)
    if not torch.isfinite(rows).all():
        raise ValueError("cannot quantize a table holding non-finite values")
    quantized = QuantizedTable(table.num_embeddings, table.dim, kind).to(rows.device)
    if kind == "int8":
        codes, scale, offset = quantize_int8(rows)
        quantized.codes.copy_(codes)
        quantized.scale.copy_(scale)
        quantized.offset.copy_(offset)
    else:
        weight = rows.to(torch.float16)
        if not torch.isfinite(weight).all():
            raise ValueError("table values beyond the float16 range (|x| > 65504)")
        quantized.weight.copy_(weight)
    return quantized

