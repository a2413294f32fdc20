"""The teacher trace: its model, its canonical id, its split, and parsing one JSONL line into it."""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from functools import cached_property
from typing import Literal

from conch_dna.models.chat import prompt_text
from conch_dna.models.structured import StructureError, response_format_of
from conch_dna.models.tools import ToolError, check_tool_calls, check_tools, tool_names
from conch_dna.system.domains import DOMAINS, is_heldout, validate_domain_name

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from typing_extensions import NotRequired, TypedDict

MAX_LINE_BYTES = 1 << 20  # a trace line over 1 MiB is quarantined, not parsed
# Top-k is stored as int32 ids and float16 log-probs: a value is checked against what it becomes there.
MAX_TOKEN_ID = 2**31 - 1
MIN_STORED_LOGPROB = -65504.0  # float16's lowest finite value; below it a log-prob would be stored as -inf


class FunctionCall(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


class ToolCall(TypedDict):
    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    id: str
    type: Literal["function"]
    function: FunctionCall


class Message(TypedDict):
    """One chat message; a TypedDict rather than a model, since ingest validates millions of them.
    An assistant message may carry `tool_calls` (its content then text or None); a `tool` message
    answers one of them by its `tool_call_id` (conch_dna.models.tools)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    role: Literal["system", "user", "assistant", "tool"]
    content: NotRequired[str | None]
    name: NotRequired[str]
    tool_call_id: NotRequired[str]
    tool_calls: NotRequired[list[ToolCall]]


class TopK(BaseModel):
    """The teacher's top-k per answer token: ids in the teacher's vocabulary, log-probs <= 0."""

    model_config = ConfigDict(extra="forbid")
    token_ids: list[list[int]]
    logprobs: list[list[float]]
    tokenizer: str  # tokenizer fingerprint (conch_dna.models.loading.tokenizer_fingerprint)

    @model_validator(mode="after")
    def _shapes(self):
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"topk has {len(self.token_ids)} rows of token_ids but "
                             f"{len(self.logprobs)} rows of logprobs")
        if not self.token_ids:
            raise ValueError("topk has no rows; leave topk out when there is none")
        width = len(self.token_ids[0])
        for i, (ids, lps) in enumerate(zip(self.token_ids, self.logprobs)):
            if len(ids) != len(lps) or not ids:
                raise ValueError(f"topk row {i} has {len(ids)} ids and {len(lps)} logprobs")
            if len(ids) != width:
                raise ValueError(f"topk row {i} has {len(ids)} entries where row 0 has {width}: rows must be "
                                 "equally wide")
            if any(t < 0 or t > MAX_TOKEN_ID for t in ids):
                raise ValueError(f"topk row {i} has a token id outside 0..{MAX_TOKEN_ID}")
            if any(not math.isfinite(v) or v > 1e-4 for v in lps):
                raise ValueError(f"topk row {i} has a logprob that is not a finite value <= 0")
            if any(v < MIN_STORED_LOGPROB for v in lps):
                raise ValueError(f"topk row {i} has a logprob below {MIN_STORED_LOGPROB:g}, which float16 "
                                 "storage would turn into -inf")
        return self


class Trace(BaseModel):
    """One teacher answer: the chat that led to it (last message = the answer) and its source."""

    model_config = ConfigDict(extra="forbid")
    domain: str
    messages: list[Message]
    teacher: str
    tools: list[dict] | None = None  # the OpenAI function tools the chat offered (conch_dna.models.tools)
    # the response_format the answer was asked in (conch_dna.models.structured); None for free text
    response_format: dict | None = None
    topk: TopK | None = None
    created_at: datetime | None = None
    meta: dict = Field(default_factory=dict)

    @field_validator("domain")
    @classmethod
    def _domain(cls, v: str) -> str:
        return validate_domain_name(v)

    @field_validator("teacher")
    @classmethod
    def _teacher(cls, v: str) -> str:
        if not v.strip() or len(v) > 512:
            raise ValueError("teacher must be a non-empty model id of at most 512 characters")
        return v

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: list[dict] | None) -> list[dict] | None:
        return check_tools(v) if v is not None else None

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: dict | None) -> dict | None:
        try:
            form = response_format_of(v)
        except StructureError as exc:
            raise ValueError(str(exc)) from None
        return None if form is None or form["type"] == "text" else form

    @field_validator("messages")
    @classmethod
    def _messages(cls, v: list[Message]) -> list[Message]:
        if len(v) < 2:
            raise ValueError("messages must hold at least a prompt and the teacher's answer")
        for i, m in enumerate(v):
            m.setdefault("content", None)
            if m.get("tool_calls") and m["role"] != "assistant":
                raise ValueError(f"message {i}: only an assistant message makes tool calls, not {m['role']!r}")
            if m["content"] is None and not (m["role"] == "assistant" and m.get("tool_calls")):
                raise ValueError(f"message {i}: a {m['role']} message needs text content "
                                 "(only an assistant message that makes tool calls may have none)")
        if v[-1]["role"] != "assistant":
            raise ValueError(f"the last message must be the teacher's assistant answer, not {v[-1]['role']!r}")
        if not (v[-1]["content"] or "").strip() and not v[-1].get("tool_calls"):
            raise ValueError("the teacher's answer (last message) is empty")
        if all(m["role"] == "assistant" for m in v[:-1]):
            raise ValueError("messages hold no prompt before the teacher's answer")
        return v

    @model_validator(mode="after")
    def _tool_use(self):
        """Every call names an offered tool with JSON-object arguments; every tool result answers a
        call made before it."""
        names, made = tool_names(self.tools), set()
        for i, m in enumerate(self.messages):
            if m.get("tool_calls"):
                try:
                    check_tool_calls(m["tool_calls"], names)
                except ToolError as exc:
                    raise ValueError(f"message {i}: {exc}") from None
                made.update(c["id"] for c in m["tool_calls"])
            if m["role"] == "tool" and m.get("tool_call_id") not in made:
                raise ValueError(f"message {i}: a tool result must answer a call made before it, by its "
                                 f"tool_call_id (got {m.get('tool_call_id')!r})")
        return self

    def chat(self) -> list[dict]:
        return [dict(m) for m in self.messages]

    @property
    def answer_calls(self) -> list[dict]:
        """The tool calls of the teacher's answer (none for a text answer)."""
        return list(self.messages[-1].get("tool_calls") or ())

    @cached_property
    def tools_json(self) -> str | None:
        return json.dumps(self.tools, ensure_ascii=False, separators=(",", ":")) if self.tools else None

    @cached_property
    def response_format_json(self) -> str | None:
        return json.dumps(self.response_format, sort_keys=True, separators=(",", ":")) if self.response_format else None

    @cached_property
    def chat_json(self) -> str:
        """The chat as canonical JSON: what is stored, and what the id is a hash of."""
        return json.dumps(self.messages, ensure_ascii=False, separators=(",", ":"))

    def prompt_text(self) -> str:
        """Everything before the answer: what the train / held-out split is decided on."""
        return prompt_text(self.messages)

    def trace_id(self) -> str:
        """Hash of the canonical content (domain, chat, teacher): the same trace twice is one."""
        h = hashlib.sha256(f"{self.domain}\0{self.teacher}\0".encode())
        h.update(self.chat_json.encode("utf-8"))
        if self.tools_json:  # the same chat offered other tools is another trace; a text trace's id is as ever
            h.update(f"\0tools\0{self.tools_json}".encode())
        if self.response_format_json:  # asked in another form, another trace
            h.update(f"\0response_format\0{self.response_format_json}".encode())
        return h.hexdigest()

    def split(self, heldout_fraction: float = 0.1) -> str:
        """"heldout" or "train": a pure function of the prompt text (see domains.is_heldout)."""
        return "heldout" if is_heldout(self.prompt_text(), heldout_fraction) else "train"


class TraceError(ValueError):
    """A line that is not a valid trace; the message is the reason a person can act on."""


def _explain(raw: bytes, err: ValidationError) -> str:
    """The reason for a line pydantic refused: bad bytes and bad JSON first, then the fields."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"line is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})"
    if not text.strip():
        return "empty line"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        return f"bad JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(data, dict):
        return f"a trace must be a JSON object, got {type(data).__name__}"
    return _describe(err)


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:3]:
        where = ".".join(str(x) for x in e["loc"]) or "trace"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg}")
    more = f" (+{err.error_count() - 3} more)" if err.error_count() > 3 else ""
    return "; ".join(parts) + more


def parse_trace_line(raw: bytes, domains=DOMAINS) -> Trace:
    """A trace from one JSONL line, or TraceError saying exactly what is wrong with it."""
    if len(raw) > MAX_LINE_BYTES:
        raise TraceError(f"line of {len(raw)} bytes is over the {MAX_LINE_BYTES}-byte limit")
    try:
        trace = Trace.model_validate_json(raw)
    except ValidationError as exc:
        raise TraceError(_explain(raw, exc)) from None
    if trace.domain not in domains:
        raise TraceError(f"unknown domain {trace.domain!r}; configured domains: {', '.join(domains)}")
    return trace
