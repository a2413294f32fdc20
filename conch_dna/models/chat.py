"""Chats: a prompt as chat messages (and the tools it offers), the text its held-out split is
decided on, and its token ids.

Training, evaluation, the EGO and the neurons all turn chats into tokens here, so a neuron sees a
prompt exactly as its adapter was trained on it. One rule for tools: a chat with tools, tool calls
or tool results goes through the model's own chat template with `tools=` (Qwen2.5, Llama 3.x,
SmolLM3 and the kit take them); a template without tool support gets conch_dna.models.tools' FALLBACK form.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from conch_dna.models.tools import fallback_messages, template_has_tools, template_messages
from conch_dna.system.domains import SYSTEM_PROMPTS, is_heldout


class Chat(NamedTuple):
    """A chat's messages and the tools it offers (None: a chat without tools)."""

    messages: list[dict]
    tools: list[dict] | None = None


def as_chat(chat) -> Chat:
    """A Chat, or a list of messages as a Chat without tools."""
    return chat if isinstance(chat, Chat) else Chat(list(chat))


def to_chat(domain: str, prompt) -> Chat:
    """A prompt as a Chat: to_messages, and the tools of a trace or request ({"messages", "tools"})."""
    if isinstance(prompt, Chat):
        return prompt
    tools = prompt.get("tools") if isinstance(prompt, dict) else None
    return Chat(to_messages(domain, prompt), tools or None)


def to_messages(domain: str, prompt) -> list[dict]:
    """A prompt as chat messages: a string gets the domain's system prompt; chats pass through.

    `prompt` is a string, a list of {"role", "content"} messages, or a trace ({"messages": [...]}).
    Raises ValueError for anything else.
    """
    if isinstance(prompt, str):
        system = SYSTEM_PROMPTS.get(domain)
        head = [{"role": "system", "content": system}] if system else []
        return [*head, {"role": "user", "content": prompt}]
    if isinstance(prompt, dict) and "messages" in prompt:
        return list(prompt["messages"])
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        return list(prompt)
    raise ValueError(f"a prompt must be a string, a list of chat messages or a trace, "
                     f"got {type(prompt).__name__}")


def prompt_text(messages: list[dict]) -> str:
    """The text a held-out split is decided on: every message before the answer (a text-only
    chat's is what it always was, so no stored trace changes sides)."""
    body = messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" + _calls_text(m) for m in body)


def _calls_text(message: dict) -> str:
    calls = message.get("tool_calls")
    return " " + json.dumps(calls, ensure_ascii=False, sort_keys=True) if calls else ""


def split_prompts(prompts: list, fraction: float) -> tuple[list, list]:
    """(train, held-out) by the hash of each prompt's text: the split the trace store uses too."""
    train, held = [], []
    for p in prompts:
        text = p if isinstance(p, str) else prompt_text(to_messages("", p))
        (held if is_heldout(text, fraction) else train).append(p)
    return train, held


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None, **template_args):
    """tokenizer.apply_chat_template of a chat, by the one rule (see the module's doc)."""
    if not uses_tools(messages, tools):
        return tokenizer.apply_chat_template(messages, return_dict=False, **template_args)
    if template_has_tools(tokenizer):
        return tokenizer.apply_chat_template(template_messages(messages), tools=tools, return_dict=False,
                                             **template_args)
    return tokenizer.apply_chat_template(fallback_messages(messages, tools), return_dict=False, **template_args)


def encode_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> tuple[list[int], int]:
    """Token ids of a chat whose last message is the answer, and the index where the answer starts."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message of a chat to train on must be the assistant's answer")
    tokens = render(tokenizer, messages, tools)
    prompt = prompt_tokens(tokenizer, messages[:-1], tools)
    if tokens[: len(prompt)] != prompt or len(tokens) <= len(prompt):
        raise ValueError("the chat template does not put the answer after the prompt's tokens")
    return list(tokens), len(prompt)


def prompt_tokens(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a chat up to and including the generation prompt for the next answer."""
    return list(render(tokenizer, messages, tools, add_generation_prompt=True))
