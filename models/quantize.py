"""After training: the tables configured ``int8`` or ``fp16``, trained as full fp32 tables
(``EmbeddingConfig.for_training``), replaced by their quantized copies
(``embeddings/quantized.py``)."""

from __future__ import annotations

from .dlrm import CTRModel
from .embeddings.full import FullTable
from .embeddings.quantized import quantize_table
from .embeddings.scheme_settings import EmbeddingConfig, QuantizedSettings
from .schemes import effective_settings


def quantize_model(model: CTRModel, config: EmbeddingConfig) -> list[str]:
    """Replaces, in place, every full table whose configured scheme is ``int8`` or ``fp16`` (and
    which its settings do not keep full: ``schemes.effective_settings``) by its quantized copy.

    Returns the names of the tables replaced.
    """
    replaced = []
    tables = model.embedding_tables()
    for index, (name, table) in enumerate(zip(model.table_names, tables, strict=True)):
        settings = effective_settings(config.for_table(name), table.num_embeddings, table.dim)
        if isinstance(settings, QuantizedSettings) and isinstance(table, FullTable):
            model.tables[index] = quantize_table(table, settings.scheme)
            replaced.append(name)
    return replaced
