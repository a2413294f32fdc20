"""LoRA adapters in mlx-lm's format: applying them to a student, and writing them to disk safely."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.utils import linear_to_lora_layers

from conch_dna.fsutil import atomic_write, atomic_write_json, private_dir

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"


def apply_lora(model, num_layers: int, rank: int, scale: float, dropout: float) -> dict:
    """Freeze the model and put LoRA layers on its last num_layers blocks (mlx-lm's own layers).

    Returns the adapter_config fields mlx-lm's load_adapters needs to rebuild the same layers.
    """
    num_layers = min(num_layers, len(model.layers)) if num_layers > 0 else len(model.layers)
    lora_parameters = {"rank": rank, "scale": scale, "dropout": dropout}
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}


def adapter_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(directory: str | Path, weights: dict[str, mx.array], config: dict) -> Path:
    """Write adapters.safetensors + adapter_config.json, each by temporary file and rename."""
    directory = private_dir(directory)
    atomic_write(directory / ADAPTER_FILE, lambda p: mx.save_safetensors(p, weights))
    atomic_write_json(directory / CONFIG_FILE, config)
    return directory


def read_adapter_config(directory: str | Path) -> dict:
    return json.loads((Path(directory) / CONFIG_FILE).read_text())


def load_adapter_weights(model, directory: str | Path) -> bool:
    """Load an adapter's weights into a model that already has matching LoRA layers.

    Returns False (and loads nothing) when the shapes differ, e.g. a different LoRA rank.
    """
    weights = mx.load(str(Path(directory) / ADAPTER_FILE))
    own = adapter_weights(model)
    if set(weights) != set(own) or any(weights[k].shape != own[k].shape for k in own):
        return False
    model.load_weights(list(weights.items()), strict=False)
    return True
