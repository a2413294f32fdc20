"""One KD step: the loss's gradients on a batch (scaled per group of parameters, LR multipliers) and the
learning-rate schedule, compiled for the student model."""

from __future__ import annotations

from fnmatch import fnmatchcase
from functools import partial

from conch_dna.system import distributed
from conch_dna.training.hidden import kd_hidden_loss, student_layers
from conch_dna.training.kd_config import KDConfig
from conch_dna.training.losses import (
    kd_loss,
)

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map, tree_unflatten


def multiplier_tree(model, patterns: dict[str, float]):
    """Each trainable parameter's learning-rate multiplier (the last pattern matching its dotted name
    wins, 1 where none does) as a tree like model.trainable_parameters(); None when all are 1.

    Raises ValueError naming a pattern that matches no trainable parameter (a typo freezes nothing).
    """
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    for pattern in patterns:
        if not any(fnmatchcase(name, pattern) for name in names):
            raise ValueError(f"learning-rate multiplier pattern {pattern!r} matches no trainable parameter "
                             f"(their names look like {names[0]!r})")
    scale = {name: 1.0 for name in names}
    for pattern, multiplier in patterns.items():
        scale.update((name, multiplier) for name in names if fnmatchcase(name, pattern))
    return tree_unflatten(list(scale.items())) if any(m != 1.0 for m in scale.values()) else None


def _scaled(multiplier: float, new, old):
    """The optimizer's step scaled by a multiplier: Adam ignores a gradient's scale, so the step is
    what gets scaled; 0 keeps the very same array (a frozen parameter stays bit-identical)."""
    if multiplier == 0.0:
        return old
    return new if multiplier == 1.0 else old + multiplier * (new - old)


def make_kd_step(model, optimizer, config: KDConfig, scale=None):
    """The compiled training step: one batch in, LoRA updated, (combined, kd, ce) out.

    `scale` (multiplier_tree) multiplies each parameter's step.
    """
    if config.hidden_weight > 0:
        layers = student_layers(config.hidden_layers, len(model.layers))
        loss = partial(kd_hidden_loss, layers=layers, hidden_kind=config.hidden_loss,
                       hidden_weight=config.hidden_weight)
    else:
        loss = kd_loss
    loss_and_grad = nn.value_and_grad(
        model, lambda m, *batch: loss(m, *batch, temperature=config.temperature, alpha=config.alpha,
                                      kind=config.divergence, beta=config.jsd_beta))
    state = [model.state, optimizer.state, mx.random.state]

    world = distributed.size()

    # Token counts stay outside: mx.compile rejects an output that depends on inputs alone.
    def step(*batch):
        (combined, kd, ce), grads = loss_and_grad(model, *batch)
        if world > 1:  # data-parallel: each rank's mean weighted by its share of the global batch's tokens
            local = batch[2].sum().astype(mx.float32)
            # one all-reduce of the scalars and one of the gradients: on a wire, latency is what a step pays
            sums = mx.distributed.all_sum(mx.stack([local, combined * local, kd * local, ce * local]))
            grads = nn.average_gradients(tree_map(lambda g: g * (local * world / sums[0]), grads))
            combined, kd, ce = sums[1] / sums[0], sums[2] / sums[0], sums[3] / sums[0]
        if scale is None:
            optimizer.update(model, grads)
        else:
            params = model.trainable_parameters()
            model.update(tree_map(_scaled, scale, optimizer.apply_gradients(grads, params), params))
        return combined, kd, ce

    return mx.compile(step, inputs=state, outputs=state), state


def learning_rate_schedule(config: KDConfig):
    """Linear warmup over the first 10% of steps, then cosine decay to 10% of the peak.

    LoRA starts at zero; without a warmup the first Adam steps overshoot at the scales mlx-lm uses.
    """
    warmup = max(1, config.num_iters // 10)
    peak = config.learning_rate
    decay = optim.cosine_decay(peak, max(1, config.num_iters - warmup), end=0.1 * peak)
    return optim.join_schedules([optim.linear_schedule(0.1 * peak, peak, warmup), decay], [warmup])


