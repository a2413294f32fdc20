"""Layer-wise distillation: the student's hidden states pulled toward the teacher's at mapped layers.

A mapped student block's output at each answer position is compared with the teacher's at its
mapped block, through a learned linear projection when the widths differ (trained with the LoRA,
saved beside the adapter, never needed at inference). Both losses are scale-free, so one weight
suits any model: "mse" is ‖s - t‖² / ‖t‖², "cosine" is 1 - cos(s, t), each averaged over the
mapped layers and the answer positions. Block outputs are read by tapping `model.layers` (the list
every mlx-lm model exposes, the one LoRA is put on), so no model is special-cased.
"""

from __future__ import annotations

from contextlib import contextmanager

from conch_dna.models.adapters import PROJECTION
from conch_dna.training.losses import answer_token_losses, masked_mean

import mlx.core as mx
import mlx.nn as nn

HIDDEN_LAYER_MAPS = ("depth", "origin")
HIDDEN_LOSSES = ("mse", "cosine")
DEFAULT_MAPPED = 4  # layers mapped by default


def layer_map(explicit: dict[str, int], student_layers: int, teacher_layers: int,
              origin: list[int] | None = None) -> list[tuple[int, int]]:
    """(student layer, teacher layer) pairs: `explicit` ({"3": 7, ...}) checked against both depths, or
    DEFAULT_MAPPED student layers evenly spaced up to the last, each with the teacher layer at the same
    relative depth, or, given the student's `origin` (the teacher block each of its blocks was cut from),
    with the teacher block it came from."""
    if explicit:
        pairs = sorted((int(s), t) for s, t in explicit.items())
        for s, t in pairs:
            if not (0 <= s < student_layers and 0 <= t < teacher_layers):
                raise ValueError(f"hidden_layers maps student layer {s} to teacher layer {t}; the student has "
                                 f"{student_layers} layers and the teacher {teacher_layers}")
        return pairs
    count = min(DEFAULT_MAPPED, student_layers)
    student = sorted({(j + 1) * student_layers // count - 1 for j in range(count)})
    if origin is not None and len(origin) == student_layers and max(origin) < teacher_layers:
        return [(s, origin[s]) for s in student]
    return [(s, (s + 1) * teacher_layers // student_layers - 1) for s in student]


def student_layers(explicit: dict[str, int], student_depth: int) -> list[int]:
    """The student side of layer_map (which does not depend on the teacher's depth)."""
    return [s for s, _ in layer_map(explicit, student_depth, 1 << 30)]


@contextmanager
def tapped(layers: list, indices: list[int]):
    """While inside, a call of layers[i] (i in indices) leaves its output in the yielded dict.

    The blocks keep their place in the module tree (only their class is swapped for a subclass that
    records), so parameter names, LoRA and the optimizer see the same model.
    """
    outputs: dict[int, mx.array] = {}
    originals = {}
    for i in indices:
        block = layers[i]
        cls = originals[i] = type(block)

        def call(self, *args, _i=i, _cls=cls, **kwargs):
            out = _cls.__call__(self, *args, **kwargs)
            outputs[_i] = out[0] if isinstance(out, tuple) else out
            return out

        block.__class__ = type(f"Tapped{cls.__name__}", (cls,), {"__call__": call})
    try:
        yield outputs
    finally:
        for i, cls in originals.items():
            layers[i].__class__ = cls


def hidden_states(model, inputs: mx.array, indices: list[int]) -> tuple[mx.array, mx.array]:
    """(logits, block outputs [b, n, len(indices), width]) of one forward pass."""
    with tapped(model.layers, indices) as outputs:
        logits = model(inputs)
    return logits, mx.stack([outputs[i] for i in indices], axis=2)


def hidden_loss(student: mx.array, teacher: mx.array, mask: mx.array, kind: str) -> mx.array:
    """Mean over mapped layers and masked positions; student and teacher [b, n, layers, width]."""
    student, teacher = student.astype(mx.float32), teacher.astype(mx.float32)
    if kind == "mse":
        per_layer = ((student - teacher) ** 2).sum(-1) / mx.maximum((teacher**2).sum(-1), 1e-6)
    elif kind == "cosine":
        dot = (student * teacher).sum(-1)
        norms = mx.sqrt((student**2).sum(-1) * (teacher**2).sum(-1))
        per_layer = 1.0 - dot / mx.maximum(norms, 1e-6)
    else:
        raise ValueError(f"hidden loss must be one of {', '.join(HIDDEN_LOSSES)}, got {kind!r}")
    return masked_mean(per_layer.mean(-1), mask)


def attach_projection(model, student_width: int, teacher_width: int) -> None:
    """Give the student a trainable student → teacher width projection, if the widths differ."""
    if student_width != teacher_width:
        setattr(model, PROJECTION, nn.Linear(student_width, teacher_width, bias=False))


def kd_hidden_loss(model, inputs, targets, mask, topk_ids, topk_logprobs, teacher_hidden, hidden_mask, *,
                   temperature, alpha, kind="forward_kl", beta=0.5, layers, hidden_kind, hidden_weight):
    """kd_loss plus hidden_weight · the hidden-state loss at the student `layers`, over the positions of
    `hidden_mask`; returns (combined, kd, ce) like kd_loss."""
    logits, student = hidden_states(model, inputs, layers)
    if PROJECTION in model:
        student = model[PROJECTION](student)
    kd, ce = answer_token_losses(logits, topk_ids, topk_logprobs, targets, temperature, kind, beta)
    kd, ce = masked_mean(kd, mask), masked_mean(ce, mask)
    hs = hidden_loss(student, teacher_hidden, hidden_mask, hidden_kind)
    return alpha * kd + (1.0 - alpha) * ce + hidden_weight * hs, kd, ce
