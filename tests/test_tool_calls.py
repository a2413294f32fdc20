"""Tool calls end to end on real components: an `openai` client calls the EGO with tools through
`conch serve`, whose upstream is a real `mlx_lm.server` on the kit teacher; the traces keep the tools
and the calls; a retrain trains on them and measures tool calls; the promoted student answers with
tool calls through `neurons` and through the `openai` client, streamed and not."""

import json

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH, corpus
from conch_dna.server.app import Server
from conch_dna.settings.config import load_config
from conch_dna.traces.runs import RunStatus
from conch_dna.traces.store import TraceStore

import httpx
from conftest import retrain
from test_serve import client, upstream, wait_until  # noqa: F401 - upstream: mlx_lm.server on the kit teacher

PROMPTS = corpus.tool_prompts(28, seed=41)


def tool_home(tmp_path, upstream_url):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'teacher = "{TEACHER_PATH}"\nstudent = "{STUDENT_PATH}"\n'
        "heldout_fraction = 0.25\nmin_heldout = 2\npromote_margin = 0.0\n"
        f"[kd]\nlora_layers = 16\nlora_rank = 8\nlearning_rate = 1e-3\non_policy = 0.0\nmax_answer_tokens = 48\n"
        f'[ego]\nupstream_url = "{upstream_url}"\n')
    return home


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or ()]


def streamed(stream) -> tuple[str, list[tuple[str, dict]], str]:
    """(content, calls, finish reason) of an openai stream, its tool-call fragments put together."""
    text, calls, finish = "", {}, None
    for chunk in stream:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for c in choice.delta.tool_calls or ():
                slot = calls.setdefault(c.index, ["", ""])
                slot[0] += c.function.name or ""
                slot[1] += c.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, [(name, json.loads(args)) for name, args in calls.values()], finish


def test_tool_calls_are_captured_distilled_measured_and_served(tmp_path, upstream):  # noqa: F811 - the fixture
    home = tool_home(tmp_path, upstream)
    server = Server(home, port=0).start()
    try:
        api = client(server)
        answered = []
        for i, prompt in enumerate(PROMPTS):
            ask = dict(model="ego/action", messages=prompt["messages"], tools=prompt["tools"], max_tokens=48)
            if i % 2:
                _, calls, _ = streamed(api.chat.completions.create(**ask, stream=True))
            else:
                calls = calls_of(api.chat.completions.create(**ask).choices[0].message)
            answered.append(calls)  # (mlx_lm.server says "tool_calls" for a call it could not read, and drops it)
        assert sum(map(bool, answered)) >= len(PROMPTS) // 2  # the kit teacher answers these with calls
        store = TraceStore.for_home(home, load_config(home))
        # an answer mlx_lm.server sends empty (a call it could not read, which it drops) or a call to a
        # tool the request did not offer (the kit teacher is small) is quarantined, with why
        wait_until(lambda: store.counts("action").total + store.quarantine_count() == len(PROMPTS),
                   "every EGO answer recorded")
        assert all("answer (last message) is empty" in q["reason"] or "which is not in tools" in q["reason"]
                   for q in store.quarantined()), store.quarantined()
        rows = store.traces_of("action", "train") + store.traces_of("action", "heldout")
        kept = {r["messages"][1]["content"]: r for r in rows}
        for prompt, calls in zip(PROMPTS, answered):
            if prompt["messages"][1]["content"] not in kept:  # quarantined
                continue
            row = kept[prompt["messages"][1]["content"]]
            assert row["tools"] == prompt["tools"]
            assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                    for c in row["messages"][-1].get("tool_calls") or ()] == calls
        result = retrain(home, "action", iters=40, force=True)
        assert result.status is RunStatus.PROMOTED, result.reason
        (run,) = store.runs("action")
        held_calls = sum(bool(r["messages"][-1].get("tool_calls")) for r in store.traces_of("action", "heldout"))
        for side in (run.current_metrics, run.candidate_metrics):
            assert side["tool_calls"]["traces"] == held_calls > 0 and 0 <= side["tool_calls"]["parsed"] <= 1
        wait_until(lambda: server.registry.next_version("action") == result.version, "the hot-swap")

        # the promoted student answers a prompt it was trained on with that call, every way it is asked
        row = next(r for r in store.traces_of("action", "train") if r["messages"][-1].get("tool_calls"))
        prompt, want = row["messages"][:-1], row["messages"][-1]["tool_calls"][0]["function"]["name"]
        answer = server.registry.get("action").generate(prompt, tools=row["tools"], max_tokens=48)
        assert [c["function"]["name"] for c in answer.tool_calls] == [want], repr(str(answer)) + repr(row)
        assert answer.message()["content"] is None and json.loads(answer.tool_calls[0]["function"]["arguments"])
        choice = api.chat.completions.create(model="action", messages=prompt, tools=row["tools"],
                                             max_tokens=48).choices[0]
        assert choice.finish_reason == "tool_calls" and [n for n, _ in calls_of(choice.message)] == [want]
        assert choice.message.content is None
        text, calls, finish = streamed(api.chat.completions.create(model="action", messages=prompt,
                                                                   tools=row["tools"], max_tokens=48, stream=True))
        assert finish == "tool_calls" and calls == calls_of(choice.message) and "<tool_call>" not in text
        # tool_choice "none": no tools shown, no call read; a named tool: that one, forced
        none = api.chat.completions.create(model="action", messages=prompt, tools=row["tools"], max_tokens=24,
                                           tool_choice="none").choices[0]
        assert none.message.tool_calls is None and none.finish_reason != "tool_calls"
        other = next(t["function"]["name"] for t in row["tools"] if t["function"]["name"] != want)
        forced = api.chat.completions.create(model="action", messages=prompt, tools=row["tools"], max_tokens=48,
                                             tool_choice={"type": "function", "function": {"name": other}})
        assert [n for n, _ in calls_of(forced.choices[0].message)] == [other], forced.choices[0].message
        bad = httpx.post(f"{server.url}/chat/completions", json={"model": "action", "messages": prompt,
                                                                 "tools": [{"type": "function"}]})
        assert bad.status_code == 400 and "tools[0]" in bad.json()["error"]["message"]
    finally:
        server.stop()
