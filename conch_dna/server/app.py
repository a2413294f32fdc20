"""`conch serve`: the neurons and the EGO behind an OpenAI-compatible HTTP API, on loopback.

    conch serve                                  # http://127.0.0.1:8321/v1
    client = openai.OpenAI(base_url="http://127.0.0.1:8321/v1", api_key="-")
    client.chat.completions.create(model="thinking", messages=[{"role": "user", "content": "Why?"}])

`model` names what answers: "thinking" is the domain's newest validated student (hot-swapped),
"thinking@v0003" a kept version of it, "ego/thinking" (or a name in [ego] aliases) the teacher,
whose answer is then recorded as a trace of the domain. The teacher is an upstream
OpenAI-compatible server ([ego] upstream_url) or the config's teacher, loaded in this process.
`POST /v1/traces` takes JSONL trace lines from agents on other machines, through the inbox's ingest
(refused with [server] accept_traces = false). A host other than loopback is refused unless a bearer
token is set ([server] token_env); with a token, every request must carry it. Requests from web pages
(an Origin, a foreign Host, a body not declared as JSON) are refused (conch_dna.server.guard); every
connection, body and intake is bounded (conch_dna.server.connections, [server]). Message contents are
never logged.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import asynccontextmanager
from pathlib import Path

import conch_dna.server.wire as wire
from conch_dna.models.loading import load_tokenizer_only, tokenizer_fingerprint
from conch_dna.models.tools import ToolError
from conch_dna.models.versions import list_versions
from conch_dna.server.connections import Waiting, connection_cap, guarded_protocol, rate_limit_server_logs
from conch_dna.server.guard import RequestGuard
from conch_dna.settings.config import Config, load_config
from conch_dna.traces.ego import Ego
from conch_dna.traces.ingest import ingest_bytes, record
from conch_dna.traces.store import TraceStore
from conch_dna.traces.upstream import TokenMap, topk_from_logprobs, trace_messages

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from neurons.batching import EngineClosed, Finish
from neurons.registry import NeuronRegistry, VersionRefused

log = logging.getLogger("conch.serve")
EGO_PREFIX = "ego/"
GRACE_S = 10  # on stop, answers still streaming get this long to finish before they are cut
PINNED_KEPT = 4  # pinned versions kept loaded between requests (each is one adapter's weights)
REASONS_SHOWN = 100  # refused lines of a POST of traces whose reasons the answer gives; the rest are counted
_DONE = object()


class ServeError(RuntimeError):
    """The server cannot start as asked (e.g. a public host without a bearer token)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_token(config: Config) -> str | None:
    """The token every request must carry, from the variable [server] token_env names; None if unset."""
    return os.environ.get(config.server.token_env) or None


def check_exposure(host: str, token: str | None, token_env: str) -> None:
    if not is_loopback(host) and not token:
        raise ServeError(f"refusing to listen on {host}, which is not loopback, without a bearer token: "
                         f"set ${token_env} (every request must then send 'Authorization: Bearer <token>')")


class ConchAPI:
    """The endpoints, over one neuron registry and one teacher (upstream or in process)."""

    def __init__(self, home: Path, config: Config, registry: NeuronRegistry, token: str | None = None):
        self.home, self.config, self.registry, self.token = home, config, registry, token
        self.store = TraceStore.for_home(home, config)
        self.ego = config.ego
        self.teacher_name = self.ego.upstream_model or config.teacher
        self.client = httpx.AsyncClient(timeout=self.ego.timeout_s) if self.ego.upstream_url else None
        self._local_ego: Ego | None = None
        self._pins: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self._token_map: tuple[TokenMap, str] | None = None
        self._writes = _ByteBudget(config.server.traces_mb_per_hour * 2**20, 3600.0)

    # -- routing a model name -----------------------------------------------------------------

    def route(self, model: str) -> tuple[str, str, str | None]:
        """("neuron" | "ego", domain, version or None) for a request's `model`; 404 if unknown."""
        domains = self.registry.domains
        if model.startswith(EGO_PREFIX) and model[len(EGO_PREFIX):] in domains:
            return "ego", model[len(EGO_PREFIX):], None
        if model in self.ego.aliases:
            return "ego", self.ego.aliases[model], None
        domain, _, version = model.partition("@")
        if domain in domains and not version:
            return "neuron", domain, None
        if domain in domains and version in list_versions(self.home, domain):
            return "neuron", domain, version
        if domain in domains:
            kept = ", ".join(list_versions(self.home, domain)) or "none"
            raise wire.APIError(404, f"model {model!r} does not exist: {domain} has no version {version!r} "
                                f"(kept: {kept})", code="model_not_found", param="model")
        raise wire.APIError(404, f"model {model!r} does not exist; known: {', '.join(domains)}, a domain@version "
                            f"(see /v1/models), or ego/<domain>", code="model_not_found", param="model")

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

    # -- endpoints ----------------------------------------------------------------------------

    async def models(self, request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": self.model_list()})

    async def model(self, request: Request) -> JSONResponse:
        name = request.path_params["model"]
        for entry in self.model_list():
            if entry["id"] == name:
                return JSONResponse(entry)
        raise wire.APIError(404, f"model {name!r} does not exist", code="model_not_found", param="model")

    def model_list(self) -> list[dict]:
        now = int(time.time())

        def entry(name: str, owner: str, **extra) -> dict:
            return {"id": name, "object": "model", "created": now, "owned_by": owner, **extra}

        out = []
        for d in self.registry.domains:
            out.append(entry(d, "conch", serving_version=self.registry.next_version(d)))
            out += [entry(f"{d}@{v}", "conch") for v in list_versions(self.home, d)]
        out += [entry(f"{EGO_PREFIX}{d}", "conch-ego", teacher=self.teacher_name) for d in self.registry.domains]
        out += [entry(name, "conch-ego", teacher=self.teacher_name, domain=d) for name, d in self.ego.aliases.items()]
        return out

    async def chat(self, request: Request) -> Response:
        req, raw = wire.parse_request(await self._body(request))
        kind, domain, version = self.route(req.model)
        max_tokens = req.wanted_max_tokens(self.config.server.default_max_tokens, self.config.server.max_tokens)
        if kind == "neuron":
            return await self.neuron_chat(req, domain, version, max_tokens, request)
        if self.client is not None:
            return await self.upstream_chat(req, raw, domain, max_tokens)
        return await self.local_ego_chat(req, domain, max_tokens)

    async def traces(self, request: Request) -> JSONResponse:
        """POST /v1/traces: JSONL trace lines from an agent elsewhere, through the inbox's ingest (the same
        validation, dedup and quarantine); the answer counts each outcome and gives each refused line's reason."""
        settings = self.config.server
        if not settings.accept_traces:
            raise wire.APIError(403, "this server takes no traces ([server] accept_traces = false)",
                                code="traces_refused")
        client = request.client.host if request.client else "unknown"
        free_mb = shutil.disk_usage(self.home).free / 2**20
        if free_mb < settings.min_free_disk_mb:
            raise wire.APIError(507, f"the home's disk has {free_mb:.0f} MB free, under [server] min_free_disk_mb "
                                f"= {settings.min_free_disk_mb}: no traces are taken until there is more",
                                type="server_error", code="disk_full")
        data = await self._body(request, settings.max_traces_mb * 2**20)
        if (lines := data.count(b"\n") + (not data.endswith(b"\n") and bool(data))) > settings.max_trace_lines:
            raise wire.APIError(413, f"{lines} lines are over this server's limit of {settings.max_trace_lines} a "
                                "request ([server] max_trace_lines): send them in parts", code="too_many_lines")
        if (wait := self._writes.take(client, len(data))) is not None:
            raise wire.APIError(429, f"{client} has sent its [server] traces_mb_per_hour = "
                                f"{settings.traces_mb_per_hour:g}; try again in {wait:.0f} s", code="rate_limited",
                                headers={"retry-after": str(int(wait) + 1)})
        report = await asyncio.to_thread(ingest_bytes, self.store, data, f"POST /v1/traces from {client}")
        reasons = await asyncio.to_thread(self.store.quarantine_reasons, hashlib.sha256(data).hexdigest())
        log.info("POST /v1/traces from %s: %d stored, %d duplicates, %d quarantined", client, report.stored,
                 report.duplicates, report.quarantined)
        shown = sorted(reasons.items())[:REASONS_SHOWN]
        return JSONResponse({"lines": report.lines, "stored": report.stored, "duplicates": report.duplicates,
                             "quarantined": report.quarantined, "outcomes": report.outcomes,
                             "reasons": {str(k): v for k, v in shown},
                             "reasons_not_shown": max(0, len(reasons) - len(shown))})

    async def _body(self, request: Request, limit: int | None = None) -> bytes:
        limit = limit or self.config.server.max_request_kb * 1024
        too_large = wire.APIError(413, f"the request body is over this server's limit of {limit} bytes",
                                  code="request_too_large")
        if int(request.headers.get("content-length") or 0) > limit:
            raise too_large
        body = bytearray()

        async def read() -> None:
            async for part in request.stream():
                body.extend(part)
                if len(body) > limit:
                    raise too_large

        timeout = self.config.server.body_timeout_s
        try:
            await asyncio.wait_for(read(), timeout)
        except ClientDisconnect:
            raise wire.APIError(400, "the client went away before its request was read") from None
        except asyncio.TimeoutError:
            raise wire.APIError(408, f"the request body did not arrive within {timeout:g} s ([server] "
                                "body_timeout_s)", code="request_timeout") from None
        return bytes(body)

    # -- the neurons --------------------------------------------------------------------------

    async def neuron_chat(self, req: wire.ChatRequest, domain: str, version: str | None, max_tokens: int,
                          request: Request | None = None) -> Response:
        sampling = {"stop": req.stop, "logprobs": req.wanted_logprobs()}
        if req.temperature:  # none or 0: greedy, where top_p means nothing
            sampling["temperature"] = req.temperature
            if req.top_p is not None and req.top_p < 1.0:
                sampling["top_p"] = req.top_p
        neuron = await asyncio.to_thread(self.neuron, domain, version)
        try:
            call = await asyncio.to_thread(neuron.submit, req.chat(), max_tokens, tools=req.tools,
                                           tool_choice=req.tool_choice, **sampling)
        except EngineClosed as exc:
            raise wire.APIError(503, str(exc), type="server_error", code="shutting_down") from None
        except ToolError as exc:
            raise wire.APIError(400, f"cannot answer with tools: {exc}", param="tools") from None
        except (ValueError, TypeError) as exc:
            raise wire.APIError(400, f"cannot answer this chat: {exc}") from None
        cid, fingerprint = wire.completion_id(), f"{domain}@{call.version}"
        headers = {"x-conch-version": call.version}
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

        return StreamingResponse(_guarded(events()), media_type="text/event-stream", headers=headers)

    # -- the EGO ------------------------------------------------------------------------------

    async def local_ego_chat(self, req: wire.ChatRequest, domain: str, max_tokens: int) -> Response:
        """The config's teacher in this process (greedy, as the EGO answers agent code)."""
        with self._lock:
            if self._local_ego is None:
                self._local_ego = Ego(home=self.home, store=self.store)
        messages = trace_messages(req.chat(), "")[:-1]
        try:
            answer = await asyncio.to_thread(self._local_ego.answer, messages, max_tokens, req.tools, req.tool_choice)
        except ToolError as exc:
            raise wire.APIError(400, f"cannot answer with tools: {exc}", param="tools") from None
        keep = BackgroundTask(self._local_ego.record, domain, messages, answer, {"via": "conch serve"}, req.tools)
        cid, counts = wire.completion_id(), wire.usage(answer.prompt_tokens, answer.completion_tokens)
        message = answer.message()
        if not req.stream:
            whole = wire.completion(cid, req.model, message["content"], answer.finish_reason, counts,
                                    tool_calls=answer.tool_calls)
            return JSONResponse(whole, background=keep)

        async def events():
            yield wire.sse(wire.chunk(cid, req.model, {"role": "assistant", "content": ""}))
            if message["content"]:
                yield wire.sse(wire.chunk(cid, req.model, {"content": message["content"]}))
            if answer.tool_calls:
                yield wire.sse(wire.chunk(cid, req.model, {"tool_calls": wire.tool_call_deltas(answer.tool_calls)}))
            yield wire.sse(wire.chunk(cid, req.model, {}, answer.finish_reason))
            if req.stream_options and req.stream_options.include_usage:
                yield wire.sse(wire.chunk(cid, req.model, None, usage=counts))
            yield wire.sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", background=keep)

    async def upstream_chat(self, req: wire.ChatRequest, raw: dict, domain: str, max_tokens: int) -> Response:
        """The request goes to the upstream teacher as it came (tools and all; its model renamed);
        the answer comes back as the upstream sent it, and is recorded after it was sent."""
        body = {**{k: v for k, v in raw.items() if k != "max_completion_tokens"},
                "model": self.teacher_name, "max_tokens": max_tokens}
        if self.ego.top_logprobs:  # for the trace's top-k; the caller gets what it asked for
            body["logprobs"], body["top_logprobs"] = True, max(self.ego.top_logprobs, req.top_logprobs or 0)
        url = f"{self.ego.upstream_url}/chat/completions"
        key = os.environ.get(self.ego.api_key_env) if self.ego.api_key_env else None
        try:
            response = await self.client.send(
                self.client.build_request("POST", url, json=body,
                                          headers={"Authorization": f"Bearer {key}"} if key else {}),
                stream=True)
        except httpx.HTTPError as exc:
            raise wire.APIError(502, f"the upstream teacher at {url} could not be reached: {exc!r}",
                                type="upstream_error", code="upstream_unreachable") from None
        if response.status_code >= 400:
            detail = (await response.aread())[:500].decode("utf-8", "replace")
            await response.aclose()
            raise wire.APIError(502, f"the upstream teacher at {url} answered {response.status_code}: {detail}",
                                type="upstream_error", code="upstream_error")
        messages = req.chat()
        if not req.stream:
            try:
                data = await _read_json(response)
                choice = data["choices"][0]
                message, content = choice["message"], (choice.get("logprobs") or {}).get("content")
                answer = {"role": "assistant", "content": message.get("content"),
                          "tool_calls": message.get("tool_calls")}
            except (ValueError, KeyError, IndexError, TypeError, AttributeError, httpx.HTTPError) as exc:
                raise wire.APIError(502, f"the upstream teacher at {url} sent no chat completion: {exc!r}",
                                    type="upstream_error", code="upstream_error") from None
            data["model"] = req.model
            _as_asked(choice, req)
            keep = BackgroundTask(self.record_upstream, domain, messages, answer, content, req.tools)
            return JSONResponse(data, background=keep)

        answer = {"parts": [], "content": [], "calls": wire.StreamedCalls(), "complete": False}
        cap, read = self.ego.max_answer_kb * 1024, 0

        async def events():
            nonlocal read
            try:
                async for line in response.aiter_lines():
                    read += len(line) + 1
                    if read > cap:  # cut off: what was sent is not the teacher's whole answer, and is not kept
                        raise wire.APIError(502, f"the upstream's answer is over [ego] max_answer_kb = "
                                            f"{self.ego.max_answer_kb}: cut off", type="upstream_error",
                                            code="upstream_answer_too_long")
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:"):].strip()
                    if payload == "[DONE]":
                        answer["complete"] = True
                        yield wire.sse("[DONE]")
                        return
                    try:
                        data = json.loads(payload)
                    except ValueError:
                        continue  # not ours to repair; the answer's other chunks still count
                    for choice in data.get("choices") or []:
                        delta = choice.get("delta") or {}
                        answer["parts"].append(delta.get("content") or "")
                        answer["calls"].add(delta.get("tool_calls"))
                        answer["content"] += (choice.get("logprobs") or {}).get("content") or []
                        _as_asked(choice, req)
                    data["model"] = req.model
                    yield wire.sse(data)
            finally:
                await response.aclose()

        def keep() -> None:
            if answer["complete"]:  # an answer cut off by a caller who left is not the teacher's answer
                message = {"role": "assistant", "content": "".join(answer["parts"]) or None,
                           "tool_calls": answer["calls"].calls() or None}
                self.record_upstream(domain, messages, message, answer["content"], req.tools)

        return StreamingResponse(_guarded(events()), media_type="text/event-stream", background=BackgroundTask(keep))

    def record_upstream(self, domain: str, messages: list[dict], answer: dict, content,
                        tools: list[dict] | None = None) -> None:
        """The trace of an upstream answer (text or tool calls); top-k when its logprobs map to the
        teacher's token ids."""
        topk = None
        if content:
            try:
                token_map, fingerprint = self.teacher_tokens()
                topk = topk_from_logprobs(content, token_map, fingerprint)
            except Exception:  # noqa: BLE001 - without top-k the retrain's teacher pass makes it
                log.exception("cannot map the upstream's logprobs to %s's tokens", self.config.teacher)
        trace_id = record(domain, trace_messages(messages, answer), teacher=self.teacher_name, topk=topk,
                          meta={"via": "conch serve"}, store=self.store, tools=tools)
        log.info("recorded an EGO answer of %s (%s top-k)", domain, "with" if topk else "without")
        return trace_id

    def teacher_tokens(self) -> tuple[TokenMap, str]:
        with self._lock:
            if self._token_map is None:
                tokenizer = load_tokenizer_only(self.config.teacher)
                self._token_map = TokenMap(tokenizer), tokenizer_fingerprint(tokenizer)
            return self._token_map

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
        if self._local_ego is not None:
            await asyncio.to_thread(self._local_ego.close)


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


class _ByteBudget:
    """Bytes each client may write in a window (a token bucket refilled over `window_s`)."""

    def __init__(self, per_window: float, window_s: float):
        self.per_window, self.window_s, self._buckets = per_window, window_s, {}

    def take(self, client: str, n: int) -> float | None:
        """Spend `n` of the client's bytes; None if it had them, else the seconds until it will."""
        now = time.monotonic()
        level, at = self._buckets.get(client, (self.per_window, now))
        level = min(self.per_window, level + (now - at) * self.per_window / self.window_s)
        if n > level:
            self._buckets[client] = (level, now)
            return (n - level) * self.window_s / self.per_window
        self._buckets[client] = (level - n, now)
        if len(self._buckets) > 10_000:  # clients seen long ago are full again: forget them
            self._buckets = {c: v for c, v in self._buckets.items() if now - v[1] < self.window_s}
        return None


async def _guarded(events):
    """A stream's events; an error after the response began ends the stream with an error event."""
    try:
        async for event in events:
            yield event
    except wire.APIError as exc:
        yield wire.sse(exc.body())
    except Exception as exc:  # noqa: BLE001 - the status line is sent; say it in the stream
        log.exception("a stream failed")
        yield wire.sse(wire.APIError(500, f"the answer failed: {exc}", type="server_error").body())


async def _read_json(response) -> dict:
    try:
        return json.loads((await response.aread()).decode("utf-8"))
    finally:
        await response.aclose()


def _as_asked(choice: dict, req: wire.ChatRequest) -> None:
    """The upstream's logprobs as the caller asked for them: none, or `top_logprobs` alternatives."""
    lp = choice.get("logprobs")
    if not req.logprobs:
        choice["logprobs"] = None
    elif isinstance(lp, dict) and isinstance(lp.get("content"), list):
        for position in lp["content"]:
            if isinstance(position, dict) and isinstance(position.get("top_logprobs"), list):
                position["top_logprobs"] = position["top_logprobs"][: req.top_logprobs or 0]


# -- the app ----------------------------------------------------------------------------------


def _error_response(request: Request, exc: Exception) -> JSONResponse:
    if isinstance(exc, wire.APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
    if isinstance(exc, HTTPException):
        kind = "not_found" if exc.status_code == 404 else "method_not_allowed" if exc.status_code == 405 else None
        error = wire.APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=kind)
        return JSONResponse(error.body(), status_code=exc.status_code)
    log.error("a request failed: %r", exc)
    return JSONResponse(wire.APIError(500, f"the server failed: {exc}", type="server_error").body(), status_code=500)


def create_app(api: ConchAPI, host: str | None = None):
    """The ASGI app; every request first passes RequestGuard (the bound `host`, the token, the origins)."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        await api.close()

    app = Starlette(
        routes=[Route("/v1/chat/completions", api.chat, methods=["POST"]),
                Route("/v1/traces", api.traces, methods=["POST"]),
                Route("/v1/models", api.models, methods=["GET"]),
                Route("/v1/models/{model:path}", api.model, methods=["GET"])],
        exception_handlers={Exception: _error_response, HTTPException: _error_response, wire.APIError: _error_response},
        lifespan=lifespan)
    settings = api.config.server
    return RequestGuard(app, host or settings.host, api.token, settings.allowed_hosts, settings.allowed_origins)


class Server:
    """`conch serve` on a thread of its own (the daemon's and the tests' way); port 0 picks a free one."""

    def __init__(self, home: str | Path, host: str | None = None, port: int | None = None,
                 registry: NeuronRegistry | None = None):
        import uvicorn

        self.home = Path(home)
        config = load_config(self.home)
        self.host = host or config.server.host
        token = bearer_token(config)
        check_exposure(self.host, token, config.server.token_env)
        self._own_registry = registry is None
        self.registry = registry or NeuronRegistry(self.home)
        self.api = ConchAPI(self.home, config, self.registry, token)
        port = config.server.port if port is None else port
        rate_limit_server_logs()
        self.connections = Waiting(connection_cap(config.server.max_connections), config.server.header_timeout_s)
        self.server = uvicorn.Server(uvicorn.Config(create_app(self.api, self.host), host=self.host, port=port,
                                                    log_level="warning", lifespan="on",
                                                    http=guarded_protocol(self.connections),
                                                    timeout_graceful_shutdown=GRACE_S))
        self.thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/v1"

    def start(self) -> Server:
        self.thread = threading.Thread(target=self.server.run, name="conch-serve", daemon=True)
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise ServeError(f"the server did not start on {self.host} (is the port in use?)")
            time.sleep(0.02)
        log.info("serving the OpenAI API on %s", self.url)
        return self

    def run(self, ready: Callable[[str], None] | None = None) -> None:
        """In the foreground until SIGINT / SIGTERM, then as stop(); `ready(url)` once it listens.
        The handlers only set a flag: the server runs on its own thread, so uvicorn installs none
        of its own (which would end the process by the signal, not with status 0)."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        self.start()
        try:
            if ready:
                ready(self.url)
            while not stop.wait(0.5) and self.thread.is_alive():
                pass
        finally:
            self.stop()

    def stop(self) -> None:
        """Take no new connection, let the answers in flight finish (up to GRACE_S), close the
        registry. Twice is harmless."""
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=GRACE_S + 30)
        self._close_registry()

    def _close_registry(self) -> None:
        if self._own_registry:
            self.registry.close()
