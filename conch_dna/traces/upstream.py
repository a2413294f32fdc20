"""A teacher behind an OpenAI-compatible server, as the EGO: its answers' logprobs as a trace's top-k.

OpenAI-compatible servers (mlx_lm.server, llama.cpp, LM Studio, Ollama, cloud APIs) return each
answer token's alternatives as token *strings*. A trace keeps token ids of the teacher's
tokenizer, so the strings are mapped back with it: as raw vocabulary entries ("Ġthe", which
mlx_lm.server returns) or as the text of exactly one token (" the", which OpenAI returns). Where
any string maps to no id, or to more than one, the trace is kept without top-k and the retrain's
teacher pass fills it in: a wrong id would teach the student a wrong distribution.
"""

from __future__ import annotations

import math

from conch_dna.traces.trace import MIN_STORED_LOGPROB

ROLES = {"system", "user", "assistant", "tool"}


class TokenMap:
    """Token strings, as OpenAI-compatible servers return them, to the tokenizer's ids."""

    def __init__(self, tokenizer):
        self.raw = dict(tokenizer.get_vocab())
        by_text: dict[str, list[int]] = {}
        for token_id in sorted(set(self.raw.values())):
            by_text.setdefault(tokenizer.decode([token_id]), []).append(token_id)
        self.text = {text: ids[0] for text, ids in by_text.items() if len(ids) == 1}

    def id(self, token) -> int | None:
        """The id of a token string, or None when it names no single token."""
        if not isinstance(token, str):
            return None
        found = self.raw.get(token)
        return found if found is not None else self.text.get(token)


def topk_from_logprobs(content, token_map: TokenMap, fingerprint: str) -> dict | None:
    """A trace's `topk` from an answer's `choices[0].logprobs.content`, or None if it cannot be had.

    Each row holds the position's alternatives, best first, cut to the narrowest row's width; a
    position without alternatives gives its own token. Log-probs are clamped to what a trace
    stores (<= 0, above float16's lowest value).
    """
    if not isinstance(content, list) or not content:
        return None
    rows = []
    for position in content:
        if not isinstance(position, dict):
            return None
        entries = position.get("top_logprobs") or [position]
        row = {}
        for entry in entries:
            token_id = token_map.id(entry.get("token")) if isinstance(entry, dict) else None
            logprob = entry.get("logprob") if isinstance(entry, dict) else None
            if token_id is None or isinstance(logprob, bool) or not isinstance(logprob, (int, float)):
                return None
            if math.isnan(logprob):
                return None
            row[token_id] = max(row.get(token_id, -math.inf), min(0.0, max(float(logprob), MIN_STORED_LOGPROB)))
        rows.append(sorted(row.items(), key=lambda kv: -kv[1]))
    width = min(len(r) for r in rows)
    return {"token_ids": [[t for t, _ in r[:width]] for r in rows],
            "logprobs": [[lp for _, lp in r[:width]] for r in rows], "tokenizer": fingerprint}


def trace_messages(messages: list[dict], answer: str | dict) -> list[dict]:
    """An OpenAI request's messages and the answer (its text, or an assistant message with
    tool_calls), as a trace keeps them: text content (a list of text parts is joined),
    "developer" as "system", tool calls and the call a tool result answers kept, messages with
    neither text nor calls left out (the answer never: an empty one is quarantined as such)."""
    kept = [k for k in map(_plain, messages) if k["role"] in ROLES and (k["content"] or k.get("tool_calls"))]
    return [*kept, _plain(answer if isinstance(answer, dict) else {"role": "assistant", "content": answer})]


def _plain(m: dict) -> dict:
    role = "system" if m.get("role") == "developer" else m.get("role")
    content = m.get("content")
    if isinstance(content, list):
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    out = {"role": role, "content": content if isinstance(content, str) else None}
    calls = m.get("tool_calls") if role == "assistant" else None
    if calls:
        out["tool_calls"] = [{"id": c.get("id"), "type": "function", "function": {
            "name": (c.get("function") or {}).get("name"), "arguments": (c.get("function") or {}).get("arguments")}}
            if isinstance(c, dict) else c for c in calls]
    elif role == "assistant" and out["content"] is None:
        out["content"] = ""
    if role == "tool" and "tool_call_id" in m:
        out["tool_call_id"] = m["tool_call_id"]
    return out
