"""`auto/<domain>`: the domain's current student answers first; its answer is returned when the version's
acceptance rule (lifecycle.acceptance, fitted at its gate) takes it, else the EGO answers as `ego/<domain>` does
and that answer is recorded as a trace, so what the student could not answer is what its next retrain learns.

The student's answer is held until it is judged (the rule reads the whole answer: whether it ended, whether
it loops, its mean token log-probability), so a stream starts once the answer is known to be the student's,
or is the teacher's stream. Every answer says who wrote it: `x-conch-answered-by` (`domain@vNNNN` or `ego`),
`x-conch-deferred` and `x-conch-signal` (the student's mean token log-probability), and
`system_fingerprint`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict

import conch_dna.server.wire as wire
from conch_dna.lifecycle.acceptance import accepts, read_acceptance
from conch_dna.models.structured import StructureError
from conch_dna.models.tools import ToolError
from conch_dna.models.versions import domain_dir
from conch_dna.server.students import StudentAnswers
from conch_dna.server.teacher import TeacherAnswers
from conch_dna.training.evaluation import answer_checks

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from neurons.batching import EngineClosed, Finish

AUTO_PREFIX = "auto/"
RULES_KEPT = 64  # versions whose rules are kept read


class CascadeAnswers:
    """Student first, the teacher when the student's answer is not accepted; counts of each per version."""

    def __init__(self, home, students: StudentAnswers, teacher: TeacherAnswers):
        self.home, self.students, self.teacher = home, students, teacher
        self._rules: dict[tuple[str, str], dict | None] = {}
        self._counts: dict[str, dict[str, dict]] = defaultdict(dict)
        self._lock = threading.Lock()

    def rule(self, domain: str, version: str) -> dict | None:
        """The version's acceptance rule (read once; a version's folder never changes); None: defer all."""
        if version == "base":
            return None
        with self._lock:
            if (domain, version) in self._rules:
                return self._rules[(domain, version)]
        rule = read_acceptance(domain_dir(self.home, domain) / version)
        with self._lock:
            if len(self._rules) >= RULES_KEPT:
                self._rules.pop(next(iter(self._rules)))
            self._rules[(domain, version)] = rule
        return rule

    def stats(self) -> dict:
        """Per domain and version: calls the student served, calls deferred, the teacher's seconds on them."""
        with self._lock:
            return {d: {v: dict(c) for v, c in by_version.items()} for d, by_version in self._counts.items()}

    def _count(self, domain: str, version: str, deferred: bool, teacher_s: float = 0.0) -> None:
        with self._lock:
            c = self._counts[domain].setdefault(version, {"served": 0, "deferred": 0, "teacher_seconds": 0.0})
            c["deferred" if deferred else "served"] += 1
            c["teacher_seconds"] = round(c["teacher_seconds"] + teacher_s, 3)

    async def answer(self, req: wire.ChatRequest, raw: dict, domain: str, max_tokens: int,
                     request: Request | None = None) -> Response:
        neuron = self.students.registry.get(domain)
        try:
            call = await asyncio.to_thread(neuron.submit, req.chat(), max_tokens, tools=req.tools,
                                           tool_choice=req.tool_choice, response_format=req.response_format,
                                           logprobs=0)
        except EngineClosed as exc:
            raise wire.APIError(503, str(exc), type="server_error", code="shutting_down") from None
        except ToolError as exc:
            raise wire.APIError(400, f"cannot answer with tools: {exc}", param="tools") from None
        except StructureError as exc:
            raise wire.APIError(400, str(exc), code="invalid_response_format", param="response_format") from None
        text = "".join(await asyncio.to_thread(list, call))
        score = self.score(call)
        rule = self.rule(domain, call.version)
        signal = f"{score['confidence']:.4f}"
        if not accepts(rule, score):
            tic = time.perf_counter()
            try:
                response = await self.teacher.answer(req, raw, domain, max_tokens)
            finally:  # a stream's seconds: until the teacher's answer began
                self._count(domain, call.version, True, time.perf_counter() - tic)
            response.headers.update({"x-conch-answered-by": "ego", "x-conch-deferred": "true",
                                     "x-conch-signal": signal, "x-conch-student-version": call.version})
            return response
        self._count(domain, call.version, False)
        return self.students_answer(req, call, text, domain, {"x-conch-answered-by": f"{domain}@{call.version}",
                                                              "x-conch-deferred": "false", "x-conch-signal": signal,
                                                              "x-conch-version": call.version})

    def score(self, call) -> dict:
        """What the rule reads of an answer: its mean token log-probability, whether it ended, how it repeats."""
        tokens = [t.token for t in call.token_logprobs]
        confidence = (sum(t.logprob for t in call.token_logprobs) / len(tokens)) if tokens else float("-inf")
        repeats = answer_checks(self.students.registry.tokenizer, [tokens])["repeated_4grams"]
        return {"confidence": confidence, "ended": call.finish_reason is Finish.STOP, "repeated_4grams": repeats}

    @staticmethod
    def students_answer(req: wire.ChatRequest, call, text: str, domain: str, headers: dict) -> Response:
        parsed = call.parsed()
        calls = parsed.tool_calls
        reason = "tool_calls" if calls and call.finish_reason is Finish.STOP else call.finish_reason.value
        content = (parsed.content or None) if calls else text
        cid, fingerprint = wire.completion_id(), f"{domain}@{call.version}"
        counts = wire.usage(call.prompt_tokens, call.completion_tokens)
        if not req.stream:
            return JSONResponse(wire.completion(cid, req.model, content, reason, counts, fingerprint, None, calls),
                                headers=headers)

        async def events():
            yield wire.sse(wire.chunk(cid, req.model, {"role": "assistant", "content": ""}, fingerprint=fingerprint))
            if content:
                yield wire.sse(wire.chunk(cid, req.model, {"content": content}, fingerprint=fingerprint))
            if calls:
                yield wire.sse(wire.chunk(cid, req.model, {"tool_calls": wire.tool_call_deltas(calls)},
                                          fingerprint=fingerprint))
            yield wire.sse(wire.chunk(cid, req.model, {}, reason, fingerprint))
            if req.stream_options and req.stream_options.include_usage:
                yield wire.sse(wire.chunk(cid, req.model, None, usage=counts, fingerprint=fingerprint))
            yield wire.sse("[DONE]")

        return StreamingResponse(wire.guarded(events()), media_type="text/event-stream", headers=headers)
