"""Answers held to a response_format: through `conch serve` with the `openai` client's own structured-output
helper, streamed and not; in the batch beside free rows, each row as it answers alone; hostile forms refused
with their reason. The kit's bare student writes nonsense, so whatever parses, parses because it was held."""

import json
import time
from typing import Literal

from conch_dna.kit import TEACHER_PATH
from conch_dna.models.structured import MAX_SCHEMA_BYTES, MAX_SCHEMA_DEPTH, StructureError, response_format_of
from conch_dna.server.app import Server
from conch_dna.settings.config import load_config
from conch_dna.traces.store import TraceStore

import httpx
import jsonschema
import numpy as np
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field
from test_neurons import make_home

from neurons import NeuronRegistry

CHAT = [{"role": "user", "content": "Pick a fruit for the basket."}]
LEVEL = {"type": "object", "properties": {"level": {"enum": ["low", "high"]},
                                          "n": {"type": "integer", "minimum": 0, "maximum": 99}},
         "required": ["level", "n"], "additionalProperties": False}


class Pick(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fruit: Literal["apple", "pear", "plum"]
    count: int = Field(ge=0, le=9)
    note: str = Field(max_length=12)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("structured"))
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\n' + (home / "config.toml").read_text())
    server = Server(home, port=0).start()
    yield server
    server.stop()


def client(server):
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)


def test_the_openai_clients_parse_gets_an_object_from_a_neuron_streamed_or_not(server):
    whole = client(server).chat.completions.parse(model="task", messages=CHAT, response_format=Pick, max_tokens=64)
    assert isinstance(whole.choices[0].message.parsed, Pick), whole.choices[0].message.content
    with client(server).chat.completions.stream(model="task", messages=CHAT, response_format=Pick,
                                                max_tokens=64) as stream:
        chunks = [event for event in stream if event.type == "content.delta"]
        streamed = stream.get_final_completion()
    assert len(chunks) > 1 and streamed.choices[0].message.parsed == whole.choices[0].message.parsed
    free = client(server).chat.completions.create(model="task", messages=CHAT, max_tokens=64)
    with pytest.raises(ValueError):  # the same student, unheld, writes no such object
        Pick.model_validate_json(free.choices[0].message.content)


@pytest.mark.parametrize("fmt", [  # bounded strings: a free one lets the bare student write a key for ever
    {"type": "json_schema", "json_schema": {"name": "level", "schema": LEVEL}},
    {"type": "json_schema", "json_schema": {"name": "steps", "strict": True, "schema": {
        "type": "object", "properties": {"steps": {"type": "array", "items": {"type": "string", "maxLength": 6},
                                                   "minItems": 1, "maxItems": 3}}, "required": ["steps"]}}},
])
def test_every_answer_validates_against_its_schema_checked_by_jsonschema(server, fmt):
    schema = fmt.get("json_schema", {}).get("schema", {"type": "object"})
    for prompt in ("Plan the week.", "Name three tools.", "What went wrong?"):
        answer = client(server).chat.completions.create(
            model="debug", messages=[{"role": "user", "content": prompt}], response_format=fmt, max_tokens=96)
        assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
        jsonschema.validate(json.loads(answer.choices[0].message.content), schema)


def test_held_and_free_rows_in_one_batch_answer_as_each_does_alone(tmp_path):
    registry = NeuronRegistry(make_home(tmp_path), watch=False)
    try:
        asks = [("task", "Pick a fruit.", Pick), ("debug", "Why did it fail?", None),
                ("task", "Name a tool.", {"type": "json_object"}), ("memory", "What was said?", None),
                ("debug", "Pick one.", Pick)]
        alone = [str(registry.get(d).generate(p, max_tokens=40, response_format=f)) for d, p, f in asks]
        calls = [registry.get(d).submit(p, max_tokens=40, response_format=f) for d, p, f in asks]
        for call in calls:
            list(call)
        assert [c.text for c in calls] == alone
        assert registry.engine.peak_running >= 3  # they did decode together
        Pick.model_validate_json(alone[0])
        assert registry.grammars().matcher(Pick) is not registry.grammars().matcher(Pick)  # a state per call
    finally:
        registry.close()


def test_an_answer_cut_by_max_tokens_inside_the_json_says_length(server):
    answer = client(server).chat.completions.create(model="task", messages=CHAT, max_tokens=3,
                                                    response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "length"
    with pytest.raises(openai.LengthFinishReasonError):
        client(server).chat.completions.parse(model="task", messages=CHAT, response_format=Pick, max_tokens=3)


def deep(n: int) -> dict:
    schema = {"type": "string"}
    for _ in range(n):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize("fmt, words", [
    ({"type": "xml"}, "response_format.type must be one of text, json_object, json_schema, got 'xml'"),
    ({"type": "json_schema"}, "must be an object with a `schema` object"),
    ({"type": "json_schema", "json_schema": {"schema": "yes"}}, "must be an object with a `schema` object"),
    ({"type": "json_schema", "json_schema": {"schema": deep(MAX_SCHEMA_DEPTH)}}, "over the limit of 32"),
    ({"type": "json_schema", "json_schema": {"schema": {"description": "x" * MAX_SCHEMA_BYTES}}},
     f"over the limit of {MAX_SCHEMA_BYTES}"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/$defs/nowhere"}}}, "cannot be compiled"),
    ({"type": "json_schema", "json_schema": {"schema": {"type": "string", "pattern": "(?<=a)b"}}},
     "cannot be compiled"),
])
def test_a_form_that_cannot_be_held_is_a_400_naming_why(server, fmt, words):
    response = httpx.post(f"{server.url}/chat/completions", timeout=30,
                          json={"model": "task", "messages": CHAT, "response_format": fmt, "max_tokens": 8})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"], error
    ok = client(server).chat.completions.create(model="task", messages=CHAT, max_tokens=4)  # nothing else broke
    assert ok.choices[0].finish_reason == "length"


def test_the_python_api_takes_a_pydantic_class_and_refuses_a_forced_call_beside_it(tmp_path):
    assert response_format_of(Pick)["json_schema"]["name"] == "Pick"
    registry = NeuronRegistry(make_home(tmp_path), watch=False)
    try:
        answer = registry.get("task").generate("Pick a fruit.", max_tokens=40, response_format=Pick)
        assert Pick.model_validate_json(str(answer)).fruit in ("apple", "pear", "plum")
        tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
        with pytest.raises(StructureError, match="cannot both hold the answer"):
            registry.get("task").submit("Read it.", tools=tools, tool_choice="required", response_format=Pick)
        with pytest.raises(StructureError, match="pydantic model class"):
            registry.get("task").submit("Pick.", response_format="json")
    finally:
        registry.close()


def test_the_teachers_answer_is_held_too_and_its_trace_keeps_the_form(server):
    fmt = {"type": "json_schema", "json_schema": {"name": "level", "schema": LEVEL}}
    raw = client(server).chat.completions.with_raw_response.create(model="ego/task", messages=CHAT,
                                                                   response_format=fmt, max_tokens=48)
    answer = raw.parse()
    assert raw.headers["x-conch-answered-by"] == "ego"
    jsonschema.validate(json.loads(answer.choices[0].message.content), LEVEL)
    store = TraceStore.for_home(server.home, load_config(server.home))
    try:
        def kept():
            rows = store.traces_of("task", "train") + store.traces_of("task", "heldout")
            return [r for r in rows if r["response_format"]]

        deadline = time.monotonic() + 60
        while not kept() and time.monotonic() < deadline:  # recorded after the answer was sent
            time.sleep(0.05)
        (row,) = kept()
        assert row["response_format"]["json_schema"]["schema"] == LEVEL
        assert row["messages"][-1]["content"] == answer.choices[0].message.content
        assert row["topk"] is not None and np.isfinite(row["topk"]["logprobs"].astype(np.float32)).all()
    finally:
        store.close()


TOOLS = [
    {"type": "function", "function": {"name": "read_file", "parameters": {
        "type": "object", "properties": {"path": {"type": "string", "maxLength": 10}}, "required": ["path"],
        "additionalProperties": False}}},
    {"type": "function", "function": {"name": "set_level", "parameters": {
        "type": "object", "properties": {"level": {"type": "integer", "minimum": 0, "maximum": 5},
                                         "why": {"enum": ["slow", "broken"]}},
        "required": ["level", "why"], "additionalProperties": False}}},
]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "set_level"}}])
def test_a_forced_call_from_the_bare_student_validates_against_its_tools_schema(server, choice):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for prompt in ("Read the config.", "Turn it up.", "Why is it slow?"):
        answer = client(server).chat.completions.create(
            model="action", messages=[{"role": "user", "content": prompt}], tools=TOOLS, tool_choice=choice,
            max_tokens=96)
        choice_out = answer.choices[0]
        assert choice_out.finish_reason == "tool_calls", choice_out.message
        (call,) = choice_out.message.tool_calls
        assert call.function.name in schemas and (choice == "required" or call.function.name == "set_level")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_a_forced_call_unheld_does_not_parse_from_the_bare_student(tmp_path):
    """What the grammar buys: the same calls with the mask lifted (the guard the test above relies on)."""
    registry = NeuronRegistry(make_home(tmp_path), watch=False)
    try:
        held = registry.get("action").submit("Turn it up.", max_tokens=96, tools=TOOLS, tool_choice="required")
        list(held)
        assert held.grammar is not None and held.parsed().parsed
        held_grammar = registry.grammars().tool_call
        registry.grammars().tool_call = lambda use: None
        free = registry.get("action").submit("Turn it up.", max_tokens=96, tools=TOOLS, tool_choice="required")
        list(free)
        registry.grammars().tool_call = held_grammar
        assert not free.parsed().parsed, free.text
    finally:
        registry.close()


def opening_first(tokenizer, text: str):
    """A logits processor that makes a row write `text` first, then leaves it free: the bare kit student,
    left alone, rarely opens a call under tool_choice "auto"."""
    import mlx.core as mx

    forced, start = tokenizer.encode(text, add_special_tokens=False), []

    def process(tokens, logits):
        start or start.append(tokens.size)
        step = tokens.size - start[0]
        if step >= len(forced):
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == forced[step], 0.0, -mx.inf)[None]

    return process


def test_with_tool_choice_auto_a_call_that_opens_is_held_to_the_tools_schemas_and_plain_text_stays_free(tmp_path):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    registry = NeuronRegistry(make_home(tmp_path), watch=False)
    prompts = ("Read the config.", "Turn it up.", "Why is it slow?", "Open the log file.")
    try:
        neuron, grammars = registry.get("action"), registry.grammars()

        def answers(lazy: bool, opening: str | None):
            held = grammars.tool_call
            if not lazy:
                grammars.tool_call = lambda use: None
            try:
                calls = [neuron.submit(p, max_tokens=96, tools=TOOLS, logits_processors=[
                    opening_first(registry.tokenizer, opening)] if opening else None) for p in prompts]
            finally:
                grammars.tool_call = held
            for c in calls:
                list(c)
            return calls

        opened = answers(True, "Sure. <tool_call>")
        for c in opened:
            assert c.grammar is not None and c.finish_reason.value == "stop", c.text
            parsed = c.parsed()
            assert parsed.parsed and parsed.content.startswith("Sure."), c.text
            for made in parsed.tool_calls:
                jsonschema.validate(json.loads(made["function"]["arguments"]), schemas[made["function"]["name"]])
        assert not any(c.parsed().tool_calls for c in answers(False, "Sure. <tool_call>"))  # unheld: no call
        plain, unheld = answers(True, None), answers(False, None)
        assert all("<tool_call>" not in c.text for c in plain)
        assert [c.text for c in plain] == [c.text for c in unheld]  # no call opened: the grammar changed nothing
    finally:
        registry.close()


def test_a_call_opening_that_is_one_special_token_follows_the_text_as_that_token(tmp_path):
    registry = NeuronRegistry(make_home(tmp_path), watch=False)
    try:
        grammars = registry.grammars()
        eos = registry.tokenizer.decode([sorted(registry.tokenizer.eos_token_ids)[0]])
        assert grammars._opening(eos) == f"opening: TEXT {eos}"
        assert grammars._opening("<tool_call>") == 'opening[lazy]: TEXT "<tool_call>"'
    finally:
        registry.close()


def test_every_run_records_how_the_held_out_answers_asked_in_a_form_validate(tmp_path, monkeypatch):
    from conch_dna.cli.main import app
    from conch_dna.lifecycle.gate import decide
    from conch_dna.lifecycle.report import build_report
    from conch_dna.settings.config import Config
    from conch_dna.traces.ingest import ingest_file

    from typer.testing import CliRunner

    from tests.conftest import retrain
    from tests.test_daemon import drop, teacher_traces, write_config

    home = tmp_path / "home"
    write_config(home, domains=["debug"], min_heldout=2)
    fmt = {"type": "json_schema", "json_schema": {"name": "level", "schema": LEVEL}}
    asked = [json.dumps({**json.loads(t), "response_format": fmt}) for t in teacher_traces("debug", 24, seed=3)]
    drop(home, "d.jsonl", teacher_traces("debug", 24, seed=7) + asked)
    store = TraceStore.for_home(home, load_config(home))
    ingest_file(store, home / "inbox" / "d.jsonl")
    n_asked = sum(bool(t["response_format"]) for t in store.traces_of("debug", "heldout"))
    assert n_asked > 0
    result = retrain(home, "debug", iters=4, force=True)
    for side in (result.current_metrics, result.candidate_metrics):
        forms = side["formats"]  # each version's greedy answers to those traces, free and held
        assert forms["traces"] == n_asked and forms["valid_held"] == 1.0 and forms["valid"] < 1.0, forms
    monkeypatch.setenv("CONCH_HOME", str(home))
    (run,) = json.loads(CliRunner().invoke(app, ["kd", "history", "--domain", "debug", "--json"]).output)
    assert run["candidate_metrics"]["formats"] == result.candidate_metrics["formats"]
    (record,) = store.runs("debug")  # the cell `conch kd history` shows
    assert record.format_change() == " -> ".join(f"{m['formats']['valid']:.0%} (100%)" for m in
                                                 (result.current_metrics, result.candidate_metrics))
    page = (build_report(home, load_config(home), tmp_path / "report")).read_text()
    assert "answers in form, free (held)" in page and "(100%) -&gt; " in page
    # the gate reads the free share: a candidate that keeps to the form less often is not promoted
    current, candidate = dict(result.current_metrics), dict(result.candidate_metrics)
    current["formats"] = {**current["formats"], "valid": 0.5}
    candidate["formats"] = {**candidate["formats"], "valid": 0.25}
    config = Config(min_heldout=2, max_repeat_rise=1.0, min_distinct_ratio=0.0, max_unended_rise=1.0,
                    min_entropy_ratio=0.0, max_length_ratio=float("inf"), promote_margin=0.0, max_agreement_drop=1.0)
    candidate["kl"] = current["kl"] * 0.5
    ok, why = decide(current, candidate, 10, config, "debug", False)
    assert not ok and "validate against their response_format fell 50% -> 25%" in why
    assert decide(current, candidate, 10, config.model_copy(update={"max_format_drop": 1.0}), "debug", False)[0]
