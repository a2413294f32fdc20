"""`conch serve`: a real uvicorn server on a loopback port, talked to with the official `openai`
client as it is, over real promoted versions of the kit student; the EGO's upstream is a real
`mlx_lm.server` on the kit teacher."""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conch_dna.kit import TEACHER_PATH
from conch_dna.models.chat import encode_chat
from conch_dna.models.loading import load_tokenizer_only, tokenizer_fingerprint
from conch_dna.server.app import ServeError, Server
from conch_dna.system.domains import DOMAINS
from conch_dna.traces.store import TraceStore
from conch_dna.training.targets.teacher import _fit_topk

import httpx
import numpy as np
import openai
import pytest
from test_batching import promote_random_versions
from test_neurons import make_home

ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "user", "content": "Plan how to send the email."}]


def wait_until(condition, what, timeout=120.0):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_until_serving(proc, url, what):
    """Until `url`/models answers; the process's stderr if it dies first."""

    def up():
        assert proc.poll() is None, proc.stderr.read()
        try:
            return httpx.get(f"{url}/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, what)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Every domain has a promoted version; task has two (v0002 serves)."""
    home = make_home(tmp_path_factory.mktemp("serve"))
    text = (home / "config.toml").read_text()
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\n{text}[server]\nmax_tokens = 1024\n'
                                      f"max_request_kb = 4\n")
    promote_random_versions(home, {"task": 2, **{d: 1 for d in DOMAINS if d != "task"}})
    server = Server(home, port=0).start()
    yield server
    server.stop()


def client(server, **kwargs):
    return openai.OpenAI(base_url=server.url, api_key=kwargs.pop("api_key", "unused"), max_retries=0, **kwargs)


def test_a_chat_with_a_neuron_answers_as_the_registry_does_streamed_or_not(server):
    expected = server.registry.get("debug").generate(CHAT, max_tokens=12)
    answer = client(server).chat.completions.create(model="debug", messages=CHAT, max_tokens=12)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason == "length" and answer.model == "debug"
    assert answer.system_fingerprint == "debug@v0001"
    assert answer.usage.completion_tokens == 12 and answer.usage.prompt_tokens > 5
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + 12

    stream = client(server).chat.completions.create(model="debug", messages=CHAT, max_tokens=12, stream=True,
                                                    stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # it did stream


def test_stop_and_sampling_reach_the_neuron(server):
    text = server.registry.get("action").generate(CHAT, max_tokens=20)
    stop = text[3:6]
    answer = client(server).chat.completions.create(model="action", messages=CHAT, max_tokens=20, stop=[stop])
    assert answer.choices[0].message.content == text[: text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"
    sampled = {client(server).chat.completions.create(model="action", messages=CHAT, max_tokens=8,
                                                      temperature=1.5).choices[0].message.content
               for _ in range(4)}
    assert len(sampled) > 1


def test_a_pinned_version_answers_as_that_version(server):
    with server.registry.pinned("task", version="v0001") as old:
        expected_old = old.generate(CHAT, max_tokens=10)
    expected_new = server.registry.get("task").generate(CHAT, max_tokens=10)
    assert expected_old != expected_new
    raw = client(server).chat.completions.with_raw_response.create(model="task@v0001", messages=CHAT, max_tokens=10)
    answer = raw.parse()
    assert answer.choices[0].message.content == expected_old
    assert raw.headers["x-conch-version"] == "v0001" and answer.system_fingerprint == "task@v0001"
    assert raw.headers["x-conch-answered-by"] == "task@v0001"  # who wrote it, on every answer
    newest = client(server).chat.completions.create(model="task", messages=CHAT, max_tokens=10)
    assert newest.choices[0].message.content == expected_new and newest.system_fingerprint == "task@v0002"


def test_logprobs_are_the_models_own_with_the_alternatives_asked_for(server):
    answer = client(server).chat.completions.create(model="memory", messages=CHAT, max_tokens=8, logprobs=True,
                                                    top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == 8 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for t in content:  # greedy: the token is the best alternative, and the alternatives are ordered
        assert t.logprob == pytest.approx(t.top_logprobs[0].logprob) and t.token == t.top_logprobs[0].token
        assert [a.logprob for a in t.top_logprobs] == sorted((a.logprob for a in t.top_logprobs), reverse=True)
        assert t.logprob <= 0 and bytes(t.bytes).decode() == t.token
    plain = client(server).chat.completions.create(model="memory", messages=CHAT, max_tokens=8)
    assert plain.choices[0].logprobs is None
    streamed = client(server).chat.completions.create(model="memory", messages=CHAT, max_tokens=8, logprobs=True,
                                                      stream=True)
    tokens = [t for c in streamed if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in tokens] == [t.token for t in content] and all(t.top_logprobs == [] for t in tokens)


def test_models_lists_each_domain_its_serving_version_the_kept_ones_and_the_ego(server):
    models = {m.id: m for m in client(server).models.list()}
    assert {*DOMAINS, "task@v0001", "task@v0002", *(f"ego/{d}" for d in DOMAINS)} <= set(models)
    assert models["task"].model_extra["serving_version"] == "v0002"
    assert models["thinking"].model_extra["serving_version"] == "v0001"
    assert client(server).models.retrieve("task@v0001").id == "task@v0001"


def test_an_unknown_model_is_a_404_that_names_the_known_ones(server):
    with pytest.raises(openai.NotFoundError) as err:
        client(server).chat.completions.create(model="dreaming", messages=CHAT)
    assert err.value.status_code == 404 and err.value.code == "model_not_found"
    assert "thinking, task, action, reflection, debug, memory" in err.value.message
    with pytest.raises(openai.NotFoundError, match="task has no version 'v0009'.*kept: v0001, v0002"):
        client(server).chat.completions.create(model="task@v0009", messages=CHAT)
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("task@v0009")


@pytest.mark.parametrize("body,words", [
    (b'{"model": "task", "messages": [', "not valid JSON"),
    (b'["task"]', "must be a JSON object"),
    (b'{"model": "task"}', "messages: Field required"),
    (b'{"model": "task", "messages": []}', "messages"),
    (b'{"model": "task", "messages": [{"role": "wizard", "content": "x"}]}', "messages.0.role"),
    (b'{"model": "task", "messages": [{"role": "user", "content": "x"}], "temperature": 9}', "temperature"),
    (b'{"model": "task", "messages": [{"role": "user", "content": "x"}], "n": 2}', "n:"),
    (b'{"model": "task", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1025}',
     "max_tokens 1025 is over this server's limit of 1024"),
    (b'{"model": "task", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}',
     "top_logprobs needs logprobs"),
])
def test_a_malformed_body_is_a_400_in_openais_shape(server, body, words):
    response = httpx.post(f"{server.url}/chat/completions", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error"


def test_the_request_size_limit_and_unknown_paths(server):
    big = json.dumps({"model": "task", "messages": [{"role": "user", "content": "x" * 5000}]})
    response = httpx.post(f"{server.url}/chat/completions", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    with pytest.raises(openai.APIStatusError, match="over this server's limit of 4096 bytes") as err:
        client(server).chat.completions.create(model="task", messages=[{"role": "user", "content": "x" * 5000}])
    assert err.value.status_code == 413
    missing = httpx.get(f"{server.url}/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()


def test_a_caller_that_leaves_a_stream_frees_its_row(server):
    before = server.registry.stats()
    with httpx.stream("POST", f"{server.url}/chat/completions",
                      json={"model": "reflection", "messages": CHAT, "max_tokens": 1024, "stream": True,
                            "temperature": 2.0}) as response:  # sampled flat: no end of sequence soon
        for line in response.iter_lines():  # until the answer's first text: it is decoding, not done
            if line.startswith("data:") and '"content": ""' not in line and '"content": "' in line:
                assert '"finish_reason": null' in line
                break
    wait_until(lambda: server.registry.stats()["calls_cancelled"] == before["calls_cancelled"] + 1,
               "the call to be cancelled")
    assert server.registry.stats()["running"] == 0
    assert server.registry.stats()["tokens_generated"] - before["tokens_generated"] < 1024


def test_message_contents_are_never_logged_at_info(server, caplog):
    secret = "the-password-is-swordfish"
    with caplog.at_level(logging.INFO):
        client(server).chat.completions.create(model="task", messages=[{"role": "user", "content": secret}],
                                               max_tokens=3)
        list(client(server).chat.completions.create(model="task", messages=[{"role": "user", "content": secret}],
                                                    max_tokens=3, stream=True))
    assert any("conch.serve" == r.name for r in caplog.records)
    assert secret not in caplog.text


def test_a_hot_swap_during_streams_drops_nothing_and_each_stream_ends_on_its_version(tmp_path):
    from conch_dna.models.versions import current_version

    home = make_home(tmp_path)
    promote_random_versions(home, {"action": 1})
    server = Server(home, port=0).start()
    try:
        with server.registry.pinned("action") as v1:
            expected = v1.generate(CHAT, max_tokens=40)
        results, first_chunk = [], threading.Barrier(5)

        def stream_one():
            stream = client(server).chat.completions.create(model="action", messages=CHAT, max_tokens=40, stream=True)
            chunks = []
            for c in stream:
                chunks.append(c)
                if len(chunks) == 2:
                    first_chunk.wait(timeout=60)
            results.append(chunks)

        threads = [threading.Thread(target=stream_one) for _ in range(4)]
        for t in threads:
            t.start()
        first_chunk.wait(timeout=60)  # every stream has begun on v0001
        promote_from_another_process(home, "action", seed=12)
        wait_until(lambda: server.registry.next_version("action") == "v0002", "the swap")
        for t in threads:
            t.join(timeout=120)
        assert current_version(home, "action") == "v0002" and len(results) == 4
        for chunks in results:
            assert {c.system_fingerprint for c in chunks} == {"action@v0001"}
            assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
            assert chunks[-1].choices[0].finish_reason == "length"
        after = client(server).chat.completions.create(model="action", messages=CHAT, max_tokens=4)
        assert after.system_fingerprint == "action@v0002"
    finally:
        server.stop()


def promote_from_another_process(home, domain, seed):
    """One more random version of `domain`, promoted by another process (as a retrain does)."""
    code = ("import sys; from pathlib import Path; sys.path.insert(0, 'tests'); import test_batching as tb; "
            f"tb.promote_random_versions(Path(sys.argv[1]), {{{domain!r}: 1}}, seed={seed})")
    subprocess.run([sys.executable, "-c", code, str(home)], cwd=ROOT, check=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_a_public_host_needs_a_bearer_token_and_then_every_request_carries_it(tmp_path, monkeypatch):
    home = make_home(tmp_path)
    monkeypatch.delenv("CONCH_SERVE_TOKEN", raising=False)
    with pytest.raises(ServeError, match=r"0.0.0.0, which is not loopback, without a bearer token.*CONCH_SERVE_TOKEN"):
        Server(home, host="0.0.0.0", port=0)
    monkeypatch.setenv("CONCH_SERVE_TOKEN", "s3cret-token")
    server = Server(home, port=0).start()
    try:
        with pytest.raises(openai.AuthenticationError) as err:
            client(server, api_key="wrong").models.list()
        assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
        assert httpx.get(f"{server.url}/models").status_code == 401
        assert "task" in {m.id for m in client(server, api_key="s3cret-token").models.list()}
    finally:
        server.stop()


# -- the EGO ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def upstream():
    """mlx_lm.server on the kit teacher, on loopback."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", TEACHER_PATH, "--host",
                             "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    wait_until_serving(proc, url, "mlx_lm.server")
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def ego_home(tmp_path, upstream_url):
    home = make_home(tmp_path)
    text = (home / "config.toml").read_text()
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\n{text}[ego]\nupstream_url = "{upstream_url}"\n'
                                      f'aliases = {{"gpt-4o-mini" = "debug"}}\n')
    return home


def stored(home, domain):
    """(messages, topk or None, teacher) of each trace of the domain, as the store keeps them."""
    from conch_dna.settings.config import load_config

    rows = TraceStore.for_home(home, load_config(home)).db.conn.execute(
        "SELECT messages, topk_ids, topk_logprobs, topk_k, teacher FROM traces WHERE domain = ?", [domain])
    return [(json.loads(messages), ids and {"token_ids": np.frombuffer(ids, np.int32).reshape(-1, k).tolist(),
                                            "logprobs": np.frombuffer(lps, np.float16).reshape(-1, k).tolist()},
             teacher) for messages, ids, lps, k, teacher in rows]


def test_the_ego_through_an_upstream_answers_as_the_upstream_and_records_the_trace_with_its_top_k(tmp_path, upstream):
    home = ego_home(tmp_path, upstream)
    server = Server(home, port=0).start()
    try:
        direct = httpx.post(f"{upstream}/chat/completions", timeout=120,
                            json={"model": TEACHER_PATH, "messages": CHAT, "max_tokens": 8, "logprobs": True,
                                  "top_logprobs": 5}).json()
        answer = client(server).chat.completions.create(model="ego/task", messages=CHAT, max_tokens=8)
        text = answer.choices[0].message.content
        assert text == direct["choices"][0]["message"]["content"] and answer.model == "ego/task"
        assert answer.choices[0].logprobs is None  # it did not ask for them
        wait_until(lambda: stored(home, "task"), "the trace")
        [(messages, topk, teacher)] = stored(home, "task")
        assert messages == [*CHAT, {"role": "assistant", "content": text}] and teacher == TEACHER_PATH
        # row i: the upstream's alternatives for token i, its strings mapped back to the ids it used
        positions = [p["top_logprobs"] for p in direct["choices"][0]["logprobs"]["content"]]
        assert len(topk["token_ids"]) == len(positions) and len(topk["token_ids"][0]) == 10
        for row_ids, row_lps, alternatives in zip(topk["token_ids"], topk["logprobs"], positions):
            best = sorted(alternatives, key=lambda e: -e["logprob"])
            assert row_ids[:5] == [e["id"] for e in best]
            assert row_lps[:5] == pytest.approx([e["logprob"] for e in best], rel=2e-3, abs=2e-3)  # float16
        # and a retrain uses it as it is (no teacher pass), the answer's tokens being the ones generated
        tokenizer = load_tokenizer_only(TEACHER_PATH)
        tokens, offset = encode_chat(tokenizer, messages)
        assert _fit_topk({**topk, "tokenizer": tokenizer_fingerprint(tokenizer)}, tokenizer_fingerprint(tokenizer),
                         tokens[offset:], 10) is not None
        # an alias, streamed: the upstream's stream carries no logprobs, so the trace has no top-k
        streamed = client(server).chat.completions.create(model="gpt-4o-mini", messages=CHAT, max_tokens=8,
                                                          stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text
        wait_until(lambda: stored(home, "debug"), "the streamed trace")
        [(messages, topk, _)] = stored(home, "debug")
        assert topk is None and messages[-1]["content"] == text
    finally:
        server.stop()


def test_an_upstream_that_cannot_be_reached_is_a_502(tmp_path):
    server = Server(ego_home(tmp_path, f"http://127.0.0.1:{free_port()}/v1"), port=0).start()
    try:
        with pytest.raises(openai.APIStatusError) as err:
            client(server).chat.completions.create(model="ego/task", messages=CHAT, max_tokens=4)
        assert err.value.status_code == 502 and err.value.type == "upstream_error"
        assert "could not be reached" in err.value.message
    finally:
        server.stop()


def test_the_ego_in_process_answers_greedily_and_records_the_trace(tmp_path):
    from conch_dna.traces.ego import Ego

    home = make_home(tmp_path)
    text = (home / "config.toml").read_text()
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\n{text}')
    server = Server(home, port=0).start()
    try:
        answer = client(server).chat.completions.create(model="ego/memory", messages=CHAT, max_tokens=12)
        wait_until(lambda: stored(home, "memory"), "the trace")
        [(messages, topk, teacher)] = stored(home, "memory")
        assert messages[-1]["content"] == answer.choices[0].message.content
        assert teacher == TEACHER_PATH and len(topk["token_ids"]) == answer.usage.completion_tokens
    finally:
        server.stop()
    ego = Ego(home=home)
    try:
        assert ego.answer(CHAT, max_tokens=12).text == answer.choices[0].message.content
    finally:
        ego.close()


def test_the_daemon_serves_the_api_when_the_config_says_serve(tmp_path):
    home = make_home(tmp_path)
    port = free_port()
    text = (home / "config.toml").read_text()
    (home / "config.toml").write_text(f"serve = true\ncheck_minutes = 600\n{text}[server]\nport = {port}\n")
    proc = subprocess.Popen([sys.executable, "-m", "conch_dna.cli", "daemon", "run"], cwd=ROOT, text=True,
                            env={**os.environ, "CONCH_HOME": str(home), "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until_serving(proc, f"http://127.0.0.1:{port}/v1", "the daemon's API")
        answer = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0).chat \
            .completions.create(model="thinking", messages=CHAT, max_tokens=3)
        assert answer.usage.completion_tokens == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"the OpenAI API on http://127.0.0.1:{port}/v1" in out
