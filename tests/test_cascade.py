"""`auto/<domain>`: the student answers when its version's acceptance rule takes the answer, else the in-process
teacher does and its answer becomes a trace; the rule is fitted at the gate, checked here against a brute-force
reference; every answer says who wrote it."""

import json
import logging
import math
import random
import time

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH
from conch_dna.lifecycle.acceptance import ACCEPTANCE_FILE, fit_acceptance, read_acceptance, write_acceptance
from conch_dna.models.versions import domain_dir
from conch_dna.server.app import Server
from conch_dna.settings.config import Config, load_config
from conch_dna.traces.store import TraceStore

import httpx
import mlx.core as mx
import openai
import pytest
from mlx_lm import load
from mlx_lm.generate import generate_step
from test_neurons import make_home

CHAT = [{"role": "user", "content": "Plan how to send the email."}]


def reference_fit(scores, bound, max_repeat):
    """Every threshold tried: the one that serves the most answers within the bound (the lowest on a tie)."""
    ok = [s for s in scores if s["ended"] and s["repeated_4grams"] <= max_repeat]
    best = (0, math.inf)
    for t in sorted({s["confidence"] for s in ok}):
        taken = [s for s in ok if s["confidence"] >= t]
        if sum(s["kl"] for s in taken) / len(taken) <= bound and len(taken) > best[0]:
            best = (len(taken), t)
    return best[1], best[0] / len(scores)


@pytest.mark.parametrize("seed", range(20))
def test_the_fitted_threshold_is_the_one_a_search_of_every_threshold_finds(seed):
    rng = random.Random(seed)
    scores = [{"confidence": round(rng.uniform(-3, 0), 1), "kl": rng.uniform(0, 3),  # rounded: ties happen
               "repeated_4grams": rng.choice([0.0, 0.1, 0.8]), "ended": rng.random() < 0.8} for _ in range(40)]
    config = Config(auto_max_kl=rng.choice([0.5, 1.0, 1.5]))
    rule = fit_acceptance(scores, config)
    threshold, share = reference_fit(scores, config.auto_max_kl, config.auto_max_repeat)
    assert (rule["threshold"], rule["expected_share"]) == (threshold, share)
    if rule["accepted_kl"] is not None:
        assert rule["accepted_kl"] <= config.auto_max_kl


def test_a_loop_is_never_accepted_however_sure_and_however_well_the_teacher_scores_it():
    loop = {"confidence": -0.01, "kl": 0.01, "repeated_4grams": 0.9, "ended": True}
    unended = {"confidence": -0.02, "kl": 0.02, "repeated_4grams": 0.0, "ended": False}
    rule = fit_acceptance([loop, unended, {"confidence": -2.0, "kl": 5.0, "repeated_4grams": 0.0, "ended": True}],
                          Config())
    assert rule["threshold"] == math.inf and rule["expected_share"] == 0.0  # defers everything: not an error


def promote_quiet_version(home) -> None:
    """task@v0001: LoRA whose B is zero (the bare student's answers, which end), as a retrain would write it."""
    from conch_dna.models.adapters import adapter_weights, apply_lora, save_adapter
    from conch_dna.models.loading import load_model
    from conch_dna.models.versions import promote

    model, _ = load_model(STUDENT_PATH)
    config = {"model": STUDENT_PATH, **apply_lora(model, 16, 8, 20.0, 0.0)}
    weights = {k: mx.zeros_like(v) if k.endswith("lora_b") else v for k, v in adapter_weights(model).items()}
    promote(home, "task", save_adapter(home.parent / "cand-task", weights, config), "quiet")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    home = make_home(tmp_path_factory.mktemp("cascade"))
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\n' + (home / "config.toml").read_text())
    promote_quiet_version(home)
    server = Server(home, port=0).start()
    yield server
    server.stop()


def own_signal(home, prompt_chat, max_tokens=64) -> tuple[str, float, bool]:
    """The version's greedy answer and its mean token log-probability, by mlx_lm alone (the reference)."""
    model, tokenizer = load(STUDENT_PATH, adapter_path=str(domain_dir(home, "task") / "v0001"))
    from conch_dna.models.chat import prompt_tokens, to_chat

    chat = to_chat("task", prompt_chat)
    prompt = mx.array(prompt_tokens(tokenizer, chat.messages))
    tokens, logprobs, ended = [], [], False
    for (token, lp), _ in zip(generate_step(prompt, model, max_tokens=max_tokens), range(max_tokens)):
        token = int(token)
        if token in tokenizer.eos_token_ids:
            ended = True
            break
        tokens.append(token)
        logprobs.append(float(lp[token]))
    return tokenizer.decode(tokens), sum(logprobs) / len(logprobs), ended


def ask(server, **extra):
    return httpx.post(f"{server.url}/chat/completions", timeout=120,
                      json={"model": "auto/task", "messages": CHAT, "max_tokens": 64, **extra})


def test_a_sure_answer_is_the_students_and_an_unsure_one_is_the_teachers_recorded_as_a_trace(server):
    home = server.home

    def counted() -> dict:  # the module's other tests call auto/task too: read what this one adds
        return httpx.get(f"{server.url}/stats").json()["auto"].get("task", {}).get("v0001", {})

    start = counted()
    text, signal, ended = own_signal(home, CHAT)
    assert ended, "the kit's v0001 must end this answer within 64 tokens for the test to mean anything"
    folder = domain_dir(home, "task") / "v0001"
    write_acceptance(folder, {"threshold": signal - 0.01, "max_repeat": 1.0, "bound_kl": 1.0})
    server.api.cascade.deferral._rules.clear()
    sure = ask(server)
    assert sure.status_code == 200, sure.text
    assert sure.headers["x-conch-answered-by"] == "task@v0001" and sure.headers["x-conch-deferred"] == "false"
    assert float(sure.headers["x-conch-signal"]) == pytest.approx(signal, abs=2e-3)
    assert sure.json()["choices"][0]["message"]["content"] == text
    assert sure.json()["system_fingerprint"] == "task@v0001"

    store = TraceStore.for_home(home, load_config(home))
    before = store.counts("task").total
    write_acceptance(folder, {"threshold": signal + 0.01, "max_repeat": 1.0, "bound_kl": 1.0})
    server.api.cascade.deferral._rules.clear()
    unsure = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0).chat.completions.with_raw_response \
        .create(model="auto/task", messages=CHAT, max_tokens=32)
    assert unsure.headers["x-conch-answered-by"] == "ego" and unsure.headers["x-conch-deferred"] == "true"
    answer = unsure.parse().choices[0].message.content
    assert answer and answer != text
    deadline = time.monotonic() + 60  # recorded after the answer was sent
    while store.counts("task").total == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.counts("task").total == before + 1, store.quarantined()  # what the next retrain learns
    stats = counted()
    assert stats["served"] - start.get("served", 0) == 1 and stats["deferred"] - start.get("deferred", 0) == 1
    assert stats["teacher_seconds"] > start.get("teacher_seconds", 0.0)
    assert stats["compared"] - start.get("compared", 0) == 1 and stats["agreed"] == start.get("agreed", 0)
    store.close()


def test_a_stream_starts_once_the_answer_is_known_to_be_the_students(server):
    text, signal, _ = own_signal(server.home, CHAT)
    write_acceptance(domain_dir(server.home, "task") / "v0001", {"threshold": signal - 0.01, "max_repeat": 1.0})
    server.api.cascade.deferral._rules.clear()
    with httpx.stream("POST", f"{server.url}/chat/completions", timeout=120,
                      json={"model": "auto/task", "messages": CHAT, "max_tokens": 64, "stream": True}) as r:
        assert r.headers["x-conch-answered-by"] == "task@v0001"
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events) == text


@pytest.mark.parametrize("content", [None, "{not json", '{"threshold": "high", "max_repeat": 1}'])
def test_a_missing_or_broken_rule_defers_every_call_and_says_why(server, content, caplog):
    caplog.set_level(logging.INFO, logger="conch.acceptance")
    folder = domain_dir(server.home, "task") / "v0001"
    (folder / ACCEPTANCE_FILE).unlink(missing_ok=True)
    if content is not None:
        (folder / ACCEPTANCE_FILE).write_text(content)
    assert read_acceptance(folder) is None
    assert ("no acceptance rule" if content is None else "cannot be read") in caplog.text
    server.api.cascade.deferral._rules.clear()
    assert ask(server, max_tokens=8).headers["x-conch-answered-by"] == "ego"


def test_a_promoted_retrain_writes_the_rule_it_was_fitted_to(tmp_path):
    from conch_dna.traces.ingest import ingest_file

    from tests.conftest import retrain
    from tests.test_daemon import drop, teacher_traces, write_config

    home = tmp_path / "home"
    write_config(home, domains=["debug"], min_heldout=2)
    drop(home, "d.jsonl", teacher_traces("debug", 32, seed=7))
    store = TraceStore.for_home(home, load_config(home))
    ingest_file(store, home / "inbox" / "d.jsonl")
    result = retrain(home, "debug", force=True)
    assert result.version, result.reason
    rule = read_acceptance(domain_dir(home, "debug") / result.version)
    assert rule is not None and rule["answers"] == store.counts("debug").heldout
    assert rule == {**result.candidate_metrics["acceptance"], "threshold": rule["threshold"]}
    assert "answer_scores" not in result.candidate_metrics  # fitted on, not kept in the run's row
    assert rule["curve"] and rule["curve"][-1][1] <= 1.0 and len(rule["curve"]) <= 64

    from conch_dna.cli.main import app

    from typer.testing import CliRunner

    for outcome, seconds, agreed in (("served", 0, None), ("deferred", 3, True), ("deferred", 4, False),
                                     ("unverified", 0, None)):
        store.count_auto_answer("debug", result.version, outcome, teacher_seconds=seconds, agreed=agreed)
    shown = CliRunner().invoke(app, ["kd", "status", "--json"], env={"CONCH_HOME": str(home)})
    auto = next(d for d in json.loads(shown.output)["domains"] if d["domain"] == "debug")["auto"]
    assert (auto["calls"], auto["served"], auto["deferred"], auto["unverified"]) == (4, 1, 2, 1)
    assert auto["share_served"] == 0.25 and auto["expected_share"] == rule["expected_share"]
    assert auto["would_have_been_right"] == 0.5 and auto["teacher_seconds_saved"] == pytest.approx(3.5)
    from conch_dna.cli.common import console

    width, console.width = console._width, 400  # the console was made at import, in whichever test came first
    try:
        table = CliRunner().invoke(app, ["kd", "status"], env={"CONCH_HOME": str(home)}).output
        history = CliRunner().invoke(app, ["kd", "history", "--domain", "debug"], env={"CONCH_HOME": str(home)}).output
    finally:
        console._width = width
    assert f"1 of 4 (25%; expected {rule['expected_share']:.0%})" in table
    assert "saved about 4 s of teacher time" in table and "where the student had 50% right" in table
    assert f"1 of 4 (25%; expected {rule['expected_share']:.0%})" in history
    store.close()


def hanging_listener():
    """A socket that takes connections and never answers: a teacher that hangs."""
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    return listener


@pytest.fixture(scope="module")
def teacherless(tmp_path_factory):
    """auto/task on a home whose teacher cannot load, its v0001 sure of nothing (every call deferred)."""
    home = make_home(tmp_path_factory.mktemp("teacherless"))
    (home / "config.toml").write_text(f'teacher = "{home / "no-such-teacher"}"\n' + (home / "config.toml").read_text())
    promote_quiet_version(home)
    write_acceptance(domain_dir(home, "task") / "v0001", {"threshold": 0.0, "max_repeat": 1.0})
    server = Server(home, port=0).start()
    yield server
    server.stop()


def test_a_teacher_that_cannot_answer_leaves_the_students_answer_marked_unverified_or_a_502(teacherless):
    cascade = teacherless.api.cascade
    text, _, _ = own_signal(teacherless.home, CHAT)
    served = ask(teacherless)
    assert served.status_code == 200, served.text
    assert served.headers["x-conch-answered-by"] == "task@v0001" and served.headers["x-conch-deferred"] == "false"
    assert "no-such-teacher" in served.headers["x-conch-unverified"]
    assert served.json()["choices"][0]["message"]["content"] == text
    assert httpx.get(f"{teacherless.url}/stats").json()["auto"]["task"]["v0001"]["unverified"] >= 1
    original = cascade.config
    cascade.config = original.model_copy(update={"auto_unverified": "refuse"})
    try:
        refused = ask(teacherless)
    finally:
        cascade.config = original
    assert refused.status_code == 502 and "no-such-teacher" in refused.json()["error"]["message"]


def test_a_teacher_that_hangs_is_given_up_on_after_its_timeout(tmp_path):
    listener = hanging_listener()
    home = make_home(tmp_path)
    port = listener.getsockname()[1]
    (home / "config.toml").write_text("auto_teacher_timeout_s = 1\n" + (home / "config.toml").read_text()
                                      + f'\n[ego]\nupstream_url = "http://127.0.0.1:{port}/v1"\n')
    promote_quiet_version(home)
    write_acceptance(domain_dir(home, "task") / "v0001", {"threshold": 0.0, "max_repeat": 1.0})
    server = Server(home, port=0).start()
    try:
        answer = ask(server, max_tokens=8)  # the upstream's own timeout is 600 s: the call's 120 s would fail first
        assert answer.status_code == 200 and "auto_teacher_timeout_s = 1" in answer.headers["x-conch-unverified"]
    finally:
        server.stop()
        listener.close()


def test_a_deferred_answer_is_compared_with_the_students_by_its_calls_or_its_words():
    from types import SimpleNamespace

    from conch_dna.server.cascade import agrees

    from starlette.responses import JSONResponse, StreamingResponse

    def teacher(content=None, calls=None):
        return JSONResponse({"choices": [{"message": {"content": content, "tool_calls": calls}}]})

    def student(calls=()):
        return SimpleNamespace(parsed=lambda: SimpleNamespace(tool_calls=list(calls)))

    def call(name, arguments):
        return {"function": {"name": name, "arguments": arguments}}

    assert agrees(student(), "Send it\n now.", teacher("Send it now."))
    assert not agrees(student(), "Send it later.", teacher("Send it now."))
    same = [call("read", '{"path": "a", "n": 1}')]
    assert agrees(student([call("read", '{"n":1,"path":"a"}')]), "", teacher(None, same))
    assert not agrees(student([call("read", '{"path": "b", "n": 1}')]), "", teacher(None, same))
    assert not agrees(student(), "read a", teacher(None, same))
    assert agrees(student(), "x", StreamingResponse(iter([]))) is None


def test_in_python_defer_auto_answers_with_the_student_or_the_recorded_ego(tmp_path):
    from neurons import NeuronRegistry
    from neurons.deferral import TeacherUnavailable

    home = make_home(tmp_path)
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\n' + (home / "config.toml").read_text())
    promote_quiet_version(home)
    text, signal, _ = own_signal(home, CHAT)
    folder = domain_dir(home, "task") / "v0001"
    registry = NeuronRegistry(home, watch=False)
    store = TraceStore.for_home(home, load_config(home))
    try:
        plain = registry.get("task").generate(CHAT, max_tokens=64)
        assert plain == text and plain.answered_by == "task@v0001" and not plain.deferred
        write_acceptance(folder, {"threshold": signal - 0.01, "max_repeat": 1.0})
        sure = registry.get("task").generate(CHAT, max_tokens=64, defer="auto")
        assert sure == text and sure.answered_by == "task@v0001" and not sure.deferred
        assert sure.signal == pytest.approx(signal, abs=2e-3)
        write_acceptance(folder, {"threshold": signal + 0.01, "max_repeat": 1.0})
        registry.deferral._rules.clear()
        before = store.counts("task").total
        unsure = registry.get("task").generate(CHAT, max_tokens=32, defer="auto")
        assert unsure.answered_by == "ego" and unsure.deferred and unsure != text
        assert store.counts("task").total == before + 1  # recorded before it returned
        (row,) = store.auto_answers("task")
        assert (row["served"], row["deferred"], row["compared"], row["agreed"]) == (1, 1, 1, 0)
        registry.deferral.ego().teacher_model_id = str(tmp_path / "no-such-teacher")
        registry.deferral.ego().model = None
        unverified = registry.get("task").generate(CHAT, max_tokens=64, defer="auto")
        assert unverified == text and "no-such-teacher" in unverified.unverified
        registry.deferral.config = registry.config.model_copy(update={"auto_unverified": "refuse"})
        with pytest.raises(TeacherUnavailable, match="no-such-teacher"):
            registry.get("task").generate(CHAT, max_tokens=64, defer="auto")
        with pytest.raises(ValueError, match="defer"):
            registry.get("task").generate(CHAT, defer="always")
    finally:
        store.close()
        registry.close()


def test_an_answer_cut_by_its_budget_is_refused_only_where_the_teachers_answers_end():
    from conch_dna.lifecycle.acceptance import accepts

    cut = {"confidence": -0.5, "kl": 0.2, "repeated_4grams": 0.05, "ended": False}
    looping_cut = {**cut, "repeated_4grams": 0.9}
    scores = [cut, looping_cut, {**cut, "ended": True}]
    ending = fit_acceptance(scores, Config(), teacher_ended=0.9)
    assert ending["require_end"] and ending["expected_share"] == pytest.approx(1 / 3) and not accepts(ending, cut)
    cut_too = fit_acceptance(scores, Config(), teacher_ended=0.1)
    assert not cut_too["require_end"] and cut_too["expected_share"] == pytest.approx(2 / 3)
    assert accepts(cut_too, cut) and not accepts(cut_too, looping_cut)  # the loop check stays
    assert fit_acceptance(scores, Config())["require_end"]  # unknown: asked
