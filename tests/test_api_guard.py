"""Safe to leave running: a web page cannot write training data or spend the teacher, a flood cannot grow the
home without bound, slow clients cannot stop the API or the daemon's inbox (each case tried as an attacker
would, against a real server)."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH
from conch_dna.server.app import Server
from conch_dna.server.guard import host_name
from conch_dna.settings.config import load_config
from conch_dna.traces.ingest import ingest_bytes
from conch_dna.traces.store import TraceStore

import httpx

ROOT = Path(__file__).resolve().parents[1]
GOOD = json.dumps({"domain": "task", "teacher": "t", "messages": [{"role": "user", "content": "Plan a day."},
                                                                   {"role": "assistant", "content": "1. Wake."}]})
NDJSON = {"content-type": "application/x-ndjson"}


def home_with(tmp_path, server: str = "", top: str = "") -> Path:
    home = tmp_path / "home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(f'teacher = "{TEACHER_PATH}"\nstudent = "{STUDENT_PATH}"\n{top}'
                                      f"[server]\n{server}")
    return home


def traces_in(home) -> int:
    store = TraceStore.for_home(home, load_config(home))
    return sum(store.counts(d).total for d in store.domains)


def test_host_names_lose_their_port():
    assert [host_name(h) for h in ("127.0.0.1:8321", "[::1]:80", "LOCALHOST", "evil.example:8321", "::1")] == \
        ["127.0.0.1", "::1", "localhost", "evil.example", "::1"]


def test_a_web_page_cannot_write_traces_or_spend_the_teacher_and_a_rebound_name_reads_nothing(tmp_path):
    home = home_with(tmp_path)
    server = Server(home, port=0).start()
    url, chat = server.url, {"model": "ego/task", "messages": [{"role": "user", "content": "Plan a day."}],
                             "max_tokens": 4}
    try:
        # a page's cross-site "simple" POST: text/plain needs no preflight, and the browser adds its Origin
        page = {"content-type": "text/plain", "origin": "https://evil.example", "sec-fetch-site": "cross-site"}
        r = httpx.post(f"{url}/traces", content=GOOD + "\n", headers=page)
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_refused"
        r = httpx.post(f"{url}/chat/completions", content=json.dumps(chat), headers=page)
        assert r.status_code == 403
        # each check on its own: the Origin, the fetch metadata, the content type a page can send unasked
        assert httpx.post(f"{url}/traces", content=GOOD, headers={**NDJSON, "origin": "null"}).status_code == 403
        assert httpx.post(f"{url}/traces", content=GOOD, headers={**NDJSON, "sec-fetch-site": "cross-site"}) \
            .status_code == 403
        r = httpx.post(f"{url}/traces", content=GOOD, headers={"content-type": "text/plain"})
        assert r.status_code == 415 and "application/x-ndjson" in r.json()["error"]["message"]
        assert httpx.post(f"{url}/chat/completions", content=json.dumps(chat),
                          headers={"content-type": "application/x-www-form-urlencoded"}).status_code == 415
        # the preflight that a JSON type forces is never granted
        preflight = httpx.options(f"{url}/traces", headers={"origin": "https://evil.example",
                                                            "access-control-request-method": "POST"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
        # DNS rebinding: the page's own name, now pointing at 127.0.0.1
        r = httpx.get(f"{url}/models", headers={"host": f"evil.example:{server.port}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_refused"
        assert traces_in(home) == 0  # nothing of the page's was stored, and the teacher was never asked
        # the user's own programs: no Origin, this machine's name, a JSON type
        assert httpx.get(f"{url}/models", headers={"host": f"localhost:{server.port}"}).status_code == 200
        r = httpx.post(f"{url}/traces", content=GOOD + "\n", headers=NDJSON)
        assert r.status_code == 200 and r.json()["stored"] == 1
    finally:
        server.stop()


def test_an_allowed_origin_and_host_are_answered(tmp_path):
    home = home_with(tmp_path, 'allowed_origins = ["http://localhost:3000"]\nallowed_hosts = ["conch.internal"]\n')
    server = Server(home, port=0).start()
    try:
        ok = {**NDJSON, "origin": "http://localhost:3000", "host": f"conch.internal:{server.port}"}
        assert httpx.post(f"{server.url}/traces", content=GOOD, headers=ok).status_code == 200
        assert httpx.post(f"{server.url}/traces", content=GOOD,
                          headers={**ok, "origin": "http://localhost:3001"}).status_code == 403
    finally:
        server.stop()


def test_a_flood_of_blank_or_alike_lines_is_one_row_and_the_quarantine_has_a_size_bound(tmp_path):
    store = TraceStore(tmp_path / "conch.db", max_quarantine_mb=0.05)
    report = ingest_bytes(store, b"\n" * 300_000 + b" \r\n" * 1000 + GOOD.encode() + b"\n" + b"\n" * 5, "flood")
    assert report.lines == 301_006 and report.quarantined == 301_005 and report.stored == 1
    rows = store.quarantined(10)
    assert len(rows) == 2  # the run before the good line, and the one after it
    assert rows[1]["line"] == 1 and "lines 1-301000: 301000 alike, kept once" in rows[1]["reason"]
    assert "lines 301002-301006: 5 alike" in rows[0]["reason"]
    assert len(report.outcomes) == 301_006  # every line still has its outcome
    # lines that differ: each kept, until the bound forgets the oldest first
    bad = b"".join(b'{"domain": "task", "messages": [%d\n' % i for i in range(3000))
    ingest_bytes(store, bad, "distinct")
    kept = store.quarantined(100_000)
    assert store.quarantine_bytes() <= 0.05 * 2**20 < 3000 * 40
    assert kept[0]["raw"].startswith('{"domain": "task", "messages": [2999')  # the newest stay
    assert not any(r["source"] == "flood" for r in kept)


def test_posted_traces_are_bounded_in_lines_rate_and_free_disk(tmp_path):
    home = home_with(tmp_path, "max_trace_lines = 50\ntraces_mb_per_hour = 0.004\n")
    server = Server(home, port=0).start()
    try:
        r = httpx.post(f"{server.url}/traces", content=b"\n" * 51, headers=NDJSON)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_lines"
        assert TraceStore.for_home(home, load_config(home)).quarantine_count() == 0  # refused whole, unread
        assert httpx.post(f"{server.url}/traces", content=GOOD + "\n", headers=NDJSON).status_code == 200
        r = httpx.post(f"{server.url}/traces", content=(GOOD + "\n") * 40, headers=NDJSON)  # 5 KB more: over 4 KB/h
        assert r.status_code == 429 and int(r.headers["retry-after"]) > 0
    finally:
        server.stop()
    # a flood of blank lines, as many as a request may carry: one summary row, and the home barely grows
    flood_home = home_with(tmp_path / "flood")
    server = Server(flood_home, port=0).start()
    try:
        before = sum(f.stat().st_size for f in flood_home.rglob("*") if f.is_file())
        r = httpx.post(f"{server.url}/traces", content=b"\n" * 20_000, headers=NDJSON, timeout=120)
        assert r.status_code == 200 and r.json()["quarantined"] == 20_000 and len(r.content) < 400_000
        store = TraceStore.for_home(flood_home, load_config(flood_home))
        assert store.quarantine_count() == 1 and "20000 alike, kept once" in store.quarantined(1)[0]["reason"]
        assert sum(f.stat().st_size for f in flood_home.rglob("*") if f.is_file()) - before < 2 * 2**20
    finally:
        server.stop()
    home2 = home_with(tmp_path / "full", "min_free_disk_mb = 1000000000\n")
    server = Server(home2, port=0).start()
    try:
        r = httpx.post(f"{server.url}/traces", content=GOOD + "\n", headers=NDJSON)
        assert r.status_code == 507 and "min_free_disk_mb" in r.json()["error"]["message"]
    finally:
        server.stop()


def test_a_slow_body_is_cut_off_and_a_client_that_sends_no_headers_is_closed(tmp_path):
    home = home_with(tmp_path, "body_timeout_s = 1\nheader_timeout_s = 1\n")
    server = Server(home, port=0).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /v1/traces HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/x-ndjson\r\n"
                      b"Content-Length: 100\r\n\r\nabc")
            s.settimeout(30)
            answer = b""
            while chunk := s.recv(4096):  # the answer, then the server closes the connection
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout_s" in answer
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n")  # and never the blank line
            s.settimeout(30)
            assert s.recv(4096) == b""  # closed by the server
        assert server.connections.timed_out >= 1
    finally:
        server.stop()


class SlowClients:
    """`n` connections that each send one more header line every `every_s` seconds, and open again when the
    server closes them: the slow-loris of the issue."""

    def __init__(self, port: int, n: int, every_s: float = 1.0):
        self.port, self.n, self.every_s, self.stop, self.opened = port, n, every_s, threading.Event(), 0
        self.socks: list[socket.socket | None] = [None] * n
        self.thread = threading.Thread(target=self.run, daemon=True)

    def open(self, i: int) -> None:
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", self.port))
        self.socks[i], self.opened = s, self.opened + 1

    def run(self) -> None:
        for i in range(self.n):
            self.open(i)
        time.sleep(0.5)
        while not self.stop.is_set():
            for i, s in enumerate(self.socks):
                try:
                    s.send(b"GET /v1/models HTTP/1.1\r\n" if self.stop.is_set() else b"X-Slow: 1\r\n")
                except OSError:  # closed by the server, or not connected yet: try again
                    s.close()
                    self.open(i)
            self.stop.wait(self.every_s)

    def __enter__(self):
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # mlx_lm's import left the soft limit at 2048
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        self.thread.start()
        deadline = time.monotonic() + 60
        while self.opened < self.n:
            assert self.thread.is_alive() and time.monotonic() < deadline, f"{self.opened} of {self.n} clients opened"
            time.sleep(0.1)
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)
        for s in self.socks:
            if s is not None:
                s.close()


def test_two_thousand_slow_clients_stop_neither_the_api_nor_the_daemons_inbox(tmp_path):
    home = home_with(tmp_path, top="serve = true\ncheck_minutes = 600\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with (home / "config.toml").open("a") as f:
        f.write(f"port = {port}\n")

    def tight_fd_limit():  # a soft limit as a launchd agent has it (mlx_lm's import raises it to 2048, its hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 4096))  # limit must allow 4096)

    daemon = subprocess.Popen([sys.executable, "-m", "conch_dna.cli", "daemon", "run"], cwd=ROOT, text=True,
                              env={**os.environ, "CONCH_HOME": str(home), "PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=tight_fd_limit)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert daemon.poll() is None and time.monotonic() < deadline, daemon.stderr.read()[-3000:]
            try:
                if httpx.get(f"{url}/models", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        with SlowClients(port, 2100):
            time.sleep(3)  # every slot of the server is now held by a trickling client
            started = time.monotonic()
            r = httpx.get(f"{url}/models", timeout=5)
            assert r.status_code == 200 and time.monotonic() - started < 5
            held = len(os.listdir(f"/proc/{daemon.pid}/fd")) if Path("/proc").is_dir() else 0
            assert held <= 256 + 128  # [server] max_connections, and the daemon's own files
            (home / "inbox" / "good.jsonl").write_text(GOOD + "\n")
            deadline = time.monotonic() + 60
            while traces_in(home) == 0:
                assert time.monotonic() < deadline, "the inbox stored nothing under the flood"
                time.sleep(0.2)
            assert not (home / "inbox" / "corrupt").exists() or not list((home / "inbox" / "corrupt").iterdir())
    finally:
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=60)
    assert daemon.returncode == 0, err[-3000:]
    assert len(err) < 20_000  # the log says what happened a few times, not once per connection


def test_the_small_ones_each_a_400_or_bounded_or_cancelled(tmp_path):
    from conch_dna.server.wire import StreamedCalls

    home = home_with(tmp_path)
    server = Server(home, port=0).start()
    url, json_type = server.url, {"content-type": "application/json"}
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
    try:
        bad_choice = {"model": "action", "messages": [{"role": "user", "content": "Read a."}], "tools": tools,
                      "tool_choice": {"type": "function", "function": "read_file"}}
        r = httpx.post(f"{url}/chat/completions", json=bad_choice)
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        deep = '{"model": "task", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
        r = httpx.post(f"{url}/chat/completions", content=deep, headers=json_type)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"]["message"]
        # a caller that leaves before its (non-streamed) answer is ready: the call is cancelled, not decoded on
        long = {"model": "task", "messages": [{"role": "user", "content": "Plan a long trip."}], "max_tokens": 4000}
        assert httpx.post(f"{url}/chat/completions", json={**long, "max_tokens": 2}).status_code == 200  # loaded
        body = json.dumps(long).encode()
        with socket.create_connection(("127.0.0.1", server.port)) as s:  # the request, then gone at once
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json"
                      b"\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 60
        while server.registry.stats()["calls_served"] + server.registry.stats()["calls_cancelled"] < 2:
            assert time.monotonic() < deadline, str(server.registry.stats())
            time.sleep(0.05)
        assert server.registry.stats()["calls_cancelled"] == 1
    finally:
        server.stop()
    calls = StreamedCalls()
    calls.add([{"index": 0, "id": "c0", "function": {"name": "read_file", "arguments": '{"pa'}}])
    calls.add([{"index": "0", "function": {"arguments": "junk"}}, {"index": 1.5, "function": {"arguments": "x"}},
               {"index": True, "function": {"arguments": "y"}}, {"index": 10**9, "function": {"arguments": "z"}}])
    calls.add([{"index": 0, "function": {"arguments": 'th": "a"}'}}])
    assert calls.calls() == [{"id": "c0", "type": "function",
                              "function": {"name": "read_file", "arguments": '{"path": "a"}'}}]


def test_an_upstream_answer_past_its_cap_is_cut_off_and_not_recorded(tmp_path):
    import uvicorn
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def endless(request):
        async def events():
            for _ in range(100_000):
                chunk = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "t",
                         "choices": [{"index": 0, "delta": {"content": "word " * 20}, "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream")

    upstream = uvicorn.Server(uvicorn.Config(Starlette(routes=[Route("/v1/chat/completions", endless,
                                                                     methods=["POST"])]),
                                             host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=upstream.run, daemon=True)
    thread.start()
    while not upstream.started:
        time.sleep(0.02)
    port = upstream.servers[0].sockets[0].getsockname()[1]
    home = home_with(tmp_path)
    with (home / "config.toml").open("a") as f:
        f.write(f'[ego]\nupstream_url = "http://127.0.0.1:{port}/v1"\nmax_answer_kb = 64\ntop_logprobs = 0\n')
    server = Server(home, port=0).start()
    try:
        body = {"model": "ego/task", "messages": [{"role": "user", "content": "Talk."}], "stream": True}
        with httpx.stream("POST", f"{server.url}/chat/completions", json=body, timeout=60) as r:
            text = "".join(r.iter_text())
        assert "upstream_answer_too_long" in text and "[DONE]" not in text
        assert len(text) < 200 * 1024
        time.sleep(0.5)  # the background task that would record it has run
        assert traces_in(home) == 0
    finally:
        server.stop()
        upstream.should_exit = True
        thread.join(10)
