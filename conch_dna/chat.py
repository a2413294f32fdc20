"""Chats: a prompt as chat messages, the text its held-out split is decided on, and its token ids.

Training, evaluation, the EGO and the neurons all turn chats into tokens here, so a neuron sees a
prompt exactly as its adapter was trained on it.
"""

from __future__ import annotations

from conch_dna.domains import SYSTEM_PROMPTS, is_heldout


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
    """The text a held-out split is decided on: every message before the answer."""
    body = messages[:-1] if messages and messages[-1].get("role") == "assistant" else messages
    return "\n".join(f"{m['role']}: {m['content']}" for m in body)


def split_prompts(prompts: list, fraction: float) -> tuple[list, list]:
    """(train, held-out) by the hash of each prompt's text: the split the trace store uses too."""
    train, held = [], []
    for p in prompts:
        text = p if isinstance(p, str) else prompt_text(to_messages("", p))
        (held if is_heldout(text, fraction) else train).append(p)
    return train, held


def encode_chat(tokenizer, messages: list[dict]) -> tuple[list[int], int]:
    """Token ids of a chat whose last message is the answer, and the index where the answer starts."""
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message of a chat to train on must be the assistant's answer")
    tokens = tokenizer.apply_chat_template(messages, return_dict=False)
    prompt = prompt_tokens(tokenizer, messages[:-1])
    if tokens[: len(prompt)] != prompt or len(tokens) <= len(prompt):
        raise ValueError("the chat template does not put the answer after the prompt's tokens")
    return list(tokens), len(prompt)


def prompt_tokens(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat up to and including the generation prompt for the next answer."""
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                              return_dict=False))
