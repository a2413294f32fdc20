"""Answers held to a form: an OpenAI `response_format` (or a pydantic model class) checked, bounded and compiled
by llguidance into a grammar over the model's own tokens, and the token masks that keep a row of the batch on it.

One `Grammars` per tokenizer: it builds llguidance's view of the vocabulary once and keeps the compiled
grammars of the last MAX_CACHED forms, so a schema used again costs a copy, not a compile. Each call gets its
own matcher (its parse state); `allowed_tokens` turns the matchers of a batch's constrained rows into one
boolean mask, computed on the CPU while the forward pass runs.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import numpy as np
from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

MAX_SCHEMA_BYTES = 64 * 1024  # a schema's JSON; the request body bound is larger, a grammar is not free
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays of the schema document itself
MAX_CACHED = 64  # compiled forms kept per tokenizer
FORMAT_TYPES = ("text", "json_object", "json_schema")
# at most one space where JSON allows whitespace: the model's own `"a": 1` passes, while a free-whitespace
# grammar would let a small model write spaces until max_tokens
_JSON_OPTIONS = {"whitespace_pattern": " ?"}
# bounds on what one grammar may cost to build and to step (llguidance's own limits, tightened)
_LIMITS = llguidance.LLParserLimits(max_grammar_size=100_000, max_lexer_states=50_000,
                                    initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000)


class StructureError(ValueError):
    """A response_format that cannot be honoured, with the reason."""


def response_format_of(value) -> dict | None:
    """An OpenAI response_format dict from what a caller passes: None, such a dict, or a pydantic model class
    (its JSON schema, strict, named after the class). Checked: StructureError names what is wrong."""
    if value is None:
        return None
    if isinstance(value, type) and hasattr(value, "model_json_schema"):
        value = {"type": "json_schema",
                 "json_schema": {"name": value.__name__, "schema": value.model_json_schema(), "strict": True}}
    if not isinstance(value, dict):
        raise StructureError(f"response_format must be an object or a pydantic model class, got {type(value).__name__}")
    kind = value.get("type")
    if kind not in FORMAT_TYPES:
        raise StructureError(f"response_format.type must be one of {', '.join(FORMAT_TYPES)}, got {kind!r}")
    if kind != "json_schema":
        return {"type": kind}
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
        raise StructureError("response_format.json_schema must be an object with a `schema` object")
    schema = spec.get("schema", {})
    text = json.dumps(schema, sort_keys=True)
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise StructureError(f"response_format's schema is {len(text.encode())} bytes, over the limit of "
                             f"{MAX_SCHEMA_BYTES}")
    if (depth := _depth(schema)) > MAX_SCHEMA_DEPTH:
        raise StructureError(f"response_format's schema nests {depth} deep, over the limit of {MAX_SCHEMA_DEPTH}")
    return {"type": kind, "json_schema": {"name": str(spec.get("name", "answer")), "schema": schema,
                                          "strict": bool(spec.get("strict", False))}}


def _parameters(tool: dict) -> dict:
    """A function tool's arguments schema, bounded as a response_format's is (closed when the tool is strict)."""
    function = tool.get("function", tool)
    schema = function.get("parameters") or {"type": "object"}
    checked = response_format_of({"type": "json_schema", "json_schema": {"schema": schema,
                                                                         "strict": function.get("strict", False)}})
    spec = checked["json_schema"]
    return _closed(spec["schema"]) if spec["strict"] else spec["schema"]


def _with_spacing(schema: dict) -> str:
    return json.dumps({**schema, "x-guidance": _JSON_OPTIONS})


def _closed(schema: dict) -> dict:
    """The schema as OpenAI's strict mode reads it: an object takes no property it does not name."""
    schema = json.loads(json.dumps(schema))
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node:
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


def _depth(node, level: int = 1) -> int:
    deepest, stack = level, [(node, level)]
    while stack:  # iterative: a hostile schema must not exhaust Python's stack
        item, at = stack.pop()
        deepest = max(deepest, at)
        if deepest > MAX_SCHEMA_DEPTH:
            return deepest
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, at + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


class Grammars:
    """The grammars of one tokenizer: compiled once per form, a fresh matcher per call."""

    def __init__(self, tokenizer, vocab_size: int):
        self.vocab_size = vocab_size
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer._tokenizer, n_vocab=vocab_size,
                                                       eos_token=sorted(tokenizer.eos_token_ids))
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, response_format) -> llguidance.LLMatcher | None:
        """A matcher in its start state for `response_format` (None: free text). StructureError for a form
        that cannot be compiled, with the engine's reason."""
        form = response_format_of(response_format)
        if form is None or form["type"] == "text":
            return None
        key = json.dumps(form, sort_keys=True)
        with self._lock:
            if (template := self._compiled.get(key)) is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
        if form["type"] == "json_object":
            schema = {"type": "object"}
        else:
            spec = form["json_schema"]
            schema = _closed(spec["schema"]) if spec["strict"] else spec["schema"]
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_JSON_OPTIONS)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise StructureError(f"response_format's schema cannot be compiled: {exc}") from None
        return self._matcher(key, grammar, "response_format's schema")

    def tool_call(self, use) -> llguidance.LLMatcher | None:
        """A matcher for the tool calls of an answer, where calls are written as JSON (mlx-lm's json_tools
        form and the fallback; None for other forms): the name one of the offered tools, the arguments that
        tool's `parameters` schema, then the call's closing markup. Forced (tool_choice "required" or a named
        function, whose ToolUse.prefix the prompt already ends with): the call, then the end. "auto": free
        text until the call's opening markup appears, then the call held to its end, then free again (a lazy
        rule, llguidance's structural-tag form)."""
        from conch_dna.models.tools import fallback_format

        if not use or use.format is None or use.format.parse is not fallback_format().parse:
            return None
        params = {tool["function"]["name"]: _parameters(tool) for tool in use.tools}
        end = f'"\\n"? {json.dumps(use.format.end)}' if use.format.end else '"\\n"?'
        call = {"oneOf": [{"type": "object", "properties": {"name": {"const": name}, "arguments": schema},
                           "required": ["name", "arguments"], "additionalProperties": False}
                          for name, schema in params.items()]}
        if not use.prefix:  # "auto": a call may open anywhere in free text; TEXT matches no special token
            lark = (f'%llguidance {{}}\nstart: call* TEXT\nTEXT: /(.|\\n)*/\n{self._opening(use.format.start)}\n'
                    f'call: opening "\\n"? %json {_with_spacing(call)} {end}')
        elif use.prefix == use.format.start:  # "required": any one of the tools
            lark = f'start: "\\n"? call {end}\ncall: %json {_with_spacing(call)}'
        else:  # a named function: the prefix ends inside its object, at `"arguments":`
            name = json.loads(use.prefix[len(use.format.start):] + " null}")["name"]
            lark = f'start: " "? arguments "}}" {end}\narguments: %json {_with_spacing(params[name])}'
        return self._matcher(lark, llguidance.LLMatcher.grammar_from_lark(lark), "the tool's parameters schema")

    def _opening(self, start: str) -> str:
        """The rule `opening`: free text, then the call's opening markup. Text ends lazily at the markup's
        first appearance; where the markup is a special token of the tokenizer (Qwen's `<tool_call>`), which
        no text matches, the token itself follows the text."""
        ids = self._tokenizer.tokenize_str(start)
        if len(ids) == 1 and self._tokenizer.is_special_token(ids[0]) and start.startswith("<"):
            return f"opening: TEXT {start}"
        return f"opening[lazy]: TEXT {json.dumps(start)}"

    def _matcher(self, key: str, grammar: str, what: str) -> llguidance.LLMatcher:
        with self._lock:
            if (template := self._compiled.get(key)) is not None:
                self._compiled.move_to_end(key)
                return template.deep_copy()
        template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0, limits=_LIMITS)
        if template.is_error():
            raise StructureError(f"{what} cannot be compiled: {template.get_error()}")
        with self._lock:
            self._compiled[key] = template
            while len(self._compiled) > MAX_CACHED:
                self._compiled.popitem(last=False)
        return template.deep_copy()


def held_to(matcher: llguidance.LLMatcher, vocab_size: int):
    """An mlx-lm logits processor (generate's `logits_processors`) that holds one generation to `matcher`:
    each call takes the tokens sampled since the last, then masks what the grammar does not allow next."""
    import mlx.core as mx

    seen: list[int] = []

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if not seen:
            seen.append(tokens.size)  # the first call sees the prompt alone
        else:
            for token in tokens[seen[0]:].tolist():
                if not matcher.consume_token(token):
                    raise StructureError(f"the answer left its response_format: {matcher.get_error()}")
            seen[0] = tokens.size
        return mx.where(mx.array(allowed_tokens([matcher], vocab_size)), logits, -mx.inf)

    return process


def allowed_tokens(matchers: list[llguidance.LLMatcher], vocab_size: int) -> np.ndarray:
    """bool [len(matchers), vocab_size]: the tokens each matcher allows next."""
    bits = allocate_token_bitmask(len(matchers), vocab_size)
    for i, matcher in enumerate(matchers):
        fill_next_token_bitmask(matcher, bits, i)
    return np.unpackbits(bits.view(np.uint8), axis=-1, bitorder="little")[:, :vocab_size].astype(bool)
