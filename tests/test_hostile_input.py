"""Hostile input on real files, a real inbox and real SQLite: every line is stored, a duplicate, or
quarantined with a reason, and one bad file never stops the others."""

import json
import threading
import time

from conch_dna.ingest import QUARANTINE_HEAD_BYTES, ingest_bytes, ingest_file, record
from conch_dna.store import TraceStore
from conch_dna.traces import MAX_LINE_BYTES

import pytest

import daemon.inbox as inbox_module
from daemon.inbox import CORRUPT, Inbox
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
    inbox = Inbox(store, tmp_path / "inbox")
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
    inbox = Inbox(store, tmp_path / "inbox", debounce_seconds=0.4, sweep_seconds=3600).start()
    try:
        def producer():  # no temporary name: appends line by line, pausing less than the debounce
            with open(inbox.directory / "live.jsonl", "w") as f:
                for i in range(25):
                    f.write(trace_line(i) + "\n")
                    f.flush()
                    time.sleep(0.05)

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
    from conch_dna.models import load_model
    from conch_dna.training.teacher import TeacherCache, TeacherScorer

    _, tokenizer = load_model(kit["student"])
    scorer = TeacherScorer(kit["teacher"], TeacherCache(tmp_path / "cache"), top_k=4, max_seq_length=32)
    chat = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "A short answer."}]
    example = scorer.example(chat, tokenizer)
    assert len(example.tokens) <= 33 and example.offset >= 1  # the window, not the 400-word prompt
    assert example.topk_ids.shape[0] == len(example.tokens) - example.offset
    assert scorer.forward_passes == 1


def test_a_backlog_is_trained_in_capped_runs(tmp_path):
    from conch_dna.config import parse_config
    from conch_dna.cycle import _Cycle
    from conch_dna.training.callbacks import KDCallback

    store = TraceStore(tmp_path / "conch.db", heldout_fraction=0.0)
    ingest_bytes(store, "\n".join(trace_line(i) for i in range(25)).encode(), "backlog.jsonl")
    config = parse_config("max_traces_per_run = 10\n")
    picked = _Cycle(tmp_path, "task", config, False, KDCallback()).select()
    assert len(picked.new) == 10 and picked.upto == picked.new[-1]["rowid"]
    store.mark_trained("task", picked.upto)
    following = _Cycle(tmp_path, "task", config, False, KDCallback()).select()
    assert [t["rowid"] for t in following.new] == list(range(11, 21))
