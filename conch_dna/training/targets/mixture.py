"""Several teachers for one student: their top-k targets mixed in probability space.

Each teacher scores the same tokens (the first teacher writes the answers a prompt lacks); the
mixture gives a token Σ_t w_t·p_t over the teachers whose top-k holds it, and keeps the k likeliest.
What a teacher leaves outside its top-k is its tail, so the mixture's tail is Σ_t w_t·tail_t plus
what the cut to k drops: nothing is renormalised away. Teachers score one after another, each
released before the next loads, so no two models are resident at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from conch_dna.models.chat import Chat
from conch_dna.training.data import KDExample
from conch_dna.training.losses import PAD_LOGPROB
from conch_dna.training.targets.teacher import TeacherScorer

import numpy as np


def mix_topk(targets: list[tuple[np.ndarray, np.ndarray]], weights: list[float], k: int):
    """(ids int32 [n, k], log-probs float32 [n, k]) of the weighted mixture of teachers' top-k targets,
    best first; rows the union cannot fill are padded with id 0 at PAD_LOGPROB (a bucket of no mass)."""
    total = float(sum(weights))
    n = targets[0][0].shape[0]
    ids_out = np.zeros((n, k), np.int32)
    lps_out = np.full((n, k), PAD_LOGPROB, np.float32)
    for row in range(n):
        mass: dict[int, float] = {}
        for (ids, logprobs), weight in zip(targets, weights):
            for token, lp in zip(ids[row].tolist(), logprobs[row].astype(np.float64).tolist()):
                if lp > PAD_LOGPROB / 2:  # padding holds no mass
                    mass[token] = mass.get(token, 0.0) + weight / total * float(np.exp(lp))
        best = sorted(mass.items(), key=lambda item: -item[1])[:k]
        if best:
            ids_out[row, : len(best)] = [token for token, _ in best]
            lps_out[row, : len(best)] = np.log([p for _, p in best])
    return ids_out, lps_out


class TeacherMixture:
    """The run's teachers as one target source: `examples` and `token_examples` score a whole list with
    each teacher in turn, then mix. With one teacher its targets pass through as they are."""

    def __init__(self, scorers: list[TeacherScorer], weights: list[float], top_k: int):
        if len(scorers) != len(weights) or not scorers:
            raise ValueError("a teacher mixture needs one weight per teacher, and a teacher")
        self.scorers, self.weights, self.top_k = scorers, weights, top_k

    @property
    def forward_passes(self) -> int:
        return sum(s.forward_passes for s in self.scorers)

    def set_vocab_limit(self, limit: int | None) -> None:
        for s in self.scorers:
            s.vocab_limit = limit

    def release(self) -> None:
        for s in self.scorers:
            s.release()

    def examples(self, chats: list[tuple[Chat, dict | None]], tokenizer, fingerprint: str | None,
                 check: Callable[[], None]) -> list[KDExample]:
        """KD examples of (chat, captured top-k) pairs: the first teacher answers and scores (or its
        capture is used), the others score the same tokens. `check()` runs before each chat (it may raise)."""
        first = []
        for (messages, tools), topk in chats:
            check()
            first.append(self.scorers[0].example(messages, tokenizer, topk, fingerprint, tools))
        return self._mixed(first, check)

    def token_examples(self, sequences: list[tuple[list[int], int]], on_policy: bool,
                       check: Callable[[], None]) -> list[KDExample]:
        """KD examples of token ids whose answer starts at the offset, scored by every teacher."""
        first = []
        for tokens, offset in sequences:
            check()
            first.append(self.scorers[0].token_example(tokens, offset, on_policy))
        return self._mixed(first, check)

    def _mixed(self, first: list[KDExample], check) -> list[KDExample]:
        if len(self.scorers) == 1:
            return first
        self.scorers[0].release()
        scored = [[(e.topk_ids, e.topk_logprobs) for e in first]]
        for scorer in self.scorers[1:]:
            targets = []
            for e in first:
                check()
                ids, logprobs = scorer.targets(e.tokens.tolist(), e.offset)
                targets.append((ids[: len(e.topk_ids)], logprobs[: len(e.topk_ids)]))
            scorer.release()
            scored.append(targets)
        out = []
        for i, e in enumerate(first):
            ids, logprobs = mix_topk([teacher[i] for teacher in scored], self.weights, self.top_k)
            out.append(replace(e, topk_ids=ids, topk_logprobs=logprobs))  # hidden states: the first's
        return out
