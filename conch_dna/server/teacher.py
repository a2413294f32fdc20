"""The teacher's answers for `ego/<domain>`: from an upstream OpenAI-compatible server (the request as it
came, the answer as it went, capped) or from the config's teacher in this process; either way recorded as a
trace of the domain after it was sent, with the upstream's logprobs as its top-k when they map."""

import asyncio
import json
import logging
import os
import threading
from pathlib import Path

import conch_dna.server.wire as wire
from conch_dna.models.loading import load_tokenizer_only, tokenizer_fingerprint
from conch_dna.models.structured import StructureError
from conch_dna.models.tools import ToolError
from conch_dna.settings.config import Config
from conch_dna.traces.ego import Ego
from conch_dna.traces.ingest import record
from conch_dna.traces.store import TraceStore
from conch_dna.traces.upstream import TokenMap, topk_from_logprobs, trace_messages

import httpx
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

log = logging.getLogger("conch.serve")


class TeacherAnswers:
    """Chat completions from the EGO, each kept as a trace."""

    def __init__(self, home: Path, config: Config, store: TraceStore):
        self.home, self.config, self.store, self.ego = home, config, store, config.ego
        self.teacher_name = self.ego.upstream_model or config.teacher
        self.client = httpx.AsyncClient(timeout=self.ego.timeout_s) if self.ego.upstream_url else None
        self._local_ego: Ego | None = None
        self._lock = threading.Lock()
        self._token_map: tuple[TokenMap, str] | None = None

    async def answer(self, req: wire.ChatRequest, raw: dict, domain: str, max_tokens: int) -> Response:
        if self.client is not None:
            return await self.upstream(req, raw, domain, max_tokens)
        return await self.local(req, domain, max_tokens)

    async def local(self, req: wire.ChatRequest, domain: str, max_tokens: int) -> Response:
        """The config's teacher in this process (greedy, as the EGO answers agent code)."""
        with self._lock:
            if self._local_ego is None:
                self._local_ego = Ego(home=self.home, store=self.store)
        messages = trace_messages(req.chat(), "")[:-1]
        try:
            answer = await asyncio.to_thread(self._local_ego.answer, messages, max_tokens, req.tools, req.tool_choice,
                                             req.response_format)
        except ToolError as exc:
            raise wire.APIError(400, f"cannot answer with tools: {exc}", param="tools") from None
        except StructureError as exc:
            raise wire.APIError(400, str(exc), code="invalid_response_format", param="response_format") from None
        keep = BackgroundTask(self._local_ego.record, domain, messages, answer, {"via": "conch serve"}, req.tools,
                              req.response_format)
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

    async def upstream(self, req: wire.ChatRequest, raw: dict, domain: str, max_tokens: int) -> Response:
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
            keep = BackgroundTask(self.record_upstream, domain, messages, answer, content, req.tools,
                                  req.response_format)
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
                self.record_upstream(domain, messages, message, answer["content"], req.tools, req.response_format)

        return StreamingResponse(wire.guarded(events()), media_type="text/event-stream",
                                 background=BackgroundTask(keep))

    def record_upstream(self, domain: str, messages: list[dict], answer: dict, content,
                        tools: list[dict] | None = None, response_format: dict | None = None) -> None:
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
                          meta={"via": "conch serve"}, store=self.store, tools=tools,
                          response_format=response_format)
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
