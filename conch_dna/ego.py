"""The EGO wrapper for agent code: the teacher answers, and every answer becomes a trace that
carries the teacher's top-k log-probs of each generated token, taken during generation (no
second pass), so a later retrain needs no teacher forward pass for it.

    from conch_dna.ego import Ego
    ego = Ego()                                   # the config's teacher, $CONCH_HOME's store
    answer = ego.generate("task", [{"role": "user", "content": "Plan how to send the email."}])
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conch_dna.chat import prompt_tokens
from conch_dna.config import load_config
from conch_dna.domains import check_domain
from conch_dna.home import conch_home
from conch_dna.ingest import record
from conch_dna.mlx_thread import MLXThread
from conch_dna.models import load_model, tokenizer_fingerprint
from conch_dna.store import TraceStore

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class EgoAnswer:
    """The teacher's answer to a chat: its text, top-k (a trace's `topk`), and token counts."""

    text: str
    topk: dict
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence) or "length" (max_tokens)


class Ego:
    """The teacher, answering on its own MLX thread, recording each answer as a trace.

    `teacher_model_id` defaults to the config's teacher; `top_k` log-probs are kept per answer
    token; `store` defaults to the home's TraceStore. The model loads on the first call.
    """

    def __init__(self, teacher_model_id: str | None = None, top_k: int = 64, home: str | Path | None = None,
                 max_tokens: int = 256, store=None):
        self.home = Path(home or conch_home())
        self.config = load_config(self.home)
        self.teacher_model_id = teacher_model_id or self.config.teacher
        self.top_k = top_k
        self.max_tokens = max_tokens
        self.store = store or TraceStore.for_home(self.home, self.config)
        self.mlx = MLXThread("conch-ego")
        self.model = self.tokenizer = self.fingerprint = None
        self.last_trace_id: str | None = None

    def _load(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = load_model(self.teacher_model_id)
            self.fingerprint = tokenizer_fingerprint(self.tokenizer)

    def _answer(self, messages: list[dict], max_tokens: int) -> EgoAnswer:
        from mlx_lm import stream_generate

        self._load()
        prompt = prompt_tokens(self.tokenizer, messages)
        text, ids, logprobs, finish = [], [], [], "length"
        for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens):
            text.append(response.text)
            finish = response.finish_reason or finish
            lp = response.logprobs.astype(mx.float32)
            top = mx.argpartition(-lp, kth=self.top_k - 1)[: self.top_k]
            top = top[mx.argsort(-lp[top])]
            ids.append(np.array(top, np.int32))
            logprobs.append(np.array(lp[top], np.float32))
        topk = {"token_ids": np.stack(ids).tolist(), "logprobs": np.minimum(np.stack(logprobs), 0.0).tolist(),
                "tokenizer": self.fingerprint}
        return EgoAnswer("".join(text), topk, len(prompt), len(ids), finish)

    def answer(self, messages: list[dict], max_tokens: int | None = None) -> EgoAnswer:
        """The teacher's answer to the chat, with its top-k; nothing is recorded (see record())."""
        return self.mlx.call(self._answer, list(messages), max_tokens or self.max_tokens)

    def record(self, domain: str, messages: list[dict], answer: EgoAnswer, meta: dict | None = None) -> str | None:
        """Keep the answer to `messages` as a trace of `domain` (never raises; see ingest.record)."""
        self.last_trace_id = record(domain, [*messages, {"role": "assistant", "content": answer.text}],
                                    teacher=self.teacher_model_id, topk=answer.topk, meta=meta, store=self.store)
        return self.last_trace_id

    def generate(self, domain: str, messages: list[dict], max_tokens: int | None = None) -> str:
        """The teacher's answer to the chat; the trace (with top-k) is recorded before it returns.

        Raises UnknownDomainError for a domain the config does not have, before the model loads.
        """
        check_domain(domain, self.config.domains)
        answer = self.answer(messages, max_tokens)
        self.record(domain, messages, answer)
        return answer.text

    def close(self) -> None:
        self.mlx.close()
