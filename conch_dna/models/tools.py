"""Tool use in chats: OpenAI tool schemas and tool calls checked, written for a chat template that
has no tools of its own, and read back out of a model's text.

A trace, a request and a neuron call carry tools as OpenAI sends them:

    tools = [{"type": "function", "function": {"name": "read_file", "description": "...",
              "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]
    answer = {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "read_file", "arguments": "{\\"path\\": \\"notes.txt\\"}"}}]}
    result = {"role": "tool", "tool_call_id": "call_1", "content": "..."}

How a model writes a call is its chat template's business (conch_dna.models.chat renders every chat
through it); how conch reads one back is mlx-lm's: the tool parser mlx-lm infers for the
tokenizer (`TokenizerWrapper.tool_parser`, `tool_call_start`/`tool_call_end`). A template without
tool support (SmolLM2's) gets the one FALLBACK form: the schemas in the system message, each call
as `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, which mlx-lm's `json_tools` parser reads.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass

MAX_TOOLS = 128  # tools one chat may offer (OpenAI's limit)
MAX_SCHEMA_DEPTH = 32  # nesting of a tool's parameters schema
MAX_TOOL_CALLS = 64  # calls in one assistant message
TOOL_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")  # OpenAI's function names, and '.'
FALLBACK_START, FALLBACK_END = "<tool_call>", "</tool_call>"
FALLBACK_INSTRUCTIONS = ("You may call these tools. To call one, answer with "
                         f'{FALLBACK_START}{{"name": <tool name>, "arguments": <arguments object>}}{FALLBACK_END}')


class ToolError(ValueError):
    """A tool schema, tool call or tool message that is not what OpenAI's format allows."""


def _depth(value) -> int:
    """How deeply lists and objects nest in a JSON value (iteratively: a hostile schema is deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level)
            if level > MAX_SCHEMA_DEPTH:
                return level
            stack.extend((v, level + 1) for v in (item.values() if isinstance(item, dict) else item))
    return deepest


def check_tools(tools) -> list[dict]:
    """OpenAI function tools, checked: each {"type": "function", "function": {"name", "parameters"
    (a JSON schema object), optional "description" and "strict"}}; at most MAX_TOOLS, names unique."""
    if not isinstance(tools, list) or not tools:
        raise ToolError("tools must be a non-empty list of function tools")
    if len(tools) > MAX_TOOLS:
        raise ToolError(f"{len(tools)} tools, over the limit of {MAX_TOOLS}")
    names = set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise ToolError(f"tools[{i}] is not {{\"type\": \"function\", \"function\": {{...}}}}")
        if set(tool) - {"type", "function"}:
            raise ToolError(f"tools[{i}] has unknown keys {sorted(set(tool) - {'type', 'function'})}")
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            raise ToolError(f"tools[{i}].function.name {name!r} is not 1-64 characters of A-Z, a-z, 0-9, _ . -")
        if name in names:
            raise ToolError(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        unknown = set(function) - {"name", "description", "parameters", "strict"}
        if unknown:
            raise ToolError(f"tools[{i}].function has unknown keys {sorted(unknown)}")
        if not isinstance(function.get("description", ""), str):
            raise ToolError(f"tools[{i}].function.description must be a string")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolError(f"tools[{i}].function.parameters must be a JSON schema object")
        if _depth(parameters) > MAX_SCHEMA_DEPTH:
            raise ToolError(f"tools[{i}].function.parameters nests deeper than {MAX_SCHEMA_DEPTH} levels")
    return tools


def tool_names(tools: list[dict] | None) -> set[str]:
    return {t["function"]["name"] for t in tools or ()}


def call_arguments(call: dict) -> dict:
    """A tool call's arguments as a JSON object (OpenAI sends them as a JSON string)."""
    arguments = call["function"].get("arguments", "{}")
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else None
    except ValueError as exc:
        raise ToolError(f"tool call {call.get('id')!r}: arguments are not JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise ToolError(f"tool call {call.get('id')!r}: arguments must be a JSON object")
    return parsed


def check_tool_calls(calls, names: set[str]) -> None:
    """An assistant message's tool calls: each {"id", "type": "function", "function": {"name",
    "arguments" (a JSON object, as a string)}}, naming a tool the chat offers."""
    if not isinstance(calls, list) or not calls:
        raise ToolError("tool_calls must be a non-empty list")
    if len(calls) > MAX_TOOL_CALLS:
        raise ToolError(f"{len(calls)} tool calls in one message, over the limit of {MAX_TOOL_CALLS}")
    for call in calls:
        name = call["function"]["name"]
        if name not in names:
            offered = ", ".join(sorted(names)) or "none"
            raise ToolError(f"a call to tool {name!r}, which is not in tools (offered: {offered})")
        call_arguments(call)


def openai_call(name: str, arguments: dict, call_id: str | None = None) -> dict:
    """A tool call in OpenAI's shape: arguments as a JSON string."""
    return {"id": call_id or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def template_messages(messages: list[dict]) -> list[dict]:
    """Messages as chat templates want them: a tool call's arguments as an object, not a string
    (Qwen's and Llama's templates apply `tojson` to them), content None as "" (templates read it)."""
    out = []
    for m in messages:
        m = {k: ("" if v is None else v) for k, v in m.items() if v is not None or k == "content"}
        if m.get("tool_calls"):
            m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": call_arguments(c)}}
                               for c in m["tool_calls"]]
        out.append(m)
    return out


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The FALLBACK form of a chat with tools, for a template that has none: the schemas and how to
    call them in the system message (a new first one if the chat has none), each call written
    `<tool_call>{"name", "arguments"}</tool_call>` after the message's text, tool results as the
    text of their `tool` turn."""
    out = []
    for m in messages:
        text = m.get("content") or ""
        for c in m.get("tool_calls") or ():
            text += FALLBACK_START + json.dumps({"name": c["function"]["name"], "arguments": call_arguments(c)},
                                                ensure_ascii=False) + FALLBACK_END
        out.append({"role": m["role"], "content": text})
    if tools:
        schemas = "\n".join(json.dumps(t["function"], ensure_ascii=False) for t in tools)
        block = f"{FALLBACK_INSTRUCTIONS}\n<tools>\n{schemas}\n</tools>"
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


@dataclass(frozen=True)
class ToolCallFormat:
    """How a tokenizer's model writes tool calls: between `start` and `end`, read by `parse`
    (mlx-lm's parse_tool_call: text, tools -> {"name", "arguments"} or a list of them)."""

    start: str
    end: str
    parse: Callable


def fallback_format() -> ToolCallFormat:
    from mlx_lm.tool_parsers import json_tools

    return ToolCallFormat(json_tools.tool_call_start, json_tools.tool_call_end, json_tools.parse_tool_call)


def template_has_tools(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders `tools` (else the FALLBACK form is used)."""
    template = getattr(tokenizer, "chat_template", None)
    return isinstance(template, str) and "tools" in template


def tool_call_format(tokenizer) -> ToolCallFormat | None:
    """The format calls come back in: mlx-lm's parser of the tokenizer where it has one, the
    FALLBACK's where the template has no tools; None where the template takes tools but mlx-lm
    knows no parser for it (calls are then left in the text)."""
    parse = getattr(tokenizer, "tool_parser", None)
    if parse is not None and getattr(tokenizer, "tool_call_start", None):
        return ToolCallFormat(tokenizer.tool_call_start, tokenizer.tool_call_end or "", parse)
    if not template_has_tools(tokenizer):
        return fallback_format()
    return None


@dataclass(frozen=True)
class ToolUse:
    """What one generation needs to know of tools: those offered, the format calls come back in,
    and the text its answer is forced to begin with (tool_choice "required" or a named function)."""

    tools: list[dict]
    format: ToolCallFormat | None
    prefix: str = ""


def tool_use(tokenizer, tools: list[dict] | None, tool_choice=None) -> ToolUse | None:
    """A generation's ToolUse for OpenAI's `tools` and `tool_choice` ("auto", the default; "none":
    the tools are not shown; "required": some call; {"type": "function", "function": {"name"}}:
    that one); None when no tools are shown. ToolError for a choice that cannot be honoured."""
    if tool_choice in (None, "auto") and not tools:
        return None
    if tool_choice == "none":
        return None
    if not tools:
        raise ToolError(f"tool_choice {tool_choice!r} needs tools")
    check_tools(tools)
    fmt = tool_call_format(tokenizer)
    if tool_choice in (None, "auto"):
        return ToolUse(tools, fmt)
    if fmt is None:
        raise ToolError("this model's chat template takes tools, but mlx-lm has no parser for its calls: "
                        "only tool_choice \"auto\" or \"none\" can be honoured")
    if tool_choice == "required":
        return ToolUse(tools, fmt, fmt.start)
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        raise ToolError(f'tool_choice must be "auto", "none", "required" or {{"type": "function", "function": '
                        f'{{"name": ...}}}}, got {tool_choice!r}')
    if name not in tool_names(tools):
        raise ToolError(f"tool_choice names {name!r}, which is not in tools")
    if fmt.parse is not fallback_format().parse:
        raise ToolError("tool_choice naming a function needs calls written as JSON (<tool_call>{...}); "
                        "this model writes them otherwise: use \"required\"")
    # ends at the colon, where a byte-level BPE's pre-tokens break: a trailing space would be a token
    # the model never saw there (it writes ' {' as one)
    return ToolUse(tools, fmt, fmt.start + json.dumps({"name": name}, ensure_ascii=False)[:-1] + ', "arguments":')


@dataclass(frozen=True)
class ParsedAnswer:
    """A model's answer read for tool calls: the text outside them, the calls in OpenAI's shape,
    and how many call spans could not be read (a truncated or malformed call)."""

    content: str
    tool_calls: list[dict]
    unparsed: int = 0

    @property
    def parsed(self) -> bool:
        """The answer held calls, and every one of them could be read."""
        return bool(self.tool_calls) and self.unparsed == 0


def parse_answer(text: str, fmt: ToolCallFormat | None, tools: list[dict] | None = None) -> ParsedAnswer:
    """Split a model's text into its content and its tool calls, in `fmt` (see tool_call_format)."""
    if fmt is None or fmt.start not in text:
        return ParsedAnswer(text, [])
    content, calls, unparsed, rest = [], [], 0, text
    while (at := rest.find(fmt.start)) >= 0:
        content.append(rest[:at])
        rest = rest[at + len(fmt.start):]
        end = rest.find(fmt.end) if fmt.end else -1
        span, rest = (rest[:end], rest[end + len(fmt.end):]) if end >= 0 else (rest, "")
        try:
            found = fmt.parse(span, tools)
            found = found if isinstance(found, list) else [found]
            calls += [openai_call(str(f["name"]), _as_object(f.get("arguments", {})), f.get("id")) for f in found]
        except Exception:  # noqa: BLE001 - any unreadable call is counted, never raised
            unparsed += 1
    content.append(rest)
    return ParsedAnswer("".join(content).strip(), calls, unparsed)


class Answer(str):
    """A model's answer: the text as it wrote it (a str), and, read out of it, `content` (the text
    outside tool calls) and `tool_calls` (OpenAI's shape, [] when it made none)."""

    content: str
    tool_calls: list[dict]
    # who wrote it ("domain@vNNNN" or "ego"); for defer="auto": whether it was deferred, the student's mean
    # token log-probability, and why it was served unverified (the teacher could not answer)
    answered_by: str | None = None
    deferred: bool = False
    signal: float | None = None
    unverified: str | None = None

    @classmethod
    def read(cls, text: str, parsed: ParsedAnswer) -> Answer:
        answer = cls(text)
        answer.content, answer.tool_calls = parsed.content, parsed.tool_calls
        return answer

    def message(self) -> dict:
        """The answer as an OpenAI assistant message (content None when it only calls tools)."""
        if not self.tool_calls:
            return {"role": "assistant", "content": str(self)}
        return {"role": "assistant", "content": self.content or None, "tool_calls": self.tool_calls}


def _as_object(arguments) -> dict:
    if isinstance(arguments, str):
        arguments = json.loads(arguments)
    if not isinstance(arguments, dict):
        raise ToolError("tool call arguments are not an object")
    return arguments


def same_calls(ours: list[dict], theirs: list[dict]) -> tuple[bool, bool]:
    """(same function names in order, and same arguments as JSON objects too)."""
    names = [c["function"]["name"] for c in ours] == [c["function"]["name"] for c in theirs]
    if not names:
        return False, False
    try:
        return True, all(call_arguments(a) == call_arguments(b) for a, b in zip(ours, theirs))
    except ToolError:
        return True, False
