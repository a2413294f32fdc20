"""Answers held to a form: how often a student's forced tool calls and schema answers parse and validate, held
and free, and what holding costs the batch (tokens/s, time to first token with a fresh schema and a cached one).

Validity: the kit corpus's `action` tool-use asks (two tools offered each), every call forced with
tool_choice "required", each answer read by the call parser and its arguments checked against the tool's
`parameters` schema by jsonschema (an independent validator); then the same prompts asked for a JSON object
of a small schema (response_format), checked the same way. Held: the grammar on; free: the same calls with
it lifted. On the bare student (no adapter): a held answer validates because it was held.

Cost: the same 8 prompts at once, 4 held and 4 free against 8 free, every answer run to --tokens
(end-of-turn suppressed in both runs, and the held rows under a grammar that allows any text, so both do
the same steps while the held rows' masks are computed every step), completion tokens/s of the whole batch;
then time to first token of one held call whose schema is new against the same schema again.

    python bench/structured.py                       # the kit's student
    python bench/structured.py --pair-dir /tmp/pair  # the real pair's student
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from conch_dna.kit import corpus
from conch_dna.models.tools import call_arguments

import jsonschema
import mlx.core as mx
from pair_args import add_model_args, parse_model_args

from neurons import NeuronRegistry

SCHEMA = {"type": "object", "properties": {"tool": {"type": "string", "maxLength": 16},
                                           "path": {"type": "string", "maxLength": 24},
                                           "urgent": {"type": "boolean"}},
          "required": ["tool", "path", "urgent"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "ask", "schema": SCHEMA, "strict": True}}


def valid_call(call, tools: list[dict]) -> bool:
    """The answer is one or more calls, each parsed, of an offered tool, its arguments valid by its schema."""
    parsed = call.parsed()
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools}
    if not parsed.parsed:
        return False
    try:
        for c in parsed.tool_calls:
            jsonschema.validate(call_arguments(c), schemas[c["function"]["name"]])
    except (KeyError, ValueError, jsonschema.ValidationError):
        return False
    return True


def valid_json(text: str) -> bool:
    try:
        jsonschema.validate(json.loads(text), SCHEMA)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def validity(registry: NeuronRegistry, prompts: list[dict], max_tokens: int) -> dict[str, float]:
    neuron, grammars = registry.get("action"), registry.grammars()
    shares = {}
    held_call, held_format = grammars.tool_call, grammars.matcher
    for held in (False, True):
        if not held:  # the same calls, the mask lifted
            grammars.tool_call, grammars.matcher = (lambda use: None), (lambda form: None)
        calls = [neuron.submit(p["messages"], max_tokens, tools=p["tools"], tool_choice="required") for p in prompts]
        forms = [neuron.submit(p["messages"][1:], max_tokens, response_format=FORMAT) for p in prompts]
        autos = [neuron.submit(p["messages"], max_tokens, tools=p["tools"]) for p in prompts]
        for c in calls + forms + autos:
            list(c)
        grammars.tool_call, grammars.matcher = held_call, held_format
        name = "held" if held else "free"
        shares[f"forced calls that validate, {name}"] = statistics.fmean(valid_call(c, p["tools"])
                                                                         for c, p in zip(calls, prompts))
        shares[f"schema answers that validate, {name}"] = statistics.fmean(valid_json(c.text) for c in forms)
        ended = [(c, p) for c, p in zip(calls, prompts) if c.finish_reason.value != "length"]
        shares[f"forced calls that validate, of those that ended, {name}"] = (
            statistics.fmean(valid_call(c, p["tools"]) for c, p in ended) if ended else float("nan"))
        opened = [(c, p) for c, p in zip(autos, prompts) if c.tools.format.start in c.text]
        shares[f"tool_choice auto: answers that open a call, {name}"] = len(opened) / len(autos)
        shares[f"tool_choice auto: of the calls opened, those that validate, {name}"] = (
            statistics.fmean(valid_call(c, p["tools"]) for c, p in opened) if opened else float("nan"))
        opened_ended = [(c, p) for c, p in opened if c.finish_reason.value != "length"]
        shares[f"tool_choice auto: of the calls opened in answers that ended, those that validate, {name}"] = (
            statistics.fmean(valid_call(c, p["tools"]) for c, p in opened_ended) if opened_ended else float("nan"))
        shares[f"answers cut by max_tokens, {name}"] = statistics.fmean(
            c.finish_reason.value == "length" for c in calls + forms)
    return shares


# what a held row costs per step, with the row never done: a grammar that allows any text, whose mask is
# computed every step like a JSON string's (a schema's answer may end after `{}`: not the same work)
ANY_TEXT = 'start: /(.|\\n)*/'


def throughput(registry: NeuronRegistry, prompts: list[dict], tokens: int, held: int) -> float:
    """Completion tokens/s of 8 calls at once, `held` of them under a grammar; every answer runs to `tokens`."""
    import llguidance

    neuron, grammars = registry.get("task"), registry.grammars()
    eos = list(registry.tokenizer.eos_token_ids)

    def no_eos(_context, logits):  # both runs take the same steps: no row ends early
        return logits.at[:, eos].add(-1e9)

    matcher = grammars.matcher
    grammars.matcher = lambda form: grammars._matcher(ANY_TEXT, llguidance.LLMatcher.grammar_from_lark(ANY_TEXT),
                                                      "any text")
    try:
        tic = time.perf_counter()
        calls = [neuron.submit(p["messages"][1:], tokens, logits_processors=[no_eos],
                               response_format={"type": "json_object"} if i < held else None)
                 for i, p in enumerate(prompts[:8])]
        for c in calls:
            list(c)
        seconds = time.perf_counter() - tic
    finally:
        grammars.matcher = matcher
    assert all(c.completion_tokens == tokens for c in calls), [c.completion_tokens for c in calls]
    return sum(c.completion_tokens for c in calls) / seconds


def auto_throughput(registry: NeuronRegistry, prompts: list[dict], tokens: int, held: int) -> float:
    """Completion tokens/s of 8 tool-use calls at once (tool_choice "auto"), `held` of them under the lazy call
    grammar and the rest with it lifted; every answer runs to `tokens`."""
    neuron, grammars = registry.get("action"), registry.grammars()
    eos = list(registry.tokenizer.eos_token_ids)
    lazy, lifted = grammars.tool_call, (lambda use: None)

    def no_eos(_context, logits):
        return logits.at[:, eos].add(-1e9)

    tic = time.perf_counter()
    calls = []
    try:
        for i, p in enumerate(prompts[:8]):
            grammars.tool_call = lazy if i < held else lifted
            calls.append(neuron.submit(p["messages"], tokens, tools=p["tools"], logits_processors=[no_eos]))
    finally:
        grammars.tool_call = lazy
    for c in calls:
        list(c)
    seconds = time.perf_counter() - tic
    assert all(c.completion_tokens == tokens for c in calls), [c.completion_tokens for c in calls]
    return sum(c.completion_tokens for c in calls) / seconds


def first_token(registry: NeuronRegistry, prompt: dict, schema: dict) -> float:
    tic = time.perf_counter()
    call = registry.get("task").submit(prompt["messages"][1:], 4,
                                       response_format={"type": "json_schema", "json_schema": {"schema": schema}})
    next(iter(call), None)
    seconds = time.perf_counter() - tic
    list(call)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(p, domains=None, prompts=24)  # --prompts: action tool-use asks for the validity figures
    p.add_argument("--max-tokens", type=int, default=96, help="of each validity answer")
    p.add_argument("--tokens", type=int, default=64, help="of each answer of the throughput runs")
    p.add_argument("--repeats", type=int, default=3, help="throughput runs of each kind, alternated")
    args = parse_model_args(p)
    prompts = corpus.tool_prompts(max(args.prompts, 8), seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        home.mkdir(mode=0o700)
        (home / "config.toml").write_text(f'student = "{args.student}"\n[neurons]\nmax_batch_size = 8\n')
        registry = NeuronRegistry(home, watch=False)
        try:
            print(f"student {args.student}; {args.prompts} action asks, answers <= {args.max_tokens} tokens")
            for name, share in validity(registry, prompts[: args.prompts], args.max_tokens).items():
                print(f"  {name}: {share:.1%}")
            throughput(registry, prompts, 8, 4)  # warm both paths
            for what, held, measure in (("calls", "held", throughput), ("tool_choice auto calls", "held (lazy)",
                                                                          auto_throughput)):
                free, mixed = [], []
                for _ in range(args.repeats):
                    free.append(measure(registry, prompts, args.tokens, 0))
                    mixed.append(measure(registry, prompts, args.tokens, 4))
                ratio = statistics.fmean(m / f for m, f in zip(mixed, free))
                print(f"8 {what} at once, {args.tokens} tokens each: 8 free {statistics.fmean(free):.1f} tokens/s, "
                      f"4 {held} + 4 free {statistics.fmean(mixed):.1f} tokens/s: ratio {ratio:.3f} "
                      f"({args.repeats} runs each, alternated)")
            fresh, cached = [], []
            for i in range(args.repeats):
                schema = {**SCHEMA, "properties": {**SCHEMA["properties"], f"extra{i}": {"type": "integer"}}}
                fresh.append(first_token(registry, prompts[0], schema))
                cached.append(first_token(registry, prompts[0], schema))
            print(f"time to first token of a held call: fresh schema {1000 * statistics.fmean(fresh):.1f} ms, "
                  f"cached {1000 * statistics.fmean(cached):.1f} ms ({args.repeats} each)")
        finally:
            registry.close()
    mx.clear_cache()


if __name__ == "__main__":
    main()
