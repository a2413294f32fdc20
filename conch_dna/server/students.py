"""The students' answers: a chat answered by a domain's neuron (its current version or a kept one), streamed
or not, with tool calls read back from its text; a caller that leaves cancels its call."""

import asyncio
import logging
import threading
from collections import OrderedDict

import conch_dna.server.wire as wire
from conch_dna.models.structured import StructureError
from conch_dna.models.tools import ToolError

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from neurons.batching import EngineClosed, Finish
from neurons.registry import NeuronRegistry, VersionRefused

log = logging.getLogger("conch.serve")
PINNED_KEPT = 4  # pinned versions kept loaded between requests (each is one adapter's weights)
_DONE = object()


class StudentAnswers:
    """Chat completions from the neurons of one registry."""

    def __init__(self, registry: NeuronRegistry):
        self.registry = registry
        self._pins: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def neuron(self, domain: str, version: str | None):
        if version is None:
            return self.registry.get(domain)
        with self._lock:
            if (domain, version) in self._pins:
                self._pins.move_to_end((domain, version))
                return self._pins[(domain, version)]
        try:
            with self.registry.pinned(domain, version) as neuron:
                pass
        except VersionRefused as exc:
            raise wire.APIError(400, str(exc), code="version_refused", param="model") from None
        with self._lock:
            self._pins[(domain, version)] = neuron
            while len(self._pins) > PINNED_KEPT:
                self._pins.popitem(last=False)
        return neuron

    async def answer(self, req: wire.ChatRequest, domain: str, version: str | None, max_tokens: int,
                     request: Request | None = None) -> Response:
        """The chat answered by the domain's student (its current version, or `version`), streamed or not."""
        sampling = {"stop": req.stop, "logprobs": req.wanted_logprobs()}
        if req.temperature:  # none or 0: greedy, where top_p means nothing
            sampling["temperature"] = req.temperature
            if req.top_p is not None and req.top_p < 1.0:
                sampling["top_p"] = req.top_p
        neuron = await asyncio.to_thread(self.neuron, domain, version)
        try:
            call = await asyncio.to_thread(neuron.submit, req.chat(), max_tokens, tools=req.tools,
                                           tool_choice=req.tool_choice, response_format=req.response_format,
                                           **sampling)
        except EngineClosed as exc:
            raise wire.APIError(503, str(exc), type="server_error", code="shutting_down") from None
        except StructureError as exc:
            raise wire.APIError(400, str(exc), code="invalid_response_format", param="response_format") from None
        except ToolError as exc:
            raise wire.APIError(400, f"cannot answer with tools: {exc}", param="tools") from None
        except (ValueError, TypeError) as exc:
            raise wire.APIError(400, f"cannot answer this chat: {exc}") from None
        cid, fingerprint = wire.completion_id(), f"{domain}@{call.version}"
        headers = {"x-conch-version": call.version, "x-conch-answered-by": fingerprint}
        decode = self.registry.tokenizer.decode

        def logprobs_of(start: int, end: int | None = None) -> list[dict] | None:
            if call.logprobs is None:
                return None
            return wire.token_logprobs(call.token_logprobs[start:end], lambda t: decode([t]))

        def done(kind: str) -> None:
            log.info("%s %s on %s: %s after %d tokens", kind, req.model, call.version,
                     call.finish_reason.value if call.finish_reason else "error", call.completion_tokens)

        def finish() -> tuple[str, list[dict]]:
            calls = call.parsed().tool_calls
            return ("tool_calls" if calls and call.finish_reason is Finish.STOP else call.finish_reason.value), calls

        if not req.stream:
            watch = asyncio.ensure_future(_cancel_when_gone(request, call)) if request is not None else None
            try:
                text = "".join([part async for part in _chunks(call)])
            finally:
                if watch is not None:
                    watch.cancel()
            done("answered")
            counts = wire.usage(call.prompt_tokens, call.completion_tokens)
            reason, calls = finish()
            content = call.parsed().content if calls else text
            whole = wire.completion(cid, req.model, content or (None if calls else ""), reason, counts, fingerprint,
                                    logprobs_of(0), calls)
            return JSONResponse(whole, headers=headers)

        async def events():
            yield wire.sse(wire.chunk(cid, req.model, {"role": "assistant", "content": ""}, fingerprint=fingerprint))
            seen, text = 0, _ContentOnly(call.tools.format if call.tools else None)
            async for part in _chunks(call):
                # the tokens of this text; a token decoded since may come along, none is sent twice
                end = len(call.token_logprobs)
                if content := text.add(part):
                    yield wire.sse(wire.chunk(cid, req.model, {"content": content}, fingerprint=fingerprint,
                                              logprobs=logprobs_of(seen, end)))
                    seen = end
            reason, calls = finish()
            if calls:
                yield wire.sse(wire.chunk(cid, req.model, {"tool_calls": wire.tool_call_deltas(calls)},
                                          fingerprint=fingerprint))
            elif held := text.held():  # tool-call markup that read as no call is the answer's text
                yield wire.sse(wire.chunk(cid, req.model, {"content": held}, fingerprint=fingerprint))
            yield wire.sse(wire.chunk(cid, req.model, {}, reason, fingerprint, logprobs_of(seen)))
            if req.stream_options and req.stream_options.include_usage:
                counts = wire.usage(call.prompt_tokens, call.completion_tokens)
                yield wire.sse(wire.chunk(cid, req.model, None, usage=counts, fingerprint=fingerprint))
            yield wire.sse("[DONE]")
            done("streamed")

        return StreamingResponse(wire.guarded(events()), media_type="text/event-stream", headers=headers)


class _ContentOnly:
    """A streamed answer's text with its tool calls held back: what may be sent as `content` now.
    A possible start of a call's markup is held until it is one, or is not."""

    def __init__(self, fmt):
        self.fmt, self.pending, self.in_call = fmt, "", False

    def add(self, part: str) -> str:
        if self.fmt is None:
            return part
        self.pending += part
        if self.in_call:
            return ""
        at = self.pending.find(self.fmt.start)
        if at >= 0:
            self.in_call = True
            sent, self.pending = self.pending[:at], self.pending[at:]
            return sent
        keep = next((n for n in range(min(len(self.fmt.start) - 1, len(self.pending)), 0, -1)
                     if self.fmt.start.startswith(self.pending[-n:])), 0)
        sent, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return sent

    def held(self) -> str:
        return self.pending


async def _chunks(call):
    """A call's text chunks, read on a thread of their own; leaving early cancels the call."""
    loop, queue = asyncio.get_running_loop(), asyncio.Queue()

    def pump() -> None:
        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone (shutdown): nobody reads any more
                call.cancel()

        try:
            for part in call:
                put(part)
            put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - handed to the request that reads it
            put(exc)

    threading.Thread(target=pump, name="conch-serve-call", daemon=True).start()
    try:
        while (item := await queue.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        call.cancel()  # the caller went away, or it is over (then a no-op)


async def _cancel_when_gone(request: Request, call) -> None:
    """Cancel a call whose caller went away before its (non-streamed) answer was ready: the body is read,
    so the next message the server hands over is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    call.cancel()
