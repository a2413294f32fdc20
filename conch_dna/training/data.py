"""Chat examples with teacher targets, and the padded batches the KD step consumes."""

from __future__ import annotations

from dataclasses import dataclass, replace

from conch_dna.training.losses import PAD_LOGPROB

import mlx.core as mx
import numpy as np


@dataclass
class KDExample:
    """One chat: its tokens, where the answer starts, and the teacher's top-k per answer token."""

    tokens: np.ndarray  # int32 [n]
    offset: int  # index of the first answer token
    topk_ids: np.ndarray  # int32 [n - offset, k]
    topk_logprobs: np.ndarray  # float16 or float32 [n - offset, k]
    # the answer is the student's own (on-policy): its CE target is the teacher's top-1 at each
    # position, since training the student towards its own sampled tokens would teach it nothing
    on_policy: bool = False
    # the teacher's block outputs at the mapped layers, float16 [n - offset, layers, width], for the
    # hidden-state loss (conch_dna.training.hidden); rows like topk_ids
    hidden: np.ndarray | None = None

    @property
    def answer_tokens(self) -> np.ndarray:
        return self.tokens[self.offset :]


def _batch_order(n: int, batch_size: int, rng: np.random.Generator):
    """Endless index lists of batch_size, epoch after shuffled epoch; small sets repeat."""
    pending: list[int] = []
    while True:
        while len(pending) < batch_size:
            pending.extend(rng.permutation(n).tolist())
        yield pending[:batch_size]
        pending = pending[batch_size:]


def window_cut(n_tokens: int, offset: int, max_seq_length: int) -> int:
    """How many tokens to cut from the left of a prompt so that its answer fits in max_seq_length inputs
    (0 when it fits); a prompt is never cut to nothing, since its last token predicts the answer's first."""
    return max(0, min(n_tokens - 1 - max_seq_length, offset - 1))


def fit_window(example: KDExample, max_seq_length: int) -> KDExample:
    """The example cut from the left of its prompt so that its answer fits in max_seq_length inputs.

    An answer longer than the window itself keeps its start (collate cuts the rest); a prompt is never
    cut to nothing, since its last token predicts the answer's first.
    """
    cut = window_cut(len(example.tokens), example.offset, max_seq_length)
    if cut == 0:
        return example
    return replace(example, tokens=example.tokens[cut:], offset=example.offset - cut)


def collate(examples: list[KDExample], max_seq_length: int, pad_to: int = 32,
            hidden_shape: tuple[int, int] | None = None):
    """Pad examples into (inputs, targets, mask, topk_ids, topk_logprobs) for one step; with
    `hidden_shape` (layers, width), then the teacher's hidden states [b, positions, layers, width] and
    their mask: the answer positions of the examples that carry hidden states (a trace whose top-k
    was captured from the EGO has none).

    Position p of the inputs predicts token p + 1 (for an on-policy example, the teacher's top-1 there);
    the mask keeps the positions whose target is an answer token, and topk rows are placed at those
    same positions.
    """
    examples = [fit_window(e, max_seq_length) for e in examples]
    k = examples[0].topk_ids.shape[1]
    longest = max(len(e.tokens) for e in examples) - 1
    width = min(pad_to * ((longest + pad_to - 1) // pad_to), max_seq_length)
    b = len(examples)
    inputs = np.zeros((b, width), np.int32)
    targets = np.zeros((b, width), np.int32)
    mask = np.zeros((b, width), np.float32)
    ids = np.zeros((b, width, k), np.int32)
    logprobs = np.full((b, width, k), PAD_LOGPROB, np.float32)
    hidden = np.zeros((b, width, *hidden_shape), np.float32) if hidden_shape else None
    hidden_mask = np.zeros((b, width), np.float32)
    for row, e in enumerate(examples):
        n = min(len(e.tokens) - 1, width)
        inputs[row, :n] = e.tokens[:n]
        targets[row, :n] = e.tokens[1 : n + 1]
        start = e.offset - 1
        stop = min(len(e.tokens) - 1, width)
        if stop > start:
            mask[row, start:stop] = 1.0
            ids[row, start:stop] = e.topk_ids[: stop - start]
            if e.on_policy:
                targets[row, start:stop] = e.topk_ids[: stop - start, 0]
            # a log-prob below float16's range was stored as -inf: it is a bucket with no mass, i.e.
            # padding (left as -inf it would make 0·log 0 a NaN in every KL over the batch)
            logprobs[row, start:stop] = np.maximum(e.topk_logprobs[: stop - start], PAD_LOGPROB)
            if hidden is not None and e.hidden is not None:
                hidden[row, start:stop] = e.hidden[: stop - start]
                hidden_mask[row, start:stop] = 1.0
    batch = (mx.array(inputs), mx.array(targets), mx.array(mask), mx.array(ids), mx.array(logprobs))
    return (*batch, mx.array(hidden), mx.array(hidden_mask)) if hidden is not None else batch


def iterate_kd_batches(examples: list[KDExample], batch_size: int, max_seq_length: int,
                       seed: int = 0, skip: int = 0, hidden_shape: tuple[int, int] | None = None,
                       shard: tuple[int, int] = (0, 1)):
    """Endless shuffled, padded KD batches (see collate); `skip` passes over the first ones (a resumed run).
    `shard` = (rank, ranks): this rank's rows rank, rank + ranks, ... of each global batch, which is the
    same whatever the number of ranks (a data-parallel run's order and batch size do not depend on it)."""
    if not examples:
        raise ValueError("no training examples")
    rank, ranks = shard
    rng = np.random.default_rng(seed)
    for n, idx in enumerate(_batch_order(len(examples), batch_size, rng)):
        if n >= skip:
            yield collate([examples[i] for i in idx[rank::ranks]], max_seq_length, hidden_shape=hidden_shape)
