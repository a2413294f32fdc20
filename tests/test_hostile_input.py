"""Hostile input on real files, a real inbox and real SQLite: every line is stored, a duplicate, or
quarantined with a reason, and one bad file never stops the others."""

import io
import json
import threading
import time

from conch_dna.traces.ingest import QUARANTINE_HEAD_BYTES, ingest_bytes, ingest_file, record
from conch_dna.traces.store import TraceStore
from conch_dna.traces.trace import MAX_LINE_BYTES

import pytest
from hypothesis import strategies as st

import daemon.inbox as inbox_module
from daemon.inbox import CORRUPT, Inbox
from tests.conftest import quarantine_rows
from tests.test_inbox import trace_line, wait_for


def trace(i: int, **topk) -> dict:
    data = json.loads(trace_line(i))
    if topk:
        data["topk"] = {"tokenizer": "t", **topk}
    return data


# Each passes validation a naive way and used to fail, or change meaning, only when stored.
STORED_BADLY = {
    "empty topk": dict(token_ids=[], logprobs=[]),
    "ragged topk": dict(token_ids=[[1, 2], [3]], logprobs=[[-0.1, -0.2], [-0.3]]),
    "id over int32": dict(token_ids=[[2**31]], logprobs=[[-0.5]]),
    "log-prob below float16": dict(token_ids=[[1]], logprobs=[[-1e6]]),
}


@pytest.mark.parametrize("case", STORED_BADLY)
def test_a_line_that_cannot_be_stored_as_it_is_is_quarantined_and_its_file_goes_on(tmp_path, case):
    store = TraceStore(tmp_path / "conch.db")
    lines = [trace_line(0), json.dumps(trace(1, **STORED_BADLY[case])), trace_line(2)]
    report = ingest_bytes(store, "\n".join(lines).encode(), "f.jsonl")
    assert report.outcomes == ["stored", "quarantined", "stored"]
    (bad,) = store.quarantined()
    assert bad["line"] == 2 and "topk" in bad["reason"]
    assert record("task", trace(3, **STORED_BADLY[case])["messages"], "t", topk=trace(3, **STORED_BADLY[case])["topk"],
                  store=store) is None  # record() quarantines the same line; it never raises into the agent
    assert store.quarantine_count() == 2


def test_record_never_raises_for_what_the_agent_passes(tmp_path):
    store = TraceStore(tmp_path / "conch.db")
    circular: dict = {}
    circular["self"] = circular
    deep = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    assert record("task", deep, "t", meta=circular, store=store) is None
    assert record("task", deep, "t", meta={"deep": nested}, store=store) is None
    assert record("task", "not a chat", "t", store=store) is None
    reasons = [q["reason"] for q in store.quarantined()]
    assert len(reasons) == 3 and any("not JSON-serialisable" in r for r in reasons)


def test_an_oversized_line_is_kept_by_its_first_kb_and_the_file_streams(tmp_path):
    store = TraceStore(tmp_path / "conch.db")
    path = tmp_path / "big.jsonl"
    huge = '{"domain": "task", "x": "' + "a" * (MAX_LINE_BYTES + 10) + '"}'
    path.write_text("\n".join([trace_line(0), huge, trace_line(1)]) + "\n")
    report = ingest_file(store, path)
    assert (report.stored, report.quarantined, report.lines, report.outcomes) == (2, 1, 3, None)
    (bad,) = store.db.conn.execute("SELECT line, reason, length(raw) FROM quarantine").fetchall()
    assert bad[0] == 2 and f"{len(huge)} bytes" in bad[1] and bad[2] == QUARANTINE_HEAD_BYTES


def test_a_file_that_keeps_failing_is_set_aside_and_the_files_behind_it_are_ingested(tmp_path, monkeypatch):
    real_ingest = inbox_module.ingest_file

    def disk_error_on_a(store, path, source=None):  # an I/O error that recurs for this one file
        if source == "a.jsonl":
            raise OSError(5, "Input/output error")
        return real_ingest(store, path, source)

    monkeypatch.setattr(inbox_module, "ingest_file", disk_error_on_a)
    store = TraceStore(tmp_path / "conch.db")
    inbox = Inbox(store, tmp_path / "inbox", debounce_seconds=0)  # swept at once
    for name, i in (("a.jsonl", 0), ("b.jsonl", 1)):
        (inbox.directory / name).write_text(trace_line(i) + "\n")
    for _ in range(inbox_module.FAILURE_LIMIT):
        reports = inbox.sweep()
        assert store.counts("task").total == 1  # b is never held up behind a
    (aside,) = (inbox.directory / CORRUPT).glob("a.jsonl.*[0-9]")
    assert "Input/output error" in (aside.parent / f"{aside.name}.reason.txt").read_text()
    assert not list(inbox.processing.iterdir()) and reports == []


def test_a_file_written_in_place_is_claimed_only_once_it_is_quiet(tmp_path):
    store = TraceStore(tmp_path / "conch.db")
    # the writes span 2.5 s, more than twice the debounce, and sweeps run all the while: a claim
    # that does not wait for the file to be quiet loses lines
    inbox = Inbox(store, tmp_path / "inbox", debounce_seconds=1.0, sweep_seconds=0.3).start()
    try:
        def producer():  # no temporary name: appends line by line, pausing less than the debounce
            with open(inbox.directory / "live.jsonl", "w") as f:
                for i in range(25):
                    f.write(trace_line(i) + "\n")
                    f.flush()
                    time.sleep(0.1)

        writer = threading.Thread(target=producer)
        writer.start()
        writer.join()
        assert wait_for(lambda: not (inbox.directory / "live.jsonl").exists() and not list(inbox.processing.iterdir()))
    finally:
        inbox.stop()
    assert store.counts("task").total == 25


def test_the_split_fraction_travels_with_the_data(tmp_path):
    first = TraceStore(tmp_path / "conch.db", heldout_fraction=0.1)
    again = TraceStore(tmp_path / "conch.db", heldout_fraction=0.5)  # a config changed later
    assert first.heldout_fraction == again.heldout_fraction == 0.1


def test_a_prompt_longer_than_the_window_is_cut_for_the_teacher_too(tmp_path, kit):
    from conch_dna.models.loading import load_model
    from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer

    _, tokenizer = load_model(kit["student"])
    scorer = TeacherScorer(kit["teacher"], TeacherCache(tmp_path / "cache"), top_k=4, max_seq_length=32)
    chat = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "A short answer."}]
    example = scorer.example(chat, tokenizer)
    assert len(example.tokens) <= 33 and example.offset >= 1  # the window, not the 400-word prompt
    assert example.topk_ids.shape[0] == len(example.tokens) - example.offset
    assert scorer.forward_passes == 1


def test_a_backlog_is_trained_in_capped_runs(tmp_path):
    from conch_dna.lifecycle.cycle import _Cycle
    from conch_dna.settings.config import parse_config
    from conch_dna.training.callbacks import KDCallback

    store = TraceStore(tmp_path / "conch.db", heldout_fraction=0.0)
    ingest_bytes(store, "\n".join(trace_line(i) for i in range(25)).encode(), "backlog.jsonl")
    config = parse_config("max_traces_per_run = 10\n")
    picked = _Cycle(tmp_path, "task", config, False, KDCallback()).select()
    assert len(picked.new) == 10 and picked.upto == picked.new[-1]["rowid"]
    store.mark_trained("task", picked.upto)
    following = _Cycle(tmp_path, "task", config, False, KDCallback()).select()
    assert [t["rowid"] for t in following.new] == list(range(11, 21))


# -- mixes of good and bad lines through a running inbox and record() ------------------------------

def _topk_of(kind: str, n: int) -> dict:
    ok = {"token_ids": [[1, 2]] * n, "logprobs": [[-0.1, -2.0]] * n, "tokenizer": "t"}
    return {**ok, **STORED_BADLY[kind]} if kind in STORED_BADLY else ok


_good_chat = st.builds(lambda p, a: [{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                       st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20).filter(str.strip))
_deep = "[" * 3000 + "]" * 3000
HAND_WRITTEN_BAD = [
    b"", b"   ", b"\x00\x01\x02", b"\xff\xfe not utf-8", b"{", b"[]", b"null", b'"a string"', _deep.encode(),
    json.dumps({"domain": "../etc", "teacher": "t", "messages": []}).encode(),
    json.dumps({"domain": "dreaming", "teacher": "t", "messages": [{"role": "user", "content": "x"}]}).encode(),
    json.dumps({"domain": "task", "teacher": "t",
                "messages": [{"role": "assistant", "content": "no prompt"}]}).encode(),
    json.dumps({"domain": "task", "teacher": "t", "messages": "not a list"}).encode(),
    json.dumps({"domain": "task", "teacher": 7, "messages": [{"role": "user", "content": "x"},
                                                           {"role": "assistant", "content": "y"}]}).encode(),
]


@st.composite
def inbox_lines(draw):
    kind = draw(st.sampled_from(["good", "topk", "hand", "noise"]))
    if kind == "hand":
        return draw(st.sampled_from(HAND_WRITTEN_BAD))
    if kind == "noise":
        return draw(st.binary(max_size=40)).replace(b"\n", b"")
    chat = draw(_good_chat)
    data = {"domain": draw(st.sampled_from(["task", "debug"])), "teacher": "t", "messages": chat}
    if kind == "topk":
        data["topk"] = _topk_of(draw(st.sampled_from([*STORED_BADLY, "ok"])), 1)
    return json.dumps(data).encode()


@st.composite
def record_calls(draw):
    """(messages, topk, meta) an agent might pass to record()."""
    bad = draw(st.sampled_from(["none", "messages", "topk", "meta"]))
    messages = draw(_good_chat) if bad != "messages" else draw(st.sampled_from(
        ["a string", [], [{"role": "assistant", "content": "x"}], [{"role": 3}], None]))
    topk = _topk_of(draw(st.sampled_from(list(STORED_BADLY))), 1) if bad == "topk" else None
    meta: dict = {}
    if bad == "meta":
        meta["self"] = meta  # circular
    return messages, topk, meta


def test_mixes_of_good_and_bad_lines_are_each_accounted_for_and_the_inbox_goes_on(tmp_path):
    from hypothesis import HealthCheck, given, settings

    store = TraceStore(tmp_path / "conch.db")
    inbox = Inbox(store, tmp_path / "inbox", debounce_seconds=0.05, sweep_seconds=5).start()
    counts = lambda: (store.db.conn.execute("SELECT count(*) FROM traces").fetchone()[0],  # noqa: E731
                      store.quarantine_count())
    files = iter(range(10**6))

    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(inbox_lines(), max_size=12), st.lists(record_calls(), max_size=4), st.data())
    def one_mix(lines, calls, data):
        if lines:  # some lines again: duplicates
            lines = lines + data.draw(st.lists(st.sampled_from(lines), max_size=3))
        n = next(files)
        # a file's quarantine rows are keyed by its hash: a unique last line keeps two equal mixes apart
        lines = [*lines, trace_line(n).replace("Plan step", "Mix").encode()]
        traces_before, quarantined_before = counts()
        tmp = inbox.directory / f".mix{n}.tmp"
        tmp.write_bytes(b"".join(line + b"\n" for line in lines))
        tmp.rename(inbox.directory / f"mix{n}.jsonl")
        assert wait_for(lambda: any(r.source == f"mix{n}.jsonl" for r in inbox.reports))
        (report,) = [r for r in inbox.reports if r.source == f"mix{n}.jsonl"]
        assert report.lines == len(lines) == report.stored + report.duplicates + report.quarantined
        assert counts() == (traces_before + report.stored, quarantined_before + quarantine_rows(store, lines))
        for i, (messages, topk, meta) in enumerate(calls):
            traces_before, quarantined_before = counts()
            meta["nonce"] = n * 100 + i  # a bad call is kept once per call, not merged with an earlier one
            trace_id = record("task", messages, "t", topk=topk, meta=meta, store=store)
            if trace_id is None:
                assert counts() == (traces_before, quarantined_before + 1)
            else:
                assert store.db.conn.execute("SELECT 1 FROM traces WHERE id = ?", (trace_id,)).fetchone()
                assert counts()[1] == quarantined_before and counts()[0] - traces_before in (0, 1)

    try:
        one_mix()
        # and the inbox still ingests the next plain file, with nothing left claimed or waiting
        (inbox.directory / "after.jsonl").write_text(trace_line(10**6) + "\n")
        assert wait_for(lambda: any(r.source == "after.jsonl" and r.stored == 1 for r in inbox.reports))
        assert not list(inbox.processing.iterdir()) and not list(inbox.directory.glob("*.jsonl"))
    finally:
        inbox.stop()


class _BoundedReader(io.BytesIO):
    """A file that checks read_lines never asks for more than limit + 1 bytes of a line."""

    def __init__(self, data: bytes, limit: int):
        super().__init__(data)
        self.limit = limit

    def readline(self, size=-1):
        assert size is not None and 0 < size <= self.limit + 1, size
        return super().readline(size)


def test_read_lines_strips_line_ends_and_holds_at_most_the_limit_of_a_line():
    from conch_dna.traces.ingest import read_lines

    limit = 2 * QUARANTINE_HEAD_BYTES
    data = (b"a\n" + b"b\r\n" + b"x" * (limit + 500) + b"\n" + b"y" * limit + b"\n" + b"" + b"\n"
            + b"z" * limit)  # the last line: exactly the limit, no final newline
    got = list(read_lines(_BoundedReader(data, limit), limit))
    assert got == [(b"a", 1), (b"b", 1), (b"x" * QUARANTINE_HEAD_BYTES, limit + 500), (b"y" * limit, limit),
                   (b"", 0), (b"z" * limit, limit)]
    assert list(read_lines(_BoundedReader(b"c\r", limit), limit)) == [(b"c", 1)]


def test_ingest_file_names_its_source_keys_the_quarantine_by_the_files_hash_and_never_follows_a_link(tmp_path):
    import hashlib

    store = TraceStore(tmp_path / "conch.db")
    path = tmp_path / "f.jsonl"
    path.write_bytes(f"{trace_line(0)}\nnot json\n".encode())
    report = ingest_file(store, path)
    assert report.source == "f.jsonl" and (report.stored, report.quarantined) == (1, 1)
    (row,) = store.db.conn.execute("SELECT source, source_hash FROM quarantine").fetchall()
    assert row == ("f.jsonl", hashlib.sha256(path.read_bytes()).hexdigest())
    assert store.db.conn.execute("SELECT source FROM traces").fetchall() == [("f.jsonl",)]
    assert ingest_file(store, path, source="named.jsonl").source == "named.jsonl"
    (tmp_path / "link.jsonl").symlink_to(path)
    with pytest.raises(ValueError, match="link"):
        ingest_file(store, tmp_path / "link.jsonl")
    assert ingest_file(store, tmp_path / "link.jsonl", follow_links=True).duplicates == 1  # a person may


def test_record_keeps_what_it_was_given_as_it_was_and_says_where_it_came_from(tmp_path):
    import datetime
    import hashlib

    store = TraceStore(tmp_path / "conch.db")
    chat = [{"role": "user", "content": "Plan the café."}, {"role": "assistant", "content": "1. Open."}]
    trace_id = record("task", chat, "t", meta={"at": datetime.date(2026, 1, 2)}, store=store)  # str() of a date
    assert store.db.conn.execute("SELECT source, meta FROM traces WHERE id = ?", (trace_id,)).fetchone() == (
        "record()", '{"at": "2026-01-02"}')
    assert record("task", [{"role": "user", "content": "é"}], "t", store=store) is None  # no answer
    (bad,) = store.db.conn.execute("SELECT source, source_hash, line, raw FROM quarantine").fetchall()
    assert bad[0] == "record()" and bad[2] == 0 and "é".encode() in bad[3]  # kept as UTF-8, not \\u escapes
    assert bad[1] == hashlib.sha256(bad[3]).hexdigest()
    huge = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y" * (MAX_LINE_BYTES + 1)}]
    assert record("task", huge, "t", store=store) is None
    assert "over the" in store.quarantined(1)[0]["reason"]
    circular: dict = {"text": "\ud800"}  # a lone surrogate cannot even be encoded
    circular["self"] = circular
    assert record("task", chat, "t", meta=circular, store=store) is None
    assert "not JSON-serialisable: ValueError" in store.quarantined(1)[0]["reason"]


def test_line_ends_and_the_size_limit_at_its_edge(tmp_path):
    store = TraceStore(tmp_path / "conch.db")
    at_limit = b"{" * MAX_LINE_BYTES  # exactly the limit: parsed (and refused as JSON), kept whole
    report = ingest_bytes(store, b"not json\r\n" + at_limit + b"\n", "edge.jsonl")
    assert report.source == "edge.jsonl" and report.quarantined == 2
    rows = store.db.conn.execute("SELECT source, raw, reason FROM quarantine ORDER BY line").fetchall()
    assert rows[0][:2] == ("edge.jsonl", b"not json")  # the CR of a CRLF file is not part of the line
    assert rows[1][1] == at_limit and "over the" not in rows[1][2]


def test_each_home_has_its_own_store(tmp_path, monkeypatch):
    from conch_dna.traces.ingest import home_store

    monkeypatch.setenv("CONCH_HOME", str(tmp_path / "a"))
    first = home_store()
    assert home_store() is first  # one per home, reused
    monkeypatch.setenv("CONCH_HOME", str(tmp_path / "b"))
    assert home_store().path == tmp_path / "b" / "conch.db"
