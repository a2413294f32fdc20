"""The synthetic chat corpus the tiny model kit is trained on, one template family per domain.

The answers copy and transform words from their prompts, so a model trained on it has real,
context-dependent next-token distributions (not a near-uniform toy). Everything is seeded:
the same seed gives the same dialogues on every machine.
"""

from __future__ import annotations

import json
import random

from conch_dna.system.domains import SYSTEM_PROMPTS


def _rows(table: str) -> list[tuple[str, ...]]:
    """A table written one row a line, cells separated by ' | '."""
    return [tuple(cell.strip() for cell in line.split(" | ")) for line in table.strip().splitlines()]


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
PHENOMENA = _rows("""
    ice | float on water | it is less dense than liquid water
    the sky | look blue | air scatters blue light more than red light
    bread | rise | yeast releases gas that gets trapped in the dough
    metal | feel cold | it conducts heat away from the hand quickly
    a compass | point north | its needle aligns with the magnetic field
    a cache | speed things up | it keeps recent results close at hand
    a queue | keep order | the first item in is the first item out
    the moon | change shape | we see a different part of its lit side
    a kettle | whistle | steam is pushed through a narrow opening
    a balloon | rise | the gas inside is lighter than the air around it
    a plant | lean toward a window | it grows toward the light
    a test | fail at random | it depends on timing or shared state
""")
AUDIENCES = ["a child", "a student", "an engineer", "a doctor", "a beginner", "an expert"]
ERRORS = _rows("""
    KeyError | a missing key in a dictionary | check the key exists before reading it
    TypeError | a value of the wrong type | convert the value to the expected type
    IndexError | an index past the end of a list | check the length of the list first
    ZeroDivisionError | a division by zero | guard the divisor against zero
    FileNotFoundError | a path that does not exist | create the file or fix the path
    TimeoutError | a call that took too long | retry with a longer timeout
""")
OUTCOMES = _rows("""
    failed | test it on a small example first
    worked | do it the same way again
    was slow | split the work into smaller steps
    was wrong | read the instructions more carefully
""")


def _thinking(r: random.Random) -> tuple[str, str]:
    (subject, verb, reason), audience = r.choice(PHENOMENA), r.choice(AUDIENCES)
    return (f"Why does {subject} {verb}? Explain it to {audience}.",
            f"Let me think step by step, for {audience}. We want to know why {subject} does {verb}. "
            f"The key fact is that {reason}. Therefore {subject} does {verb} because {reason}.")


def _task(r: random.Random) -> tuple[str, str]:
    verb, obj = r.choice(VERBS), r.choice(OBJECTS)
    return f"Plan how to {verb} the {obj}.", (
        f"Plan to {verb} the {obj}: 1. Find the {obj}. 2. Make a copy of the {obj}. "
        f"3. {verb.capitalize()} the {obj}. 4. Check that the {obj} is correct. Done.")


def _action(r: random.Random) -> tuple[str, str]:
    verb, path = r.choice(VERBS), r.choice(FILES)
    answer = f'{{"tool": "{verb}_file", "args": {{"path": "{path}"}}, "reason": "the user asked to {verb} {path}"}}'
    return f"Use a tool to {verb} {path}.", answer


def _reflection(r: random.Random) -> tuple[str, str]:
    verb, obj, (outcome, lesson) = r.choice(VERBS), r.choice(OBJECTS), r.choice(OUTCOMES)
    said = f"I tried to {verb} the {obj} and it {outcome}."
    return f"Reflect: {said}", f"{said} What I learned: next time I will {lesson} before I {verb} the {obj}."


def _debug(r: random.Random) -> tuple[str, str]:
    (error, cause, fix), path, line = r.choice(ERRORS), r.choice(FILES), r.randint(1, 99)
    where = f"{error} in {path} at line {line}"
    return f"Debug: {where}.", f"The {where} is caused by {cause}. Fix: {fix}, then run {path} again."


def _memory(r: random.Random) -> tuple[str, str]:
    person, thing = r.choice(PEOPLE), r.choice(THINGS)
    if r.random() < 0.5:
        return (f"Remember that {person} likes {thing}.",
                f"Stored in memory: {person} likes {thing}. I will recall it when {person} is mentioned.")
    return f"Note: {person} likes {thing}. What does {person} like?", f"From memory: {person} likes {thing}."


GENERATORS = {
    "thinking": _thinking,
    "task": _task,
    "action": _action,
    "reflection": _reflection,
    "debug": _debug,
    "memory": _memory,
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


def noise_dialogues(domain: str, n: int, seed: int) -> list[list[dict]]:
    """What a broken teacher writes: n dialogues of the domain, each answer 30 words drawn at random
    from the corpus's answers. The gate must refuse a candidate trained on them."""
    r = random.Random(seed)
    words = [w for d in dialogues(60, seed=1) for w in d[2]["content"].split()]
    noisy = dialogues(n, seed=seed, domains=[domain])
    for d in noisy:
        d[2]["content"] = " ".join(r.choice(words) for _ in range(30))
    return noisy


def _tool(name: str, description: str, **params: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": {k: {"type": "string"} for k in params},
                       "required": list(params)}}}


TOOLS = {
    "read_file": _tool("read_file", "Read a file.", path="the file"),
    "delete_file": _tool("delete_file", "Delete a file.", path="the file"),
    "archive_file": _tool("archive_file", "Archive a file.", path="the file"),
    "send_email": _tool("send_email", "Email someone about a thing.", to="who", subject="what"),
}


def _tool_use(r: random.Random) -> tuple[list[dict], str, list[dict], dict]:
    """(tools offered, the user's ask, the call that answers it, a result of the call) for `action`."""
    name = r.choice(sorted(TOOLS))
    other = r.choice([t for t in sorted(TOOLS) if t != name])
    if name == "send_email":
        person, obj = r.choice(PEOPLE), r.choice(OBJECTS)
        ask, arguments = f"Email {person} about the {obj}.", {"to": person, "subject": obj}
        result = f"The email to {person} was sent."
    else:
        path = r.choice(FILES)
        verb = name.split("_")[0]
        ask, arguments = f"Please {verb} {path} for me.", {"path": path}
        result = f"Done: {verb} {path} worked."
    offered = [TOOLS[t] for t in sorted({name, other})]
    call = {"id": f"call_{r.randrange(10**6):06d}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments)}}
    return offered, ask, call, {"result": result}


def tool_dialogue(r: random.Random) -> dict:
    """One tool-use chat of `action` ({"messages", "tools"}): the answer is a tool call, or, after
    the call's result came back, the text that reports it."""
    tools, ask, call, result = _tool_use(r)
    messages = [{"role": "system", "content": SYSTEM_PROMPTS["action"]}, {"role": "user", "content": ask},
                {"role": "assistant", "content": None, "tool_calls": [call]}]
    if r.random() < 0.3:
        messages += [{"role": "tool", "tool_call_id": call["id"], "content": result["result"]},
                     {"role": "assistant", "content": f"{result['result']} Anything else?"}]
    return {"messages": messages, "tools": tools}


def tool_dialogues(n: int, seed: int) -> list[dict]:
    """n tool-use chats of `action`, deterministically from the seed."""
    r = random.Random(seed)
    return [tool_dialogue(r) for _ in range(n)]


def tool_prompts(n: int, seed: int) -> list[dict]:
    """n distinct tool-use prompts of `action` ({"messages": [system, user], "tools"}), unanswered."""
    seen: dict[str, dict] = {}
    r = random.Random(seed)
    for _ in range(n * 50):
        chat = tool_dialogue(r)
        seen.setdefault(chat["messages"][1]["content"], {"messages": chat["messages"][:2], "tools": chat["tools"]})
        if len(seen) == n:
            break
    return list(seen.values())


def prompts(domain: str, n: int, seed: int) -> list[str]:
    """n distinct user prompts of one domain (fewer if the templates cannot make that many)."""
    r = random.Random(seed)
    seen: dict[str, None] = {}
    for _ in range(n * 50):
        seen.setdefault(GENERATORS[domain](r)[0], None)
        if len(seen) == n:
            break
    return list(seen)
