"""Distillation losses: dense and sparse (cached top-k) KD, CE, and vocabulary alignment.

Conventions: logits and log-probabilities carry the vocabulary on the last axis; a `mask` is 1
for tokens that count (answer tokens) and 0 for the rest; every loss is a mean over the tokens
that count. The teacher is always the first argument, the student the second.
"""

from __future__ import annotations

import math

import mlx.core as mx

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
ALIGN_STRATEGIES = ("truncate", "token_map")
# A bucket's log-mass never goes below this: keeps 0·log(0) terms finite when the top-k ids hold
# (nearly) all of a distribution's mass.
_LOG_FLOOR = -13.8  # log(1e-6)
# A top-k entry the teacher gives no mass: padding of a capture narrower than k, or an id the
# student cannot emit. Such entries are left out of the student's buckets too (see
# student_buckets), so padding changes nothing.
PAD_LOGPROB = -30.0


def log_softmax(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def masked_mean(values: mx.array, mask: mx.array | None) -> mx.array:
    """Mean of `values` over the positions where `mask` is non-zero (all positions without one)."""
    if mask is None:
        return values.mean()
    mask = mask.astype(values.dtype)
    return (values * mask).sum() / mx.maximum(mask.sum(), 1)


def forward_kl(teacher_logp: mx.array, student_logp: mx.array) -> mx.array:
    """KL(teacher ‖ student) per position, from log-distributions over the last axis."""
    return (mx.exp(teacher_logp) * (teacher_logp - student_logp)).sum(axis=-1)


def reverse_kl(teacher_logp: mx.array, student_logp: mx.array) -> mx.array:
    """KL(student ‖ teacher) per position: mode-seeking, the student may drop teacher modes."""
    return (mx.exp(student_logp) * (student_logp - teacher_logp)).sum(axis=-1)


def generalized_jsd(teacher_logp: mx.array, student_logp: mx.array, beta: float = 0.5) -> mx.array:
    """Generalized Jensen-Shannon divergence per position (Agarwal et al., GKD):

    β·KL(P ‖ M) + (1-β)·KL(Q ‖ M) with M = β·P + (1-β)·Q, P the teacher, Q the student.
    β = 0.5 is the symmetric JSD; it is bounded, so one wild token cannot dominate a batch.
    """
    if not 0.0 < beta < 1.0:
        raise ValueError(f"jsd beta must be in (0, 1), got {beta}")
    mixture = mx.logaddexp(teacher_logp + mx.log(beta), student_logp + mx.log(1.0 - beta))
    return beta * forward_kl(teacher_logp, mixture) + (1.0 - beta) * forward_kl(
        student_logp, mixture
    )


def divergence(teacher_logp, student_logp, kind: str = "forward_kl", beta: float = 0.5):
    """The divergence named by `kind` ("forward_kl", "reverse_kl" or "jsd") per position."""
    if kind == "forward_kl":
        return forward_kl(teacher_logp, student_logp)
    if kind == "reverse_kl":
        return reverse_kl(teacher_logp, student_logp)
    if kind == "jsd":
        return generalized_jsd(teacher_logp, student_logp, beta)
    raise ValueError(f"unknown divergence {kind!r}; choose one of {', '.join(DIVERGENCES)}")


def compute_kd_loss(
    teacher_logits: mx.array,
    student_logits: mx.array,
    temperature: float = 2.0,
    mask: mx.array | None = None,
) -> mx.array:
    """KL(softmax(teacher/T) ‖ softmax(student/T)) · T², averaged over unmasked tokens.

    The T² keeps gradient magnitudes comparable across temperatures (Hinton et al., 2015).
    Vocabularies of different padded sizes are truncated to the shared ids first.
    """
    teacher_logits, student_logits = align_vocab_sizes(teacher_logits, student_logits)
    t = teacher_logits.astype(mx.float32) / temperature
    s = student_logits.astype(mx.float32) / temperature
    # mlx-lm's kl_div_loss(q, p) is KL(p ‖ q) per position, with a fused kernel on Metal. Imported here:
    # mlx_lm imports transformers (2 s), and the config every `conch` command reads imports this module.
    from mlx_lm.tuner.losses import kl_div_loss

    return masked_mean(kl_div_loss(s, t), mask) * temperature**2


def compute_ce_loss(logits: mx.array, targets: mx.array, ignore_index: int = -100) -> mx.array:
    """Cross-entropy of `targets` under `logits`, averaged over targets that are not ignore_index."""
    mask = targets != ignore_index
    _, target_logp = student_logprobs_at(logits, targets[..., None], mx.where(mask, targets, 0))
    return masked_mean(-target_logp, mask)


def with_tail_bucket(topk_logprobs: mx.array) -> mx.array:
    """Top-k log-probs plus one last bucket holding the mass outside the top k: log(1 - Σ p).

    The tail is kept instead of renormalising the top k to 1: renormalising tells the student the
    teacher is surer than it is, most of all where the teacher is unsure. Costs O(k), not O(vocab).
    """
    lp = topk_logprobs.astype(mx.float32)
    tail_mass = 1.0 - mx.exp(lp).sum(axis=-1, keepdims=True)
    tail = mx.log(mx.maximum(tail_mass, math.exp(_LOG_FLOOR)))
    return mx.concatenate([lp, tail], axis=-1)


def teacher_bucket_logprobs(topk_logprobs: mx.array) -> mx.array:
    """The teacher's cached top-k log-probs (at T = 1) as k + 1 buckets."""
    return with_tail_bucket(topk_logprobs)


def student_topk_logprobs(student_logits: mx.array, topk_ids: mx.array) -> mx.array:
    """The student's log-probs at the teacher's top-k ids, [..., k], from its logits.

    Only a logsumexp runs over the vocabulary: no [..., vocab] log-softmax is kept for the backward
    pass, so the KD step's peak memory stays that of a plain CE step at Qwen-sized vocabularies.
    """
    logits = student_logits.astype(mx.float32)
    return mx.take_along_axis(logits, topk_ids, axis=-1) - mx.logsumexp(logits, axis=-1, keepdims=True)


def student_logprobs_at(student_logits: mx.array, topk_ids: mx.array, targets: mx.array):
    """(log-probs at the teacher's top-k ids [..., k], log-prob of each target [...]) in one gather.

    The KD step and the held-out evaluation share it: one gather, because in training each gather's
    backward is a [..., vocab] scatter of its own.
    """
    gathered = student_topk_logprobs(student_logits, mx.concatenate([topk_ids, targets[..., None]], axis=-1))
    return gathered[..., :-1], gathered[..., -1]


def student_buckets(student_topk: mx.array, topk_logprobs: mx.array | None = None) -> mx.array:
    """The student's top-k log-probs as k + 1 buckets, like the teacher's.

    Entries the teacher marks as padding (PAD_LOGPROB) get no student mass either, so a padded
    id (0, repeated) is not counted into the student's top-k, which would shrink its tail.
    """
    if topk_logprobs is not None:
        student_topk = mx.where(topk_logprobs <= PAD_LOGPROB, PAD_LOGPROB, student_topk)
    return with_tail_bucket(student_topk)


def sparse_divergence(student_topk, topk_logprobs, temperature, kind, beta) -> mx.array:
    """Per position: teacher vs student over the k + 1 buckets, both softened by T, times T²."""
    t = log_softmax(teacher_bucket_logprobs(topk_logprobs) / temperature)
    s = log_softmax(student_buckets(student_topk, topk_logprobs) / temperature)
    return divergence(t, s, kind, beta) * temperature**2


def sparse_kd_from_topk(student_topk, topk_logprobs, temperature, mask, kind, beta) -> mx.array:
    """sparse_kd_loss for a caller that already has the student's top-k log-probs."""
    return masked_mean(sparse_divergence(student_topk, topk_logprobs, temperature, kind, beta), mask)


def answer_token_losses(logits, topk_ids, topk_logprobs, targets, temperature, kind,
                        beta) -> tuple[mx.array, mx.array]:
    """Per position (KD·T², CE of the target token): the terms training averages and evaluation sums.

    One logsumexp over the vocabulary serves both (student_logprobs_at). Shapes: logits [b, n, vocab],
    topk_ids / topk_logprobs [b, n, k], targets [b, n]; both results [b, n].
    """
    student_topk, target_logp = student_logprobs_at(logits, topk_ids, targets)
    return sparse_divergence(student_topk, topk_logprobs, temperature, kind, beta), -target_logp


def kd_loss(model, inputs, targets, mask, topk_ids, topk_logprobs, *, temperature, alpha,
            kind="forward_kl", beta=0.5):
    """α·KD·T² + (1-α)·CE over the answer tokens (mask); returns (combined, kd, ce)."""
    kd, ce = answer_token_losses(model(inputs), topk_ids, topk_logprobs, targets, temperature, kind, beta)
    kd, ce = masked_mean(kd, mask), masked_mean(ce, mask)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


def sparse_kd_loss(
    student_logits: mx.array,
    topk_ids: mx.array,
    topk_logprobs: mx.array,
    temperature: float = 2.0,
    mask: mx.array | None = None,
    kind: str = "forward_kl",
    beta: float = 0.5,
) -> mx.array:
    """KD against cached teacher top-k log-probs (at T = 1), times T², over unmasked tokens.

    Teacher and student are both reduced to the same k + 1 buckets (the teacher's top-k ids and
    "everything else"), then both are softened by T. With k equal to the vocabulary this is the
    dense loss; with k = 64 it keeps the signal while the cache stays a few hundred bytes a token.
    """
    student_topk = student_topk_logprobs(student_logits, topk_ids)
    return sparse_kd_from_topk(student_topk, topk_logprobs, temperature, mask, kind, beta)


def align_vocab_sizes(
    teacher_logits: mx.array,
    student_logits: mx.array,
    strategy: str = "truncate",
    token_map: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """Bring teacher and student logits onto one vocabulary axis.

    "truncate": the vocabularies share ids and differ only in padded size (Qwen2.5-7B's 152064
    rows against 3B's 151936); both are cut to the shorter. Only valid when the tokenizers share
    ids: `check_shared_vocab` says so, and the distiller calls it before any training.
    "token_map": `token_map[i]` is the teacher id of the student's token i (-1 if the teacher has
    no such token string; see `token_string_map`); the teacher's logits are gathered into the
    student's order and missing tokens get a logit far below any real one.
    """
    if strategy == "truncate":
        v = min(teacher_logits.shape[-1], student_logits.shape[-1])
        return teacher_logits[..., :v], student_logits[..., :v]
    if strategy == "token_map":
        if token_map is None:
            raise ValueError("align_vocab_sizes(strategy='token_map') needs a token_map")
        if token_map.shape[0] != student_logits.shape[-1]:
            raise ValueError(
                f"token_map has {token_map.shape[0]} entries but the student vocabulary has "
                f"{student_logits.shape[-1]}"
            )
        gathered = mx.take(teacher_logits, mx.maximum(token_map, 0), axis=-1)
        floor = teacher_logits.min() - 30.0
        return mx.where(token_map >= 0, gathered, floor), student_logits
    raise ValueError(f"unknown strategy {strategy!r}; choose one of {', '.join(ALIGN_STRATEGIES)}")


def token_string_map(teacher_tokenizer, student_tokenizer) -> mx.array:
    """For each student id, the teacher id of the same token string, or -1."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    table = [-1] * (max(s_vocab.values()) + 1)
    for tok, i in s_vocab.items():
        table[i] = t_vocab.get(tok, -1)
    return mx.array(table, dtype=mx.int32)
