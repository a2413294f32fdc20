"""On-policy samples: the student's own answers to chats, written in batches for the teacher to score.

GKD's λ (KDConfig.on_policy) is the share of a run's train prompts that the current student answers
itself; the teacher then scores every token of those answers, so the student learns where its own
mistakes lead it (exposure bias), not only along the teacher's answers. Held-out prompts are
answered greedily: KL(teacher ‖ student) over those tokens is what a user of the version gets.
"""

from __future__ import annotations

import json

from conch_dna.chat import prompt_tokens

import mlx.core as mx
import numpy as np


def pick_on_policy(n: int, share: float, seed: int) -> list[int]:
    """Which of n train prompts the student answers: round(share·n) of them, drawn with `seed`."""
    count = int(round(share * n))
    return sorted(np.random.default_rng(seed).permutation(n)[:count].tolist())


def prompt_part(messages: list[dict]) -> list[dict]:
    """A chat without its answer: what the student is asked."""
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def answer_chats(model, tokenizer, chats: list[list[dict]], max_tokens: int, temperature: float,
                 seed: int, batch_size: int = 32) -> list[list[dict]]:
    """Each chat's prompt with the model's own answer last, written by mlx-lm's batch_generate.

    `temperature` 0 answers greedily. The same prompt twice is answered once (held-out groups are
    subsets of the held-out set); the same seed gives the same answers.
    """
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    prompts = [prompt_part(c) for c in chats]
    keys = [json.dumps(p, sort_keys=True) for p in prompts]
    unique = list(dict.fromkeys(keys))
    first = {k: prompts[keys.index(k)] for k in unique}
    mx.random.seed(seed)
    model.eval()
    answers: dict[str, str] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        tokens = [prompt_tokens(tokenizer, first[k]) for k in chunk]
        out = batch_generate(model, tokenizer, tokens, max_tokens=max_tokens, sampler=make_sampler(temperature),
                             prefill_batch_size=min(8, len(chunk)), completion_batch_size=len(chunk))
        answers.update(zip(chunk, out.texts))
    return [[*p, {"role": "assistant", "content": answers[k]}] for p, k in zip(prompts, keys)]
