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
import json
import logging
import time

import conch_dna.server.wire as wire
from conch_dna.models.loading import ModelLoadError
from conch_dna.models.structured import StructureError
from conch_dna.models.tools import ToolError
from conch_dna.server.students import StudentAnswers
from conch_dna.server.teacher import TeacherAnswers

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from neurons.batching import EngineClosed, Finish
from neurons.deferral import same_answer

log = logging.getLogger("conch.serve")
AUTO_PREFIX = "auto/"


class CascadeAnswers:
    """Student first, the teacher when the student's answer is not accepted (neurons.deferral judges, and
    counts each call per version in the store)."""

    def __init__(self, home, students: StudentAnswers, teacher: TeacherAnswers):
        self.home, self.students, self.teacher = home, students, teacher
        self.config = teacher.config
        self.deferral = students.registry.deferral

    def stats(self) -> dict:
        """Per domain and version: calls the student served, deferred, served unverified, the teacher's seconds
        on them, and of the deferred calls compared, how many the student had answered as the teacher did."""
        out: dict[str, dict] = {}
        for row in self.deferral.store.auto_answers():
            out.setdefault(row.pop("domain"), {})[row.pop("version")] = row
        return out

    async def _count(self, domain: str, version: str, outcome: str, teacher_s: float = 0.0,
                     agreed: bool | None = None) -> None:
        await asyncio.to_thread(self.deferral.count, domain, version, outcome, teacher_s, agreed)

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
        accepted, score = await asyncio.to_thread(self.deferral.judge, domain, call)
        signal = f"{score['confidence']:.4f}"
        student = {"x-conch-answered-by": f"{domain}@{call.version}", "x-conch-deferred": "false",
                   "x-conch-signal": signal, "x-conch-version": call.version}
        if accepted:
            await self._count(domain, call.version, "served")
            return self.students_answer(req, call, text, domain, student)
        tic = time.perf_counter()
        try:
            response = await asyncio.wait_for(self.teacher.answer(req, raw, domain, max_tokens),
                                              self.config.auto_teacher_timeout_s)
        except (wire.APIError, ModelLoadError, OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, wire.APIError) and exc.status < 500:
                raise  # the request's own fault: the teacher would refuse it whoever asked
            reason = _failure(exc, self.config.auto_teacher_timeout_s)
            log.warning("auto/%s: the teacher could not answer a deferred call (%s)", domain, reason)
            if self.config.auto_unverified == "refuse":
                raise wire.APIError(502, f"the student's answer was not accepted and the teacher could not "
                                         f"answer: {reason}", type="server_error", code="teacher_failed") from None
            await self._count(domain, call.version, "unverified")  # time lost to a failure, not a teacher's answer
            return self.students_answer(req, call, text, domain, {**student, "x-conch-unverified": reason[:200]})
        await self._count(domain, call.version, "deferred", time.perf_counter() - tic,
                          agrees(call, text, response))  # a stream's seconds: until the teacher's answer began
        response.headers.update({"x-conch-answered-by": "ego", "x-conch-deferred": "true",
                                 "x-conch-signal": signal, "x-conch-student-version": call.version})
        return response

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


def agrees(call, text: str, response: Response) -> bool | None:
    """Whether the student's answer was the teacher's (neurons.deferral.same_answer); None where the teacher's
    answer is a stream, not read here."""
    if isinstance(response, StreamingResponse):
        return None
    try:
        message = json.loads(response.body)["choices"][0]["message"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return same_answer(text, call.parsed().tool_calls, message.get("content"), message.get("tool_calls"))


def _failure(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"it took over auto_teacher_timeout_s = {timeout_s:g}"
    return getattr(exc, "message", None) or str(exc) or type(exc).__name__
