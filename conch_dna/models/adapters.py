"""LoRA adapters in mlx-lm's format: applying them to a student, writing them (and training
checkpoints) to disk safely, and loading them back."""

from __future__ import annotations

import json
from pathlib import Path

from conch_dna.system.fsutil import atomic_write, atomic_write_json, private_dir

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

ADAPTER_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
# A checkpoint's optimizer state (Adam's moments, its step): what a resumed run needs, beside the
# weights, to go on as if it had never stopped. Not part of an adapter. (MLX's random key cannot be
# set, only seeded, so with LoRA dropout a resumed run draws other, equally random, masks.)
OPTIMIZER_FILE = "optimizer.safetensors"
KD_METRICS_FILE = "kd_metrics.json"  # what a run measured, next to the adapter it wrote


def apply_lora(model, num_layers: int, rank: int, scale: float, dropout: float) -> dict:
    """Freeze the model and put LoRA layers on its last num_layers blocks (mlx-lm's own layers).

    Returns the adapter_config fields mlx-lm's load_adapters needs to rebuild the same layers.
    """
    # here, not at the top: mlx_lm imports transformers (2 s), and the config, which every `conch` command
    # reads, imports this module
    from mlx_lm.tuner.utils import linear_to_lora_layers

    num_layers = min(num_layers, len(model.layers)) if num_layers > 0 else len(model.layers)
    lora_parameters = {"rank": rank, "scale": scale, "dropout": dropout}
    model.freeze()
    linear_to_lora_layers(model, num_layers, lora_parameters)
    return {"fine_tune_type": "lora", "num_layers": num_layers, "lora_parameters": lora_parameters}


PROJECTION_FILE = "hidden_projection.safetensors"  # training only (the hidden-state loss's projection)
PROJECTION = "hidden_projection"  # the student's attribute holding the hidden-state loss's projection
_TRAINING_ONLY = PROJECTION + "."


def adapter_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_inference_adapter(directory: str | Path, model, config: dict) -> Path:
    """save_adapter of what inference loads; parameters that only training uses (the hidden-state
    projection) go to their own file beside it."""
    weights = adapter_weights(model)
    directory = save_adapter(directory, {k: v for k, v in weights.items() if not k.startswith(_TRAINING_ONLY)},
                             config)
    extra = {k: v for k, v in weights.items() if k.startswith(_TRAINING_ONLY)}
    if extra:
        atomic_write(directory / PROJECTION_FILE, lambda p: mx.save_safetensors(p, extra))
    return directory


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
    if (Path(directory) / PROJECTION_FILE).exists():
        weights |= mx.load(str(Path(directory) / PROJECTION_FILE))
    own = adapter_weights(model)
    # training-only parameters may be missing (an adapter trained without them): they start fresh
    needed = {k for k in own if not k.startswith(_TRAINING_ONLY)}
    if not needed <= set(weights) <= set(own) or any(weights[k].shape != own[k].shape for k in weights):
        return False
    model.load_weights(list(weights.items()), strict=False)
    return True


def save_checkpoint(directory: str | Path, model, optimizer, config: dict) -> Path:
    """An adapter plus the optimizer state, so training can resume where it was."""
    directory = save_adapter(directory, adapter_weights(model), config)
    state = {f"optimizer.{k}": v for k, v in tree_flatten(optimizer.state)}
    atomic_write(directory / OPTIMIZER_FILE, lambda p: mx.save_safetensors(p, state))
    return directory


def load_optimizer_state(optimizer, model, directory: str | Path) -> bool:
    """Restore a checkpoint's optimizer state into a fresh optimizer for `model`'s adapter.

    Returns False (and restores nothing) when the checkpoint has none or it does not fit, e.g. a
    checkpoint written before optimizer state was kept, or a different LoRA rank. Call it before
    compiling the step: the compiled step holds the optimizer's state dict.
    """
    path = Path(directory) / OPTIMIZER_FILE
    if not path.exists():
        return False
    state = {k.removeprefix("optimizer."): v for k, v in mx.load(str(path)).items()}
    own = adapter_weights(model)
    slots = {k: v for k, v in state.items() if k not in ("step", "learning_rate")}  # Adam: <param>.m / .v
    if "step" not in state or {k.rpartition(".")[0] for k in slots} != set(own) or \
            any(v.shape != own[k.rpartition(".")[0]].shape for k, v in slots.items()):
        return False
    optimizer.state = tree_unflatten(list(state.items()))
    return True
