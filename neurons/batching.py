"""Continuous batching on the MLX thread: calls join the running batch at the next step and leave
it when they finish, each with its own adapter, sampling, max_tokens and stop conditions.

One step of `BatchEngine.step()`:
  1. drop the rows whose caller cancelled (or stopped reading);
  2. prefill waiting calls, at most `prefill_step_size` prompt tokens a step, so a long prompt
     cannot stall the rows that are decoding; a call whose prompt is in joins the batch's cache;
  3. one decode step for every row: one forward pass, each row through its own adapter
     (neurons.multi_lora), then each row samples (a row held to a response_format only among the tokens its
     grammar allows, masked while the pass runs), checks its stops and streams its text.
This is mlx-lm's BatchGenerator (its batch KV caches are used as they are) with per-row LoRA.
"""

from __future__ import annotations

import logging
import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

from conch_dna.models.structured import StructureError, allowed_tokens
from conch_dna.models.tools import ParsedAnswer, ToolUse, parse_answer
from conch_dna.settings.config import NeuronSettings

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from neurons.multi_lora import Adapter, RowAdapters

log = logging.getLogger("conch.neurons")
_END = object()
STATS_WINDOW_S = 10.0  # tokens/s is measured over this much recent time
TTFT_SAMPLES = 256  # time-to-first-token quantiles over this many recent calls
MAX_TOP_LOGPROBS = 20  # alternatives a call may ask for at each token (OpenAI's limit)


class Finish(str, Enum):
    """Why a call ended (the first two are OpenAI's finish_reason)."""

    STOP = "stop"  # an end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens
    CANCELLED = "cancelled"  # the caller cancelled or stopped reading


class EngineClosed(RuntimeError):
    """The registry was closed while the call waited or ran."""


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log-probability, and the most likely tokens at its step (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


class Call:
    """One generation. Iterate it for its text chunks; afterwards `finish_reason`,
    `completion_tokens` and `version` say how it went. `cancel()` frees its row at the next step.
    With `logprobs` (the number of alternatives, 0 to 20), `token_logprobs` gets a TokenLogprob for
    each answer token before the text that holds it is streamed."""

    def __init__(self, prompt: list[int], adapter: Adapter, max_tokens: int,
                 sampler: Callable | None = None, logits_processors: list | None = None,
                 stop: tuple[str, ...] = (), logprobs: int | None = None, tools: ToolUse | None = None,
                 grammar=None):
        if not prompt:
            raise ValueError("the prompt has no tokens")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop strings must be non-empty strings")
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {logprobs}")
        self.prompt = list(prompt)
        self.adapter = adapter
        self.version = adapter.version
        self.max_tokens = max_tokens
        self.sampler = sampler
        self.logits_processors = list(logits_processors or [])
        self.stop = tuple(stop)
        self.logprobs = logprobs
        self.token_logprobs: list[TokenLogprob] = []
        self.finish_reason: Finish | None = None
        self.completion_tokens = 0
        self.submitted_at = time.monotonic()
        self.first_token_at: float | None = None
        self.tools = tools  # the tools offered, how calls are read, the text the answer was forced to begin with
        self.grammar = grammar  # an llguidance matcher the answer is held to (models.structured), or None
        self._parts: list[str] = []
        self._chunks: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)

    @property
    def text(self) -> str:
        """The answer so far, as the model wrote it (a forced tool-call start included)."""
        return (self.tools.prefix if self.tools else "") + "".join(self._parts)

    def parsed(self) -> ParsedAnswer:
        """The answer read for tool calls (none when the call offered no tools)."""
        if self.tools is None:
            return ParsedAnswer(self.text, [])
        return parse_answer(self.text, self.tools.format, self.tools.tools)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self) -> Iterator[str]:
        ended = False
        try:
            while (item := self._chunks.get()) is not _END:
                if isinstance(item, BaseException):
                    ended = True
                    raise item
                yield item
            ended = True
        finally:
            if not ended:  # the caller closed the stream or dropped it: free the row
                self.cancel()

    # -- the engine's side -----------------------------------------------------------------

    def _put(self, text: str) -> None:
        if text:
            self._parts.append(text)
            self._chunks.put(text)

    def _end(self, reason: Finish | BaseException) -> None:
        if isinstance(reason, BaseException):
            self._chunks.put(reason)
        else:
            self.finish_reason = reason
        self._chunks.put(_END)


class _Row:
    """A call in the engine: its KV cache until it joins, the token it feeds next, its text."""

    def __init__(self, call: Call, model, tokenizer):
        self.call = call
        self.cache = make_prompt_cache(model)
        self.todo = call.prompt[:-1]  # prefilled; the last prompt token is the first decode input
        self.next_input = call.prompt[-1]
        self.tokens = list(call.prompt)  # the context logits processors see
        self.detokenizer = tokenizer.detokenizer
        self.eos = tokenizer.eos_token_ids
        self.text = ""
        self.emitted = 0
        self.hold_back = max((len(s) for s in call.stop), default=1) - 1
        self.stopped = False  # a stop string was found and the text cut there

    def advance(self, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Take the row's next token; stream what text is final. True when the call is done."""
        call = self.call
        call.completion_tokens += 1
        if call.first_token_at is None:
            call.first_token_at = time.monotonic()
        self.next_input = token
        self.tokens.append(token)
        finish = None
        if token in self.eos:
            finish = Finish.STOP
        else:
            if logprob is not None:
                call.token_logprobs.append(logprob)
            self.detokenizer.add_token(token)
            self.text += self.detokenizer.last_segment
            if self._cut_at_stop():
                finish = Finish.STOP
            elif call.completion_tokens >= call.max_tokens:
                finish = Finish.LENGTH
        if finish is None:  # a stop string may be starting: hold its length back
            final = max(self.emitted, len(self.text) - self.hold_back)
            call._put(self.text[self.emitted:final])
            self.emitted = final
            return False
        if not self.stopped:  # the detokenizer may still hold the end of a word
            self.detokenizer.finalize()
            self.text += self.detokenizer.last_segment
            self._cut_at_stop()
        call._put(self.text[self.emitted:])
        call._end(finish)
        return True

    def _cut_at_stop(self) -> bool:
        """Cut the text at the first stop string in it (the stop string is not part of the answer)."""
        if not self.stopped:
            found = [i for i in (self.text.find(s, max(0, self.emitted - len(s))) for s in self.call.stop) if i >= 0]
            if found:
                self.text, self.stopped = self.text[:min(found)], True
        return self.stopped


class BatchEngine:
    """The running batch of one model; every method runs on the MLX thread that owns the model."""

    def __init__(self, model, tokenizer, adapters: RowAdapters, settings: NeuronSettings):
        self.model = model
        self.tokenizer = tokenizer
        self.adapters = adapters
        self.settings = settings
        self.waiting: deque[Call] = deque()
        self.prefilling: _Row | None = None
        self.rows: list[_Row] = []
        self.cache: list | None = None  # one batch cache per layer, rows in self.rows's order
        self.calls_served = 0
        self.calls_cancelled = 0  # calls whose caller cancelled or stopped reading before they ended
        self.peak_running = 0  # the largest batch so far
        self.tokens_generated = 0
        self._recent_tokens: deque[tuple[float, int]] = deque()
        self._ttft: deque[float] = deque(maxlen=TTFT_SAMPLES)

    def add(self, call: Call) -> None:
        self.waiting.append(call)

    def step(self) -> bool:
        """One step of every running call; True while calls are running or waiting."""
        try:
            self._drop_cancelled()
            self._prefill()
            if self.rows:
                self._decode()
        except Exception as exc:  # noqa: BLE001 - fail the calls, keep serving the next ones
            log.exception("a batch step failed; its calls get the error")
            self._fail_all(exc)
        busy = bool(self.rows or self.waiting or self.prefilling)
        if not busy:
            self.adapters.release()
        return busy

    def close(self) -> None:
        self._fail_all(EngineClosed("the neuron registry was closed"))

    # -- steps -------------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        dropped = [c for c in self.waiting if c.cancelled]
        for call in dropped:
            self.waiting.remove(call)
        if self.prefilling and self.prefilling.call.cancelled:
            dropped.append(self.prefilling.call)
            self.prefilling = None
        gone = [i for i, r in enumerate(self.rows) if r.call.cancelled]
        dropped += [self.rows[i].call for i in gone]
        for call in dropped:
            call._end(Finish.CANCELLED)
        self.calls_cancelled += len(dropped)
        self._remove(gone)

    def _prefill(self) -> None:
        budget = self.settings.prefill_step_size
        while budget > 0 and len(self.rows) < self.settings.max_batch_size:
            if self.prefilling is None:
                if not self.waiting:
                    return
                self.prefilling = _Row(self.waiting.popleft(), self.model, self.tokenizer)
            row = self.prefilling
            try:
                if row.todo:
                    n = min(budget, len(row.todo))
                    self._hold()
                    self.adapters.select([row.call.adapter])
                    self.model(mx.array([row.todo[:n]]), cache=row.cache)
                    mx.eval([c.state for c in row.cache])
                    row.todo, budget = row.todo[n:], budget - n
                if not row.todo:
                    self._join(row)
                    self.prefilling = None
            except Exception as exc:  # noqa: BLE001 - this call's prompt failed; the batch goes on
                log.exception("prefilling a call failed")
                row.call._end(exc)
                self.prefilling = None

    def _join(self, row: _Row) -> None:
        merged = [type(c).merge([c]) for c in row.cache]
        if self.cache is None:
            self.cache = merged
        else:
            for batch, one in zip(self.cache, merged):
                batch.extend(one)
        row.cache = None
        self.rows.append(row)
        self.peak_running = max(self.peak_running, len(self.rows))

    def _decode(self) -> None:
        self._hold()
        self.adapters.select([r.call.adapter for r in self.rows])
        inputs = mx.array([[r.next_input] for r in self.rows])
        logits = self.model(inputs, cache=self.cache)[:, -1, :]
        failed: dict[int, Exception] = {}
        held = [i for i, r in enumerate(self.rows) if r.call.grammar is not None]
        if held:  # the masks are computed on the CPU while the forward pass runs
            mx.async_eval(logits)
            allowed = self._allowed(held, logits.shape[-1], failed)
        if any(r.call.logits_processors for r in self.rows):
            logits = mx.concatenate([self._own(i, failed, self._processed, r, logits[i:i + 1])
                                     for i, r in enumerate(self.rows)])
        if held:  # after the caller's processors, which cannot lift it
            logits = mx.where(mx.array(allowed), logits, -mx.inf)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        if all(r.call.sampler is None for r in self.rows):
            sampled = mx.argmax(logprobs, axis=-1)
        else:
            sampled = mx.concatenate([self._own(i, failed, self._sampled, r, logprobs[i:i + 1])
                                      for i, r in enumerate(self.rows)])
        tokens = sampled.tolist()
        asked = [i for i, r in enumerate(self.rows) if r.call.logprobs is not None and i not in failed]
        logprob_of = self._logprobs(logprobs, tokens, asked) if asked else {}
        self._count(len(tokens) - len(failed))
        done = []
        for i in held:
            grammar = self.rows[i].call.grammar
            if i not in failed and not grammar.consume_token(tokens[i]):
                failed[i] = StructureError(f"the answer left its response_format: {grammar.get_error()}")
        for i, (row, token) in enumerate(zip(self.rows, tokens)):
            if i in failed:
                row.call._end(failed[i])
                done.append(i)
            elif row.advance(token, logprob_of.get(i)):
                self._finished(row.call)
                done.append(i)
        self._remove(done)

    def _logprobs(self, logprobs: mx.array, tokens: list[int], asked: list[int]) -> dict[int, TokenLogprob]:
        """Each asking row's token log-probability and its top alternatives, in one evaluation."""
        lp = logprobs[mx.array(asked)]
        chosen = mx.take_along_axis(lp, mx.array([[tokens[i]] for i in asked]), axis=-1)[:, 0]
        k = max(self.rows[i].call.logprobs for i in asked)
        top = mx.argpartition(-lp, kth=k - 1, axis=-1)[:, :k] if k else mx.zeros((len(asked), 0), mx.int32)
        top_lp = mx.take_along_axis(lp, top, axis=-1)
        chosen, top, top_lp = chosen.tolist(), top.tolist(), top_lp.tolist()
        out = {}
        for j, i in enumerate(asked):
            best = sorted(zip(top[j], top_lp[j]), key=lambda t: -t[1])[: self.rows[i].call.logprobs]
            out[i] = TokenLogprob(tokens[i], chosen[j], tuple(best))
        return out

    def _allowed(self, held: list[int], vocab_size: int, failed: dict) -> np.ndarray:
        """bool [rows, vocab]: every token for a free row, its grammar's next tokens for a held one."""
        allowed = np.ones((len(self.rows), vocab_size), bool)
        grammars = [self.rows[i].call.grammar for i in held]
        allowed[held] = allowed_tokens(grammars, vocab_size)
        for i, grammar in zip(held, grammars):
            if grammar.is_error() or not allowed[i].any():
                failed[i] = StructureError(f"the answer cannot go on in its response_format: "
                                           f"{grammar.get_error() or 'no token is allowed'}")
                allowed[i] = True
        return allowed

    @staticmethod
    def _own(i: int, failed: dict, fn, row: _Row, values: mx.array) -> mx.array:
        """A row's own logits processors or sampler; what they raise ends that call only."""
        sampling = fn is BatchEngine._sampled
        try:
            out = fn(row, values)
            want = (1,) if sampling else values.shape
            if not isinstance(out, mx.array) or out.shape != want:
                raise ValueError(f"a {'sampler' if sampling else 'logits processor'} returned "
                                 f"{getattr(out, 'shape', type(out).__name__)}, not an array of shape {want}")
            return out  # not evaluated here: the batch's rows evaluate together
        except Exception as exc:  # noqa: BLE001 - the caller's code, the caller's error
            failed[i] = exc
            return mx.argmax(values, axis=-1).reshape(1) if sampling else values

    @staticmethod
    def _processed(row: _Row, logits: mx.array) -> mx.array:
        context = mx.array(row.tokens)
        for processor in row.call.logits_processors:
            logits = processor(context, logits)
        return logits

    @staticmethod
    def _sampled(row: _Row, logprobs: mx.array) -> mx.array:
        sampled = (row.call.sampler or _greedy)(logprobs)
        return sampled.reshape(1) if isinstance(sampled, mx.array) and sampled.size == 1 else sampled

    def _hold(self) -> None:
        """Keep stacked exactly the adapters of the running rows and the one being prefilled."""
        calls = [r.call for r in self.rows] + ([self.prefilling.call] if self.prefilling else [])
        self.adapters.hold([c.adapter for c in calls])

    def _remove(self, indices: list[int]) -> None:
        if not indices:
            return
        keep = [i for i in range(len(self.rows)) if i not in set(indices)]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = None
            return
        for c in self.cache:
            c.filter(keep)

    def _fail_all(self, exc: BaseException) -> None:
        calls = [*self.waiting, *([self.prefilling.call] if self.prefilling else []), *(r.call for r in self.rows)]
        for call in calls:
            call._end(exc)
        self.waiting.clear()
        self.prefilling, self.rows, self.cache = None, [], None

    # -- figures -----------------------------------------------------------------------------

    def _count(self, tokens: int) -> None:
        now = time.monotonic()
        self.tokens_generated += tokens
        self._recent_tokens.append((now, tokens))
        while self._recent_tokens and self._recent_tokens[0][0] < now - STATS_WINDOW_S:
            self._recent_tokens.popleft()

    def _finished(self, call: Call) -> None:
        self.calls_served += 1
        self._ttft.append(call.first_token_at - call.submitted_at)

    def stats(self) -> dict:
        """What a person needs to see: the batch, the queue, tokens/s and time to first token."""
        recent = list(self._recent_tokens)
        span = time.monotonic() - recent[0][0] if recent else 0.0
        ttft = sorted(self._ttft)
        return {
            "max_batch_size": self.settings.max_batch_size,
            "running": len(self.rows),
            "peak_running": self.peak_running,
            "queued": len(self.waiting) + (1 if self.prefilling else 0),
            "calls_served": self.calls_served,
            "calls_cancelled": self.calls_cancelled,
            "tokens_generated": self.tokens_generated,
            "tokens_per_s": round(sum(n for _, n in recent) / span, 1) if span > 0 else 0.0,
            "ttft_p50_ms": round(statistics.median(ttft) * 1000, 1) if ttft else None,
            "ttft_p99_ms": round(ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] * 1000, 1) if ttft else None,
            "adapters_stacked": len(self.adapters.stacked),
        }


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)
