"""On-policy samples: the student's own answers to chats, written in batches for the teacher to score.

GKD's λ (KDConfig.on_policy) is the share of a run's train prompts that the current student answers
itself; the teacher then scores every token of those answers, so the student learns where its own
mistakes lead it (exposure bias), not only along the teacher's answers. Held-out prompts are
answered greedily: KL(teacher ‖ student) over those tokens is what a user of the version gets.
"""

from __future__ import annotations

from conch_dna.models.chat import as_chat, prompt_tokens

import mlx.core as mx
import numpy as np


def pick_on_policy(n: int, share: float, seed: int) -> list[int]:
    """Which of n train prompts the student answers: round(share·n) of them, drawn with `seed`."""
    count = int(round(share * n))
    return sorted(np.random.default_rng(seed).permutation(n)[:count].tolist())


def round_groups(picked: list[int], rounds: int) -> list[list[int]]:
    """The picked prompts dealt into `rounds` groups, one answered at the start of each round; every
    prompt is answered once, so rounds cost no extra teacher pass (DistiLLM's replay buffer: earlier
    rounds' answers stay in the training set). Never more groups than prompts: a round with nothing
    to answer would reload both models for nothing (λ = 0 is one round with none)."""
    rounds = max(1, min(rounds, len(picked)))
    return [picked[r::rounds] for r in range(rounds)]


def round_boundaries(num_iters: int, rounds: int) -> list[int]:
    """The steps at which rounds 2..rounds start."""
    return [num_iters * r // rounds for r in range(1, rounds)]


def prompt_part(messages: list[dict]) -> list[dict]:
    """A chat without its answer: what the student is asked."""
    return messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages


def answer_tokens(model, tokenizer, chats: list, max_tokens: int, temperature: float,
                  seed: int, batch_size: int = 32) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) of each chat's prompt answered by the model, with mlx-lm's BatchGenerator.
    A chat is a Chat (messages and tools) or a list of messages.

    The answer is the tokens the model wrote, its end-of-turn token included when it stopped, so
    the teacher scores exactly the student's trajectory (decoding and re-encoding the text could
    merge its first token into the prompt's). `temperature` 0 answers greedily. The same prompt twice
    is answered once (held-out groups are subsets of the held-out set); the same seed gives the same
    answers.
    """
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    prompts = [prompt_tokens(tokenizer, prompt_part(messages), tools) for messages, tools in map(as_chat, chats)]
    unique = list(dict.fromkeys(tuple(p) for p in prompts))
    mx.random.seed(seed)
    model.eval()
    answers: dict[tuple, list[int]] = {}
    for i in range(0, len(unique), batch_size):
        chunk = unique[i : i + batch_size]
        generator = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids],
                                   sampler=make_sampler(temperature), completion_batch_size=len(chunk),
                                   prefill_batch_size=min(8, len(chunk)))
        try:
            uids = generator.insert([list(p) for p in chunk], [max_tokens] * len(chunk))
            written: dict[int, list[int]] = {uid: [] for uid in uids}
            while responses := generator.next_generated():
                for r in responses:
                    written[r.uid].append(r.token)
        finally:
            generator.close()
        answers.update((p, written[uid]) for p, uid in zip(chunk, uids))
    return [(p, answers[tuple(p)]) for p in prompts]
