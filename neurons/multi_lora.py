"""LoRA layers that give each row of a batch its own adapter, over base weights shared by all.

Every adapter in use is stacked into one (slots, in, rank) and one (slots, rank, out) array per
layer, and each row gathers its own slot with `mx.gather_mm`: the BGMV of Punica and S-LoRA. The
base weights are never copied per adapter; a row of the base model uses a slot of zeros.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.tuner.lora import LoRALinear


class Adapter:
    """One version's LoRA weights (numpy, read off the MLX thread), made MLX arrays on first use.

    Every call holds the Adapter it started on; once no call, pin or domain holds it, it is freed.
    """

    def __init__(self, version: str, weights: dict):
        self.version = version
        self._numpy = weights
        self._arrays: dict[str, mx.array] | None = None

    def arrays(self) -> dict[str, mx.array]:
        """The weights as MLX arrays (call it on the MLX thread only)."""
        if self._arrays is None:
            self._arrays = {k: mx.array(v) for k, v in self._numpy.items()}
            self._numpy = None  # one copy is enough
        return self._arrays

    def __repr__(self) -> str:
        return f"Adapter({self.version!r})"


class MultiLoRALinear(nn.Module):
    """A linear layer plus, per row, scale · (x @ A[slot]) @ B[slot] (mlx-lm's LoRALinear, batched)."""

    def __init__(self, lora: LoRALinear, rows: RowAdapters):
        super().__init__()
        self.linear = lora.linear
        self.scale = lora.scale
        self._rows = rows  # shared by every layer: which slot each row of this step uses
        self._stacked: tuple[mx.array, mx.array] | None = None

    def __call__(self, x):
        y = self.linear(x)
        a, b = self._stacked
        slots = self._rows.slots
        z = mx.gather_mm(mx.gather_mm(x, a, rhs_indices=slots), b, rhs_indices=slots)
        return y + (self.scale * z).astype(x.dtype)


class RowAdapters:
    """The adapters stacked into a model's LoRA layers, and the slot each row of a step uses."""

    def __init__(self, model):
        self.layers: dict[str, MultiLoRALinear] = {}
        replaced = []
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                replaced.append((name, MultiLoRALinear(module, self)))
            elif type(module).__name__.startswith("LoRA"):
                raise TypeError(f"per-row adapters need plain LoRA linear layers; {name} is a "
                                f"{type(module).__name__}")
        if not replaced:
            raise TypeError("the model has no LoRA layers to serve adapters through")
        model.update_modules(_unflatten_modules(replaced))
        self.layers = dict(replaced)
        self.stacked: tuple[Adapter, ...] = ()
        self.slots: mx.array | None = None

    def hold(self, adapters) -> None:
        """Stack exactly these adapters (rebuilt only when the set changes), so an adapter that
        no running or starting row uses is let go."""
        unique = tuple({id(a): a for a in adapters}.values())
        if set(map(id, unique)) != set(map(id, self.stacked)):
            self._stack(unique)

    def select(self, adapters: list[Adapter]) -> None:
        """Set the adapter of each row of the next forward pass (row i uses adapters[i])."""
        index = {id(a): i for i, a in enumerate(self.stacked)}
        self.slots = mx.array([index[id(a)] for a in adapters], dtype=mx.uint32)

    def release(self) -> None:
        """Let go of every stacked adapter (nothing is running)."""
        self.stacked, self.slots = (), None
        for layer in self.layers.values():
            layer._stacked = None

    def _stack(self, adapters: tuple[Adapter, ...]) -> None:
        weights = [a.arrays() for a in adapters]
        for name, layer in self.layers.items():
            layer._stacked = (mx.stack([w[f"{name}.lora_a"] for w in weights]),
                              mx.stack([w[f"{name}.lora_b"] for w in weights]))
        self.stacked = adapters


def lora_shapes(model) -> dict[str, tuple[tuple, str]]:
    """Name -> (shape, dtype) of every LoRA weight a version must provide (before RowAdapters)."""
    own = dict(tree_flatten(model.trainable_parameters()))
    return {k: (tuple(v.shape), str(v.dtype).rpartition(".")[2]) for k, v in own.items()}


def _unflatten_modules(pairs: list[tuple[str, nn.Module]]):
    from mlx.utils import tree_unflatten

    return tree_unflatten(pairs)
