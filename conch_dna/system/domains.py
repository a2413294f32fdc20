"""Domain names, their validation, and the deterministic train / held-out split of prompts."""

from __future__ import annotations

import hashlib
import re

DOMAINS = ("thinking", "task", "action", "reflection", "debug", "memory")
# The system prompt a bare-string prompt of a domain gets, in training and when served.
SYSTEM_PROMPTS = {
    "thinking": "You are the thinking neuron. Reason step by step.",
    "task": "You are the task neuron. Break work into numbered steps.",
    "action": "You are the action neuron. Answer with one JSON tool call.",
    "reflection": "You are the reflection neuron. Learn from what happened.",
    "debug": "You are the debug neuron. Find the cause and the fix.",
    "memory": "You are the memory neuron. Store and recall facts.",
}
_NAME = re.compile(r"^[a-z0-9_-]{1,32}$")


class UnknownDomainError(ValueError):
    """A domain name that is malformed or not configured."""


def validate_domain_name(name: str) -> str:
    """The name itself if it is a safe domain name ([a-z0-9_-]{1,32}: nothing that makes a path)."""
    if not isinstance(name, str) or not _NAME.match(name):
        raise UnknownDomainError(
            f"invalid domain name {name!r}: use 1-32 characters from a-z, 0-9, '_' and '-'"
        )
    return name


def check_domain(name: str, known: tuple[str, ...] | list[str] = DOMAINS) -> str:
    """The name if it is valid and among `known`; otherwise an error listing the known ones."""
    validate_domain_name(name)
    if name not in known:
        raise UnknownDomainError(f"unknown domain {name!r}; known domains: {', '.join(known)}")
    return name


def is_heldout(prompt: str, fraction: float = 0.1) -> bool:
    """Whether a prompt belongs to the held-out split: a pure function of its text, so the same
    prompt is on the same side forever and can never be in both."""
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big")
    return h / 2**64 < fraction
