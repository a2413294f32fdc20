"""The EGO wrapper for agent code: the teacher answers, and every answer becomes a trace that
carries the teacher's top-k log-probs of each generated token, taken during generation (no
second pass), so a later retrain needs no teacher forward pass for it.

    from conch_dna.traces.ego import Ego
    ego = Ego()                                   # the config's teacher, $CONCH_HOME's store
    answer = ego.generate("task", [{"role": "user", "content": "Plan how to send the email."}])
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from conch_dna.models.chat import prompt_tokens
from conch_dna.models.loading import load_model, output_vocab_size, tokenizer_fingerprint
from conch_dna.models.structured import Grammars, StructureError, held_to
from conch_dna.models.tools import Answer, ParsedAnswer, parse_answer, tool_use
from conch_dna.settings.config import load_config
from conch_dna.system.domains import check_domain
from conch_dna.system.home import conch_home
from conch_dna.system.mlx_thread import MLXThread
from conch_dna.traces.ingest import record
from conch_dna.traces.store import TraceStore
from conch_dna.traces.trace import MIN_STORED_LOGPROB

import mlx.core as mx
import numpy as np


@dataclass(frozen=True)
class EgoAnswer:
    """The teacher's answer to a chat: its text, top-k (a trace's `topk`), token counts, and the
    tool calls read out of the text when the chat offered tools."""

    text: str
    topk: dict
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence), "length" (max_tokens) or "tool_calls"
    tool_calls: list[dict] = field(default_factory=list)
    content: str | None = None  # the text outside the tool calls (None: all of it)

    def message(self) -> dict:
        """The answer as the trace's last message: text, or tool calls (content None if it has none)."""
        return Answer.read(self.text, ParsedAnswer(self.text if self.content is None else self.content,
                                                   self.tool_calls)).message()


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
        self.model = self.tokenizer = self.fingerprint = self.grammars = None
        self.last_trace_id: str | None = None

    def _load(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = load_model(self.teacher_model_id)
            self.fingerprint = tokenizer_fingerprint(self.tokenizer)
            self.grammars = Grammars(self.tokenizer, output_vocab_size(self.model))

    def _answer(self, messages: list[dict], max_tokens: int, tools: list[dict] | None, tool_choice,
                response_format=None) -> EgoAnswer:
        from mlx_lm import stream_generate

        self._load()
        use = tool_use(self.tokenizer, tools, tool_choice)
        prompt = prompt_tokens(self.tokenizer, messages, use.tools if use else None)
        if use and use.prefix:
            prompt += self.tokenizer.encode(use.prefix, add_special_tokens=False)
        grammar = self.grammars.matcher(response_format) if response_format is not None else None
        if grammar is not None and use and use.prefix:
            raise StructureError("a response_format and a forced tool call cannot both hold the answer")
        # held, the top-k kept is the teacher's distribution over the tokens its form allows: what a student
        # served under that form chooses among
        held = [held_to(grammar, self.grammars.vocab_size)] if grammar is not None else None
        text, ids, logprobs, finish = [], [], [], "length"
        for response in stream_generate(self.model, self.tokenizer, prompt, max_tokens=max_tokens,
                                        logits_processors=held):
            text.append(response.text)
            finish = response.finish_reason or finish
            lp = response.logprobs.astype(mx.float32)
            top = mx.argpartition(-lp, kth=self.top_k - 1)[: self.top_k]
            top = top[mx.argsort(-lp[top])]
            ids.append(np.array(top, np.int32))
            logprobs.append(np.array(lp[top], np.float32))
        # a held answer's masked tokens are at -inf: kept as the lowest a trace stores (no probability)
        kept = np.clip(np.stack(logprobs), MIN_STORED_LOGPROB, 0.0)
        topk = {"token_ids": np.stack(ids).tolist(), "logprobs": kept.tolist(), "tokenizer": self.fingerprint}
        text = "".join(text)
        if use is None:
            return EgoAnswer(text, topk, len(prompt), len(ids), finish)
        parsed = parse_answer(use.prefix + text, use.format, use.tools)
        finish = "tool_calls" if parsed.tool_calls and finish == "stop" else finish
        return EgoAnswer(use.prefix + text, topk, len(prompt), len(ids), finish, parsed.tool_calls, parsed.content)

    def answer(self, messages: list[dict], max_tokens: int | None = None, tools: list[dict] | None = None,
               tool_choice=None, response_format=None) -> EgoAnswer:
        """The teacher's answer to the chat offering `tools` (OpenAI's `tool_choice` honoured, see
        conch_dna.models.tools.tool_use), held to `response_format` if given (as a neuron's is), with its
        top-k; nothing is recorded (see record())."""
        return self.mlx.call(self._answer, list(messages), max_tokens or self.max_tokens, tools, tool_choice,
                             response_format)

    def record(self, domain: str, messages: list[dict], answer: EgoAnswer, meta: dict | None = None,
               tools: list[dict] | None = None, response_format=None) -> str | None:
        """Keep the answer to `messages` (which offered `tools`, asked in `response_format`) as a trace of
        `domain` (never raises; see ingest.record)."""
        self.last_trace_id = record(domain, [*messages, answer.message()], teacher=self.teacher_model_id,
                                    topk=answer.topk, meta=meta, store=self.store, tools=tools,
                                    response_format=response_format)
        return self.last_trace_id

    def generate(self, domain: str, messages: list[dict], max_tokens: int | None = None,
                 tools: list[dict] | None = None, tool_choice=None, response_format=None) -> Answer:
        """The teacher's answer to the chat (a str, with its `tool_calls` and `content`); the trace
        (with top-k, and the response_format it was held to) is recorded before it returns.

        Raises UnknownDomainError for a domain the config does not have, before the model loads.
        """
        check_domain(domain, self.config.domains)
        answer = self.answer(messages, max_tokens, tools, tool_choice, response_format)
        self.record(domain, messages, answer, tools=tools, response_format=response_format)
        out = Answer.read(answer.text, ParsedAnswer(answer.content if answer.content is not None else answer.text,
                                                    answer.tool_calls))
        out.answered_by = "ego"
        return out

    def close(self) -> None:
        self.mlx.close()
