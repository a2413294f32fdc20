"""Held-out metrics of a student against the teacher's cached targets."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from conch_dna.training.data import KDExample, collate
from conch_dna.training.losses import (
    forward_kl,
    student_buckets,
    student_logprobs_at,
    teacher_bucket_logprobs,
)

import mlx.core as mx


@dataclass
class HeldoutMetrics:
    kl: float  # mean per-token KL(teacher ‖ student) at T = 1, over the teacher's top-k + tail
    ce: float  # mean cross-entropy of the teacher's answer tokens under the student
    agreement: float  # share of answer tokens where the student's argmax is the teacher's top-1
    tokens: int

    def as_dict(self) -> dict:
        return asdict(self)


def heldout_metrics(model, examples: list[KDExample], batch_size: int = 8,
                    max_seq_length: int = 2048) -> HeldoutMetrics:
    """KL to the teacher, CE on teacher tokens and top-1 agreement, over every answer token."""
    if not examples:
        raise ValueError("no held-out examples to evaluate on")
    kl_sum = ce_sum = agree_sum = count = 0.0
    for i in range(0, len(examples), batch_size):
        inputs, targets, mask, ids, logprobs = collate(examples[i : i + batch_size],
                                                       max_seq_length)
        logits = model(inputs)
        student_topk, target_logp = student_logprobs_at(logits, ids, targets)
        # padded top-k entries are left out here exactly as training leaves them out
        kl = forward_kl(teacher_bucket_logprobs(logprobs), student_buckets(student_topk, logprobs))
        ce = -target_logp
        agree = (mx.argmax(logits, axis=-1) == ids[..., 0]).astype(mx.float32)
        sums = [(x * mask).sum() for x in (kl, ce, agree)] + [mask.sum()]
        mx.eval(sums)
        kl_sum, ce_sum, agree_sum, count = (a + b.item() for a, b in
                                            zip((kl_sum, ce_sum, agree_sum, count), sums))
    return HeldoutMetrics(kl_sum / count, ce_sum / count, agree_sum / count, int(count))
