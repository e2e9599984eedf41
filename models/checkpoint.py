"""A training checkpoint is a directory of plain files:

- ``config.json``: model, data, training and transform settings, table summaries, metrics;
- ``transform/``: the fitted feature transform (``FeatureTransform.save``);
- ``weights.pt``: the model's state dict, read back with ``torch.load(weights_only=True)``;
- ``spec.json``: the data's column spec (``DatasetSpec``), to pass as ``--spec`` for more data
  of the same columns, or to edit (``ctrserve train`` may have inferred it).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .dlrm import CTRModel, ModelConfig, build_model
from .transform import FeatureTransform

FORMAT_VERSION = 1


@dataclass
class Checkpoint:
    model: CTRModel
    transform: FeatureTransform
    config: dict

    @property
    def model_config(self) -> ModelConfig:
        return self.model.config


def save_checkpoint(directory: str | Path, model: CTRModel, transform: FeatureTransform,
                    config: dict) -> None:
    """Writes the checkpoint into a temporary sibling and renames it into place."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        record = {
            "format_version": FORMAT_VERSION,
            **config,
            "model": model.config.to_dict(),
            "n_dense": model.n_dense,
            "table_names": model.table_names,
            "table_sizes": transform.table_sizes,
            "tables": model.table_summaries(),
        }
        (staging / "config.json").write_text(json.dumps(record, indent=2) + "\n")
        transform.save(staging / "transform")
        transform.spec.save(staging / "spec.json")
        torch.save(model.state_dict(), staging / "weights.pt")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def load_checkpoint(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: {config_path} is missing")
    config = json.loads(config_path.read_text())
    if config.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{config_path}: unsupported format_version {config.get('format_version')!r}"
        )
    transform = FeatureTransform.load(directory / "transform")
    model = build_model(
        config["n_dense"], config["table_sizes"], config["table_names"],
        ModelConfig.from_dict(config["model"]),
    )
    state = torch.load(directory / "weights.pt", map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.eval()
    return Checkpoint(model=model, transform=transform, config=config)
