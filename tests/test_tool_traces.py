"""Tool use as data: traces that carry tools, tool calls and tool results; their rendering through
the model's own chat template (or the fallback form); reading calls back out of a model's text."""

import hashlib
import json

from conch_dna.kit import STUDENT_PATH, corpus
from conch_dna.lifecycle.gate import decide
from conch_dna.models.chat import encode_chat, prompt_text, render
from conch_dna.models.tools import (
    FALLBACK_START,
    ToolError,
    fallback_format,
    fallback_messages,
    parse_answer,
    same_calls,
    template_messages,
    tool_call_format,
    tool_use,
)
from conch_dna.server.wire import StreamedCalls
from conch_dna.traces.ingest import ingest_bytes, record
from conch_dna.traces.store import TraceStore
from conch_dna.traces.trace import parse_trace_line

import pytest

TOOLS = [corpus.TOOLS["read_file"], corpus.TOOLS["send_email"]]
CALL = {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'}}
CHAT = [{"role": "system", "content": "You are the action neuron."}, {"role": "user", "content": "Read notes.txt."},
        {"role": "assistant", "content": None, "tool_calls": [CALL]}]


def tool_trace(**changes) -> dict:
    return {"domain": "action", "teacher": "kit-teacher", "messages": CHAT, "tools": TOOLS, **changes}


def line(trace: dict) -> bytes:
    return json.dumps(trace).encode()


@pytest.fixture
def store(tmp_path):
    s = TraceStore(tmp_path / "conch.db")
    yield s
    s.close()


def test_a_tool_trace_is_stored_with_its_tools_and_calls_and_a_text_trace_reads_as_before(store):
    with_result = [*CHAT, {"role": "tool", "tool_call_id": "call_1", "content": "12 lines"},
                   {"role": "assistant", "content": "notes.txt has 12 lines."}]
    text = {"domain": "action", "teacher": "kit-teacher",
            "messages": [CHAT[1], {"role": "assistant", "content": "ok"}]}
    report = ingest_bytes(store, b"\n".join(map(line, [tool_trace(), tool_trace(messages=with_result), text])), "t")
    assert (report.stored, report.quarantined) == (3, 0)
    rows = store.traces_of("action", "train") + store.traces_of("action", "heldout")
    by_answer = {json.dumps(r["messages"][-1], sort_keys=True): r for r in rows}
    called = by_answer[json.dumps(CHAT[-1], sort_keys=True)]
    assert called["tools"] == TOOLS and called["messages"][-1]["tool_calls"] == [CALL]
    assert by_answer[json.dumps({"role": "assistant", "content": "ok"}, sort_keys=True)]["tools"] is None
    exported = store.chats("action", "train") + store.chats("action", "heldout")
    assert sum("tools" in c for c in exported) == 2  # mlx-lm's chat format: "tools" beside "messages"
    # a text trace keeps the id (and the split) it always had: tools change neither
    parsed = parse_trace_line(line(text))
    old_id = hashlib.sha256(b"action\0kit-teacher\0" + parsed.chat_json.encode()).hexdigest()
    assert parsed.trace_id() == old_id and prompt_text(text["messages"]) == "user: Read notes.txt."
    other_tools = parse_trace_line(line(tool_trace(tools=TOOLS[:1])))
    assert parse_trace_line(line(tool_trace())).trace_id() != other_tools.trace_id()


HOSTILE = {
    "arguments that are not JSON": (tool_trace(messages=[*CHAT[:2], {"role": "assistant", "content": None,
                                                                      "tool_calls": [{**CALL, "function": {
                                                                          "name": "read_file",
                                                                          "arguments": "{path: notes"}}]}]),
                                    "arguments are not JSON"),
    "arguments that are not an object": (tool_trace(messages=[*CHAT[:2], {"role": "assistant", "tool_calls": [
        {**CALL, "function": {"name": "read_file", "arguments": "[1, 2]"}}]}]), "must be a JSON object"),
    "a call to a tool not offered": (tool_trace(tools=TOOLS[1:]), "'read_file', which is not in tools"),
    "a call with no tools at all": (tool_trace(tools=None), "not in tools (offered: none)"),
    "10,000 tools": (tool_trace(tools=[{"type": "function", "function": {"name": f"t{i}"}} for i in range(10_000)]),
                     "10000 tools, over the limit of 128"),
    "a deep schema": (tool_trace(tools=[{"type": "function", "function": {"name": "deep", "parameters": json.loads(
        '{"a":' * 40 + "1" + "}" * 40)}}]), "nests deeper than 32"),
    "a tool result answering no call": (tool_trace(messages=[*CHAT[:2], {"role": "tool", "tool_call_id": "nope",
                                                                        "content": "x"},
                                                            {"role": "assistant", "content": "done"}]),
                                        "must answer a call made before it"),
    "a user message without text": (tool_trace(messages=[{"role": "user", "content": None}, CHAT[2]]),
                                    "a user message needs text content"),
    "an answer with neither text nor calls": (tool_trace(messages=[CHAT[1], {"role": "assistant", "content": None}]),
                                              "needs text content"),
    "a tool named with a path": (tool_trace(tools=[{"type": "function", "function": {"name": "../etc"}}]),
                                 "is not 1-64 characters"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tool_use_is_quarantined_with_its_reason(store, case):
    trace, reason = HOSTILE[case]
    report = ingest_bytes(store, line(trace), "hostile.jsonl")
    assert report.quarantined == 1 and reason in store.quarantined()[0]["reason"], store.quarantined()[0]["reason"]
    assert record("action", trace["messages"], "kit-teacher", tools=trace.get("tools"), store=store) is None
    assert store.quarantine_count() == 2


def test_a_deeply_nested_line_is_quarantined_not_a_crash(store):
    deep = '{"domain": "action", "teacher": "t", "tools": [' + "[" * 100_000 + "]" * 100_000 + "]}"
    report = ingest_bytes(store, deep.encode(), "deep.jsonl")
    assert report.quarantined == 1 and store.quarantined()[0]["reason"]


def test_a_tool_chat_renders_through_the_kits_own_template_and_trains_on_the_call(student):
    _, tokenizer = student
    tokens = render(tokenizer, CHAT, TOOLS)
    assert tokens == tokenizer.apply_chat_template(template_messages(CHAT), tools=TOOLS, return_dict=False)
    text = tokenizer.decode(tokens)
    assert text.startswith("<|im_start|>system\nYou are the action neuron.\n<tools>\n") and "Read notes.txt." in text
    assert '"name": "send_email"' in text
    assert '<tool_call>{"name": "read_file", "arguments": {"path": "notes.txt"}}</tool_call>' in text
    ids, offset = encode_chat(tokenizer, CHAT, TOOLS)
    assert tokenizer.decode(ids[offset:]).startswith('<tool_call>{"name": "read_file"')
    # the kit's template is one mlx-lm reads calls back from: the same parser mlx_lm.server uses
    assert tool_call_format(tokenizer).start == "<tool_call>"
    assert render(tokenizer, CHAT[:2]) == tokenizer.apply_chat_template(CHAT[:2], return_dict=False)


@pytest.mark.slow
def test_a_template_without_tools_gets_the_fallback_form(real_pair):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    tokenizer = load_tokenizer(real_pair.student)
    answered = [*CHAT, {"role": "tool", "tool_call_id": "call_1", "content": "12 lines"},
                {"role": "assistant", "content": "It has 12 lines."}]
    tokens = render(tokenizer, answered, TOOLS)
    assert tokens == tokenizer.apply_chat_template(fallback_messages(answered, TOOLS), return_dict=False)
    # SmolLM2's template drops `tools`: handed them as they are, the model would never see them
    assert tokens != tokenizer.apply_chat_template(template_messages(answered), tools=TOOLS, return_dict=False)
    text = tokenizer.decode(tokens)
    assert '"name": "read_file"' in text and FALLBACK_START + '{"name": "read_file", "arguments": {"path"' in text
    fmt = tool_call_format(tokenizer)
    assert fmt.parse is fallback_format().parse
    got = parse_answer(fallback_messages(CHAT, None)[-1]["content"], fmt, TOOLS)
    assert got.parsed and same_calls(got.tool_calls, [CALL]) == (True, True)


def test_calls_are_read_out_of_text_and_an_unreadable_one_is_counted():
    fmt = fallback_format()
    got = parse_answer('Sure. <tool_call>{"name": "read_file", "arguments": {"path": "a.txt"}}</tool_call>', fmt)
    assert got.content == "Sure." and got.parsed and json.loads(got.tool_calls[0]["function"]["arguments"]) == {
        "path": "a.txt"}
    broken = parse_answer('<tool_call>{"name": "read_file", "argu', fmt)
    assert not broken.parsed and broken.unparsed == 1 and broken.tool_calls == []
    assert parse_answer("no call here", fmt).tool_calls == [] and parse_answer("x", None).content == "x"
    other = {"id": "c", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "b.txt"}'}}
    assert same_calls(got.tool_calls, [other]) == (True, False)
    assert same_calls([], [other]) == (False, False)


def test_tool_choice_is_honoured_or_refused_by_name(student):
    _, tokenizer = student
    assert tool_use(tokenizer, None) is None and tool_use(tokenizer, TOOLS, "none") is None
    assert tool_use(tokenizer, TOOLS).prefix == "" and tool_use(tokenizer, TOOLS, "required").prefix == "<tool_call>"
    forced = tool_use(tokenizer, TOOLS, {"type": "function", "function": {"name": "send_email"}})
    assert forced.prefix == '<tool_call>{"name": "send_email", "arguments":'
    assert parse_answer(forced.prefix + ' {"to": "Ada", "subject": "x"}}</tool_call>', forced.format).parsed
    for bad, words in (({"type": "function", "function": {"name": "rm"}}, "not in tools"),
                       ("sometimes", "tool_choice must be"), ("required", "needs tools")):
        with pytest.raises(ToolError, match=words):
            tool_use(tokenizer, TOOLS if bad != "required" else None, bad)


def test_streamed_tool_call_fragments_are_put_back_together():
    calls = StreamedCalls()
    calls.add([{"index": 0, "id": "call_a", "type": "function", "function": {"name": "read_file", "arguments": ""}}])
    calls.add([{"index": 0, "function": {"arguments": '{"path": '}}])
    calls.add([{"index": 1, "id": "call_b", "function": {"name": "send_email", "arguments": "{}"}}])
    calls.add([{"index": 0, "function": {"arguments": '"a.txt"}'}}])
    calls.add(None)
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls.calls()] == [
        ("call_a", "read_file", {"path": "a.txt"}), ("call_b", "send_email", {})]


def test_the_gate_keeps_a_candidate_whose_tool_calls_parse_less_often_and_can_gate_on_them():
    from conch_dna.settings.config import Config, GateMetric

    def metrics(kl, parsed, right):
        return {"kl": kl, "ce": 1.0, "agreement": 0.8, "tokens": 400,
                "tool_calls": {"traces": 10, "parsed": parsed, "name": right, "arguments": right}}

    config = Config(student=STUDENT_PATH, min_heldout=1)
    ok, why = decide(metrics(1.0, 1.0, 0.5), metrics(0.5, 0.9, 0.6), 20, config, "action", False)
    assert not ok and "parse fell 100% -> 90%" in why
    assert decide(metrics(1.0, 0.9, 0.5), metrics(0.5, 0.9, 0.5), 20, config, "action", False)[0]
    tolerant = config.model_copy(update={"max_tool_parse_drop": 0.2})
    assert decide(metrics(1.0, 1.0, 0.5), metrics(0.5, 0.9, 0.6), 20, tolerant, "action", False)[0]
    on_calls = config.model_copy(update={"gate_metric": GateMetric.TOOL_CALLS})
    ok, why = decide(metrics(1.0, 1.0, 0.5), metrics(1.5, 1.0, 0.7), 20, on_calls, "action", False)
    assert ok and "50% of 10 held-out tool calls right" in why  # more calls right, though KL rose
    assert not decide(metrics(0.5, 1.0, 0.7), metrics(0.1, 1.0, 0.5), 20, on_calls, "action", False)[0]
    assert not decide(metrics(1.0, 1.0, 0.5), metrics(0.5, 1.0, 0.6), 3, on_calls.model_copy(
        update={"min_heldout": 8}), "action", False)[0]


def test_the_ego_answers_with_tool_calls_and_records_them_with_the_tools(tmp_path):
    from conch_dna.kit import TEACHER_PATH
    from conch_dna.traces.ego import Ego

    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\nstudent = "{STUDENT_PATH}"\n')
    ego = Ego(home=home, max_tokens=48)
    try:
        prompts = corpus.tool_prompts(6, seed=3)
        answers = [ego.generate("action", p["messages"], tools=p["tools"]) for p in prompts]
        assert sum(bool(a.tool_calls) for a in answers) >= 4  # the kit teacher calls tools when offered them
        called = next(a for a in answers if a.tool_calls)
        assert called.startswith("<tool_call>") and called.message()["tool_calls"] == called.tool_calls
        forced = ego.answer(prompts[0]["messages"], 48, prompts[0]["tools"], "required")
        assert forced.text.startswith("<tool_call>") and forced.finish_reason in ("tool_calls", "length")
        rows = ego.store.traces_of("action", "train") + ego.store.traces_of("action", "heldout")
        with_calls = [r for r in rows if r["messages"][-1].get("tool_calls")]
        assert len(rows) + ego.store.quarantine_count() == len(prompts)
        assert with_calls and all(r["tools"] in [p["tools"] for p in prompts] for r in with_calls)
    finally:
        ego.close()
