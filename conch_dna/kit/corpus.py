"""The synthetic chat corpus the tiny model kit is trained on, one template family per domain.

The answers copy and transform words from their prompts, so a model trained on it has real,
context-dependent next-token distributions (not a near-uniform toy). Everything is seeded:
the same seed gives the same dialogues on every machine.
"""

from __future__ import annotations

import random

OBJECTS = [
    "report", "server", "database", "garden", "budget", "email", "test suite", "cache",
    "queue", "invoice", "schedule", "backup", "website", "playlist", "recipe", "contract",
    "dashboard", "printer", "inventory", "meeting",
]
FILES = [
    "notes.txt", "main.py", "config.toml", "data.csv", "README.md", "app.log", "todo.md",
    "index.html", "train.py", "model.json", "users.db", "report.pdf",
]
VERBS = ["read", "write", "delete", "summarize", "check", "sort", "send", "archive", "update", "copy"]
PEOPLE = ["Ada", "Alan", "Grace", "Linus", "Ken", "Barbara", "Dennis", "Margaret", "Tim", "Guido"]
THINGS = [
    "green tea", "chess", "long walks", "jazz", "spicy food", "old maps", "cold mornings",
    "poetry", "sailing", "board games", "dark chocolate", "mountain trails",
]
PHENOMENA = [
    ("ice", "float on water", "it is less dense than liquid water"),
    ("the sky", "look blue", "air scatters blue light more than red light"),
    ("bread", "rise", "yeast releases gas that gets trapped in the dough"),
    ("metal", "feel cold", "it conducts heat away from the hand quickly"),
    ("a compass", "point north", "its needle aligns with the magnetic field"),
    ("a cache", "speed things up", "it keeps recent results close at hand"),
    ("a queue", "keep order", "the first item in is the first item out"),
    ("the moon", "change shape", "we see a different part of its lit side"),
    ("a kettle", "whistle", "steam is pushed through a narrow opening"),
    ("a balloon", "rise", "the gas inside is lighter than the air around it"),
    ("a plant", "lean toward a window", "it grows toward the light"),
    ("a test", "fail at random", "it depends on timing or shared state"),
]
AUDIENCES = ["a child", "a student", "an engineer", "a doctor", "a beginner", "an expert"]
ERRORS = [
    ("KeyError", "a missing key in a dictionary", "check the key exists before reading it"),
    ("TypeError", "a value of the wrong type", "convert the value to the expected type"),
    ("IndexError", "an index past the end of a list", "check the length of the list first"),
    ("ZeroDivisionError", "a division by zero", "guard the divisor against zero"),
    ("FileNotFoundError", "a path that does not exist", "create the file or fix the path"),
    ("TimeoutError", "a call that took too long", "retry with a longer timeout"),
]
OUTCOMES = [
    ("failed", "test it on a small example first"),
    ("worked", "do it the same way again"),
    ("was slow", "split the work into smaller steps"),
    ("was wrong", "read the instructions more carefully"),
]


def _thinking(r: random.Random) -> tuple[str, str]:
    subject, verb, reason = r.choice(PHENOMENA)
    audience = r.choice(AUDIENCES)
    prompt = f"Why does {subject} {verb}? Explain it to {audience}."
    answer = (
        f"Let me think step by step, for {audience}. We want to know why {subject} does {verb}. "
        f"The key fact is that {reason}. Therefore {subject} does {verb} because {reason}."
    )
    return prompt, answer


def _task(r: random.Random) -> tuple[str, str]:
    verb, obj = r.choice(VERBS), r.choice(OBJECTS)
    prompt = f"Plan how to {verb} the {obj}."
    answer = (
        f"Plan to {verb} the {obj}: 1. Find the {obj}. 2. Make a copy of the {obj}. "
        f"3. {verb.capitalize()} the {obj}. 4. Check that the {obj} is correct. Done."
    )
    return prompt, answer


def _action(r: random.Random) -> tuple[str, str]:
    verb, path = r.choice(VERBS), r.choice(FILES)
    prompt = f"Use a tool to {verb} {path}."
    answer = f'{{"tool": "{verb}_file", "args": {{"path": "{path}"}}, "reason": "the user asked to {verb} {path}"}}'
    return prompt, answer


def _reflection(r: random.Random) -> tuple[str, str]:
    verb, obj = r.choice(VERBS), r.choice(OBJECTS)
    outcome, lesson = r.choice(OUTCOMES)
    prompt = f"Reflect: I tried to {verb} the {obj} and it {outcome}."
    answer = (
        f"I tried to {verb} the {obj} and it {outcome}. "
        f"What I learned: next time I will {lesson} before I {verb} the {obj}."
    )
    return prompt, answer


def _debug(r: random.Random) -> tuple[str, str]:
    error, cause, fix = r.choice(ERRORS)
    path, line = r.choice(FILES), r.randint(1, 99)
    prompt = f"Debug: {error} in {path} at line {line}."
    answer = (
        f"The {error} in {path} at line {line} is caused by {cause}. "
        f"Fix: {fix}, then run {path} again."
    )
    return prompt, answer


def _memory(r: random.Random) -> tuple[str, str]:
    person, thing = r.choice(PEOPLE), r.choice(THINGS)
    if r.random() < 0.5:
        prompt = f"Remember that {person} likes {thing}."
        answer = f"Stored in memory: {person} likes {thing}. I will recall it when {person} is mentioned."
    else:
        prompt = f"Note: {person} likes {thing}. What does {person} like?"
        answer = f"From memory: {person} likes {thing}."
    return prompt, answer


GENERATORS = {
    "thinking": _thinking,
    "task": _task,
    "action": _action,
    "reflection": _reflection,
    "debug": _debug,
    "memory": _memory,
}

SYSTEM_PROMPTS = {
    "thinking": "You are the thinking neuron. Reason step by step.",
    "task": "You are the task neuron. Break work into numbered steps.",
    "action": "You are the action neuron. Answer with one JSON tool call.",
    "reflection": "You are the reflection neuron. Learn from what happened.",
    "debug": "You are the debug neuron. Find the cause and the fix.",
    "memory": "You are the memory neuron. Store and recall facts.",
}


def dialogue(domain: str, r: random.Random) -> list[dict]:
    """One chat dialogue (system, user, assistant) of the given domain."""
    prompt, answer = GENERATORS[domain](r)
    return [
        {"role": "system", "content": SYSTEM_PROMPTS[domain]},
        {"role": "user", "content": prompt},
        {"role": "assistant", "content": answer},
    ]


def dialogues(n: int, seed: int, domains: list[str] | None = None) -> list[list[dict]]:
    """n dialogues drawn round-robin over the domains, deterministically from the seed."""
    r = random.Random(seed)
    names = domains or list(GENERATORS)
    return [dialogue(names[i % len(names)], r) for i in range(n)]


def prompts(domain: str, n: int, seed: int) -> list[str]:
    """n distinct user prompts of one domain (fewer if the templates cannot make that many)."""
    r = random.Random(seed)
    seen: dict[str, None] = {}
    for _ in range(n * 50):
        seen.setdefault(GENERATORS[domain](r)[0], None)
        if len(seen) == n:
            break
    return list(seen)
