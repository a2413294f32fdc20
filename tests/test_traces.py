"""Trace validation, the store and ingestion, on real SQLite files."""

import json
import stat
import tempfile
from pathlib import Path

from conch_dna.traces.ingest import ingest_bytes, record
from conch_dna.traces.store import SCHEMA_VERSION, TraceStore
from conch_dna.traces.trace import TraceError, parse_trace_line

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import quarantine_rows


def trace(domain="thinking", prompt="Why does ice float?", answer="Because it is less dense.", **extra):
    return {"domain": domain, "teacher": "tiny-teacher",
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
            **extra}


def line(obj) -> bytes:
    return json.dumps(obj).encode()


@pytest.mark.parametrize("raw,reason", [
    (b'{"domain": "thinking"', "bad JSON"),
    (b"\xff\xfe{}", "not valid UTF-8 (byte 0xff at offset 0)"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (b"   ", "empty line"),
    (line(trace(answer="   ")), "answer (last message) is empty"),
    (line(trace(domain="dreaming")), "unknown domain 'dreaming'"),
    (line(trace(domain="../../etc")), "invalid domain name"),
    (line({**trace(), "messages": [{"role": "wizard", "content": "x"},
                                    {"role": "assistant", "content": "y"}]}), "messages.0.role"),
    (line({**trace(), "messages": [{"role": "user", "content": "x"}]}), "at least a prompt"),
    (line({**trace(), "messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "y"}]}),
     "messages.0.content"),
    (line({**trace(), "colour": "red"}), "colour: Extra inputs are not permitted"),
    (line(trace(topk={"token_ids": [[1, 2]], "logprobs": [[-0.1]], "tokenizer": "ab"})), "topk row 0"),
    (b'{"x": "' + b"a" * (1 << 20) + b'"}', "over the 1048576-byte limit"),
])
def test_bad_lines_get_a_reason_a_person_can_act_on(raw, reason):
    with pytest.raises(TraceError) as err:
        parse_trace_line(raw)
    assert reason in str(err.value)


def test_same_trace_twice_is_stored_once_and_split_is_by_prompt(tmp_path):
    store = TraceStore(tmp_path / "conch.db")
    report = ingest_bytes(store, line(trace()) + b"\n" + line(trace()) + b"\n", "a.jsonl")
    assert report.outcomes == ["stored", "duplicate"]
    again = ingest_bytes(store, line(trace(meta={"run": 2})) + b"\n", "b.jsonl")
    assert again.outcomes == ["duplicate"]
    # the same prompt with another answer is another trace, always on the same side of the split
    prompts = [f"question {i}" for i in range(400)]
    data = b"\n".join(line(trace(prompt=p, answer=a)) for p in prompts for a in ("one", "two"))
    ingest_bytes(store, data, "c.jsonl")
    splits = store.db.conn.execute(
        "SELECT count(DISTINCT split) FROM traces GROUP BY messages->>'$[0].content'").fetchall()
    assert {s for (s,) in splits} == {1}
    counts = store.counts("thinking")
    assert counts.total == 801 and counts.train + counts.heldout == 801
    assert 0.05 < counts.heldout / counts.total < 0.15


def test_state_files_are_private(tmp_path):
    home = tmp_path / "home"
    store = TraceStore(home / "conch.db")
    ingest_bytes(store, line(trace()), "a.jsonl")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    for f in home.iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert store.schema_version() == SCHEMA_VERSION
    assert store.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_new_since_last_training_run(tmp_path):
    store = TraceStore(tmp_path / "conch.db", heldout_fraction=0.0)
    ingest_bytes(store, b"\n".join(line(trace(prompt=f"p{i}")) for i in range(5)), "a")
    assert store.counts("thinking").new_train == 5
    store.mark_trained("thinking", store.max_rowid("thinking"))
    ingest_bytes(store, b"\n".join(line(trace(prompt=f"q{i}")) for i in range(3)), "b")
    assert store.counts("thinking").new_train == 3
    assert store.counts("task").total == 0


def test_record_keeps_good_traces_and_quarantines_bad_ones(conch_home):
    msgs = [{"role": "user", "content": "Plan how to send the email."},
            {"role": "assistant", "content": "1. Write it. 2. Send it."}]
    trace_id = record("task", msgs, teacher="tiny-teacher")
    assert trace_id and record("task", msgs, teacher="tiny-teacher") == trace_id
    assert record("task", msgs[:1], teacher="tiny-teacher") is None
    store = TraceStore(conch_home / "conch.db")
    assert store.counts("task").total == 1
    (bad,) = store.quarantined()
    assert bad["source"] == "record()" and "at least a prompt and the teacher's answer" in bad["reason"]


# -- the property: every line is exactly one of stored / duplicate / quarantined -----------------

valid_traces = st.builds(
    lambda d, p, a: trace(domain=d, prompt=p, answer=a),
    st.sampled_from(["thinking", "task", "action", "memory"]),
    st.text(min_size=1, max_size=30), st.text(min_size=1, max_size=30).filter(lambda s: s.strip()))
json_noise = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                          lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                          max_leaves=8).map(lambda v: json.dumps(v).encode())
raw_bytes = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b""))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.one_of(valid_traces.map(line), json_noise, raw_bytes), max_size=25), st.data())
def test_every_line_is_stored_duplicate_or_quarantined(lines, data):
    if lines:  # repeat some lines so duplicates occur
        lines = lines + data.draw(st.lists(st.sampled_from(lines), max_size=5))
    # the final newline may be left out, unless the last line is empty (then it is no line at all)
    final_newline = bool(lines) and (lines[-1] == b"" or data.draw(st.booleans()))
    payload = b"\n".join(lines) + (b"\n" if final_newline else b"")
    with tempfile.TemporaryDirectory() as tmp:
        store = TraceStore(Path(tmp) / "conch.db")
        report = ingest_bytes(store, payload, "prop.jsonl")
        ingest_bytes(store, payload, "prop.jsonl")  # the same file again changes nothing
        assert report.lines == len(lines)
        valid_ids = []
        for raw, outcome in zip(lines, report.outcomes):
            try:
                valid_ids.append(parse_trace_line(raw.removesuffix(b"\r")).trace_id())
                assert outcome in ("stored", "duplicate")
            except TraceError:
                assert outcome == "quarantined"
        assert report.stored == len(set(valid_ids))
        assert store.db.conn.execute("SELECT count(*) FROM traces").fetchone()[0] == len(set(valid_ids))
        # a run of alike bad lines (blank, or the same bytes) is one row
        assert store.quarantine_count() == quarantine_rows(store, [raw.removesuffix(b"\r") for raw in lines])
        store.close()


def test_a_version_1_database_is_migrated_on_open(tmp_path):
    from conch_dna.traces.store import _create_v1

    import sqlite_utils

    path = tmp_path / "conch.db"
    db = sqlite_utils.Database(path)
    _create_v1(db)
    db.execute("PRAGMA user_version = 1")
    db.conn.commit()
    db.conn.close()
    store = TraceStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 9
    assert {"settings", "set_aside", "auto_answers"} <= set(store.db.table_names())
    assert {"tools", "response_format"} <= set(store.db["traces"].columns_dict)
    assert store.runs() == [] and {"samples_generated", "phase_seconds"} <= set(store.db["runs"].columns_dict)
    path2 = tmp_path / "future.db"
    sqlite_utils.Database(path2).execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="schema version 99"):
        TraceStore(path2)


def test_record_uses_the_homes_configured_domains_and_heldout_fraction(conch_home, monkeypatch):
    from conch_dna.system.domains import is_heldout
    from conch_dna.traces import ingest
    from conch_dna.traces.ingest import record

    monkeypatch.setattr(ingest, "_stores", {})
    conch_home.mkdir(mode=0o700)
    (conch_home / "config.toml").write_text('domains = ["thinking", "legal"]\nheldout_fraction = 0.5\n')
    prompts = [f"Is clause {i} enforceable?" for i in range(40)]
    for p in prompts:
        chat = [{"role": "user", "content": p}, {"role": "assistant", "content": "It depends."}]
        assert record("legal", chat, teacher="t") is not None  # a configured domain is accepted
    store = ingest.home_store()
    held = {t["messages"][0]["content"] for t in store.traces_of("legal", "heldout")}
    assert held == {p for p in prompts if is_heldout(f"user: {p}", 0.5)} and 10 < len(held) < 30


def test_a_version_7_store_keeps_its_traces_as_they_were_and_takes_their_response_format(tmp_path):
    import sqlite_utils

    def every_chat(store):
        return store.chats("thinking") + store.chats("thinking", "heldout")

    path = tmp_path / "conch.db"
    old = TraceStore(path)  # made at the current version, then taken back to 7: the column dropped
    old.add([parse_trace_line(line(trace()))], "old.jsonl")
    before = every_chat(old)
    old.close()
    db = sqlite_utils.Database(path)
    db["traces"].transform(drop={"response_format"})
    db["auto_answers"].drop()
    db.execute("PRAGMA user_version = 7")
    db.conn.commit()
    db.conn.close()
    store = TraceStore(path)
    assert store.schema_version() == SCHEMA_VERSION == 9 and every_chat(store) == before and len(before) == 1
    fmt = {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}, "strict": True}}
    held = parse_trace_line(line(trace(response_format=fmt)))
    assert held.trace_id() != parse_trace_line(line(trace())).trace_id()  # another form, another trace
    assert store.add([held], "new.jsonl") == [True]
    assert [c.get("response_format") for c in every_chat(store)] == [None, fmt]
    rows = store.traces_of("thinking", held.split(store.heldout_fraction))
    assert rows[-1]["response_format"] == fmt
    with pytest.raises(TraceError, match="response_format.type must be one of"):
        parse_trace_line(line(trace(response_format={"type": "xml"})))
    store.close()
