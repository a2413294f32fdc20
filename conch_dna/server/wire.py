"""OpenAI's chat-completions wire format: the request `conch serve` accepts, its errors, the
response and stream chunks it sends (https://platform.openai.com/docs/api-reference/chat)."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Literal

from conch_dna.models.structured import StructureError, response_format_of
from conch_dna.models.tools import check_tools

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

log = logging.getLogger("conch.serve")
MAX_STOP = 4  # stop strings a request may give (OpenAI's limit)


class APIError(Exception):
    """An error as OpenAI sends it: {"error": {"message", "type", "code", "param"}} with a status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    arguments: str


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")  # refusal, audio, ...: accepted, not used
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def plain(self) -> dict:
        """The message as a trace keeps it: text content ("developer" as "system"), its tool
        calls (content None when it has no text) and the call a tool result answers."""
        out = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
            out["content"] = out["content"] or None
        if self.role == "tool" and self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class ChatRequest(BaseModel):
    """A chat-completions request; fields the neurons cannot honour are accepted and ignored
    (seed, user, parallel_tool_calls, ...), except `n` above 1, which would silently answer less."""

    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    n: int = Field(default=1, ge=1, le=1)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None  # text, json_object or json_schema: a neuron's answer is held to it

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v):
        try:
            return response_format_of(v)
        except StructureError as exc:
            raise ValueError(str(exc)) from None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v):
        return check_tools(v) if v else None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        function = v.get("function") if isinstance(v, dict) else None
        if v is None or v in ("auto", "none", "required") or (
                isinstance(v, dict) and v.get("type") == "function" and isinstance(function, dict)
                and isinstance(function.get("name"), str)):
            return v
        raise ValueError('must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOP or not all(stops):
            raise ValueError(f"stop takes at most {MAX_STOP} non-empty strings")
        return stops or None

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def chat(self) -> list[dict]:
        """The messages as a trace keeps them (ChatMessage.plain)."""
        return [m.plain() for m in self.messages]

    def wanted_max_tokens(self, default: int, limit: int) -> int:
        wanted = self.max_completion_tokens or self.max_tokens or default
        if wanted > limit:
            raise APIError(400, f"max_tokens {wanted} is over this server's limit of {limit}",
                           code="max_tokens_too_large", param="max_tokens")
        return wanted

    def wanted_logprobs(self) -> int | None:
        """Alternatives per token the caller asked for; None when it asked for no logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None


def parse_request(body: bytes) -> tuple[ChatRequest, dict]:
    """The request, validated and as it came, or APIError(400) naming what is wrong with it."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply to read") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(data).__name__}")
    try:
        return ChatRequest.model_validate(data), data
    except RecursionError:
        raise APIError(400, "the request is nested too deeply to read") from None
    except ValidationError as exc:
        e = exc.errors()[0]
        where = ".".join(str(x) for x in e["loc"]) or "body"
        raise APIError(400, f"{where}: {e['msg'].removeprefix('Value error, ')}", param=where) from None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def token_logprobs(items, decode) -> list[dict]:
    """OpenAI's logprobs.content for TokenLogprob-like items (token, logprob, top)."""

    def entry(token: int, logprob: float) -> dict:
        text = decode(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in items]


def completion(cid: str, model: str, text: str | None, finish_reason: str, usage: dict,
               fingerprint: str | None = None, logprobs: list[dict] | None = None,
               tool_calls: list[dict] | None = None) -> dict:
    """A whole chat.completion object; with `tool_calls`, its message carries them."""
    message = {"role": "assistant", "content": text}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "message": message,
                     "logprobs": {"content": logprobs} if logprobs is not None else None,
                     "finish_reason": finish_reason}],
        "usage": usage,
    }


def chunk(cid: str, model: str, delta: dict | None, finish_reason: str | None = None,
          fingerprint: str | None = None, logprobs: list[dict] | None = None, usage: dict | None = None) -> dict:
    """One chat.completion.chunk; `delta` None makes the usage-only chunk (no choices)."""
    out = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
           "system_fingerprint": fingerprint, "choices": []}
    if delta is not None:
        out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                           "logprobs": {"content": logprobs} if logprobs is not None else None}]
    if usage is not None:
        out["usage"] = usage
    return out


def tool_call_deltas(calls: list[dict]) -> list[dict]:
    """Tool calls as a stream's `delta.tool_calls`: each whole, with its index."""
    return [{"index": i, **call} for i, call in enumerate(calls)]


class StreamedCalls:
    """An answer's tool calls put back together from a stream's `delta.tool_calls` fragments
    (OpenAI sends a call's id and name first, then its arguments in pieces, keyed by `index`)."""

    MAX_CALLS = 128  # as many as a request may offer tools

    def __init__(self):
        self._calls: dict[int, dict] = {}

    def add(self, fragments) -> None:
        for fragment in fragments if isinstance(fragments, list) else ():
            if not isinstance(fragment, dict):
                continue
            index = fragment.get("index", 0)
            # a fragment that names its call by no usable index belongs to no call: it must not join call 0
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.MAX_CALLS:
                continue
            call = self._calls.setdefault(index, {"id": "", "type": "function",
                                                  "function": {"name": "", "arguments": ""}})
            if isinstance(fragment.get("id"), str):
                call["id"] += fragment["id"]
            function = fragment.get("function") if isinstance(fragment.get("function"), dict) else {}
            for key in ("name", "arguments"):
                if isinstance(function.get(key), str):
                    call["function"][key] += function[key]

    def calls(self) -> list[dict]:
        return [self._calls[i] for i in sorted(self._calls)]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def sse(data) -> bytes:
    """One server-sent event: a JSON object, or the final "[DONE]"."""
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode()


async def guarded(events):
    """A stream's events; an error after the response began ends the stream with an error event."""
    try:
        async for event in events:
            yield event
    except APIError as exc:
        yield sse(exc.body())
    except Exception as exc:  # noqa: BLE001 - the status line is sent; say it in the stream
        log.exception("a stream failed")
        yield sse(APIError(500, f"the answer failed: {exc}", type="server_error").body())
