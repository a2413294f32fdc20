"""Remote agents feed one trainer: `POST /v1/traces` on `conch serve`, from another process, goes through
the inbox's ingest: every line is stored, a duplicate, or quarantined with its reason."""

import json
import os
import subprocess
import sys
from pathlib import Path

from conch_dna.kit import STUDENT_PATH
from conch_dna.server.app import ServeError, Server
from conch_dna.settings.config import load_config
from conch_dna.traces.store import TraceStore

import pytest

ROOT = Path(__file__).resolve().parents[1]

POSTER = r"""
import json, sys, httpx
url, n = sys.argv[1], int(sys.argv[2])
lines = []
for i in range(n):
    chat = [{"role": "user", "content": f"Plan step {i % 700}."}, {"role": "assistant", "content": f"Do {i % 700}."}]
    kind = i % 10
    if kind == 7:
        lines.append('{"domain": "task", "messages": [')                       # cut JSON
    elif kind == 8:
        lines.append(json.dumps({"domain": "../etc", "teacher": "t", "messages": chat}))
    elif kind == 9:
        lines.append(json.dumps({"domain": "action", "teacher": "t", "tools": [], "messages": chat}))
    else:
        lines.append(json.dumps({"domain": "task", "teacher": "t", "messages": chat}))
headers = {"Authorization": "Bearer " + sys.argv[3]} if len(sys.argv) > 3 else {}
headers["content-type"] = "application/x-ndjson"
r = httpx.post(url + "/traces", content=("\n".join(lines) + "\n").encode(), headers=headers, timeout=120)
print(r.status_code)
print(r.text)
"""


def home_with(tmp_path, extra: str = "") -> Path:
    home = tmp_path / "home"
    home.mkdir(parents=True)
    (home / "config.toml").write_text(f'student = "{STUDENT_PATH}"\n[server]\n{extra}')
    return home


def post(url: str, n: int, token: str | None = None) -> tuple[int, dict | str]:
    done = subprocess.run([sys.executable, "-c", POSTER, url, str(n), *([token] if token else [])],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    code, _, body = done.stdout.partition("\n")
    try:
        return int(code), json.loads(body)
    except ValueError:
        return int(code or 0), body + done.stderr


def test_a_thousand_posted_lines_are_each_stored_a_duplicate_or_quarantined_with_why(tmp_path):
    home = home_with(tmp_path)
    server = Server(home, port=0).start()
    try:
        code, report = post(server.url, 1000)
        assert code == 200, report
        assert report["lines"] == 1000 == report["stored"] + report["duplicates"] + report["quarantined"]
        # the reasons of the first 100 refused lines, and how many more there are
        assert report["quarantined"] == 300 and len(report["reasons"]) == 100 and report["reasons_not_shown"] == 200
        assert report["duplicates"] == 700 - len({i % 700 for i in range(1000) if i % 10 < 7})  # repeats
        reasons = report["reasons"]
        assert "bad JSON" in reasons["8"] and "invalid domain name '../etc'" in reasons["9"]
        assert "tools must be a non-empty list" in reasons["10"]
        assert [report["outcomes"][i] for i in (7, 8, 9)] == ["quarantined"] * 3
        store = TraceStore.for_home(home, load_config(home))
        assert store.counts("task").total == report["stored"] and store.quarantine_count() == 300
        again = post(server.url, 1000)[1]
        assert again["stored"] == 0 and again["duplicates"] == 700  # the same lines again: nothing twice
    finally:
        server.stop()


def test_traces_can_be_refused_and_need_the_token_off_loopback(tmp_path, monkeypatch):
    home = home_with(tmp_path, "accept_traces = false\n")
    server = Server(home, port=0).start()
    try:
        code, body = post(server.url, 3)
        assert code == 403 and "accept_traces = false" in json.dumps(body)
    finally:
        server.stop()
    other = home_with(tmp_path / "other")
    with pytest.raises(ServeError, match="without a bearer token"):
        Server(other, host="0.0.0.0", port=0)
    monkeypatch.setenv("CONCH_SERVE_TOKEN", "s3cret")
    server = Server(other, port=0).start()
    try:
        assert post(server.url, 3)[0] == 401
        assert post(server.url, 3, "s3cret")[1]["stored"] == 3
    finally:
        server.stop()
