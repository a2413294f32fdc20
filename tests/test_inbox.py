"""The inbox with a real watchdog observer, real processes, and a real SIGKILL."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conch_dna.traces.ingest import CHUNK_LINES, record
from conch_dna.traces.store import TraceStore

from daemon.inbox import Inbox


def trace_line(i: int, domain: str = "task") -> str:
    return json.dumps({"domain": domain, "teacher": "tiny-teacher", "messages": [
        {"role": "user", "content": f"Plan step {i}"},
        {"role": "assistant", "content": f"1. Do {i}. 2. Check {i}."}]})


def drop(inbox_dir: Path, name: str, lines: list[str]) -> None:
    """What a producer does: write under a temporary name, then rename to *.jsonl."""
    tmp = inbox_dir / f".{name}.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    os.rename(tmp, inbox_dir / name)


def wait_for(condition, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_dropped_files_are_ingested_and_leave_the_inbox(tmp_path):
    store = TraceStore(tmp_path / "conch.db")
    inbox_dir = tmp_path / "inbox"
    inbox_dir.mkdir()
    drop(inbox_dir, "before-start.jsonl", [trace_line(0)])  # found by the start sweep
    inbox = Inbox(store, inbox_dir, debounce_seconds=0.1).start()
    try:
        drop(inbox_dir, "a.jsonl", [trace_line(i) for i in range(1, 6)] + ["{not json"])
        (inbox_dir / "partial.jsonl.part").write_text(trace_line(99) + "\n")
        (inbox_dir / "notes.txt").write_text("not a trace file")
        assert wait_for(lambda: store.counts("task").total == 6 and store.quarantine_count() == 1)
        assert wait_for(lambda: not (inbox_dir / "a.jsonl").exists())
    finally:
        inbox.stop()
    assert (inbox_dir / "partial.jsonl.part").exists() and (inbox_dir / "notes.txt").exists()
    assert list((inbox_dir / ".processing").iterdir()) == []
    (bad,) = store.quarantined()
    assert bad["source"] == "a.jsonl" and bad["line"] == 6 and "bad JSON" in bad["reason"]


def test_sweep_finds_files_whose_events_were_missed(tmp_path):
    store = TraceStore(tmp_path / "conch.db")
    inbox = Inbox(store, tmp_path / "inbox", sweep_seconds=0.3)
    inbox.start()
    inbox._observer.stop()  # from here on, no filesystem event arrives
    inbox._observer.join()
    try:
        drop(tmp_path / "inbox", "late.jsonl", [trace_line(i) for i in range(3)])
        assert wait_for(lambda: store.counts("task").total == 3, timeout=120)
    finally:
        inbox.stop()


def _producer(inbox_dir: str, worker: int, files: int, per_file: int) -> None:
    for f in range(files):
        lines = [trace_line(worker * 100_000 + f * 1000 + i) for i in range(per_file)]
        lines.append(trace_line(-1))  # the same trace from every producer: stored once
        drop(Path(inbox_dir), f"w{worker}-{f}.jsonl", lines)
        time.sleep(0.01)


def test_concurrent_producers_and_record_threads_lose_nothing(tmp_path, conch_home):
    store = TraceStore(conch_home / "conch.db")
    inbox = Inbox(store, conch_home / "inbox", debounce_seconds=0.05).start()
    errors: list[BaseException] = []

    def recorder(t: int):
        try:
            for i in range(60):
                msgs = [{"role": "user", "content": f"thread {t} question {i}"},
                        {"role": "assistant", "content": f"answer {i}"}]
                assert record("thinking", msgs, teacher="tiny-teacher")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_producer, args=(str(conch_home / "inbox"), w, 5, 40)) for w in range(3)]
    threads = [threading.Thread(target=recorder, args=(t,)) for t in range(4)]
    try:
        for p in procs:
            p.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in procs:
            p.join()
        expected_task = 3 * 5 * 40 + 1
        assert wait_for(lambda: store.counts("task").total == expected_task, timeout=180), store.counts("task")
    finally:
        inbox.stop()
    assert not errors, errors
    assert store.counts("thinking").total == 4 * 60
    assert store.quarantine_count() == 0
    assert sum(r.duplicates for r in inbox.reports) == 3 * 5 - 1


def test_ingester_killed_mid_file_loses_nothing_and_stores_nothing_twice(tmp_path):
    home = tmp_path / "home"
    inbox_dir = home / "inbox"
    inbox_dir.mkdir(parents=True)
    n = 60_000
    lines = [trace_line(i) for i in range(n)] + ["{broken"] * 3
    drop(inbox_dir, "big.jsonl", lines)
    env = {**os.environ, "CONCH_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}

    proc = subprocess.Popen([sys.executable, "-m", "daemon.inbox"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # kill it inside the write: some chunks of the file committed, not all
    store = TraceStore(home / "conch.db")
    assert wait_for(lambda: store.counts("task").total > 0, timeout=180)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (inbox_dir / ".processing" / "big.jsonl").exists()  # killed before it finished
    stored = store.counts("task").total
    assert 0 < stored < n and stored % CHUNK_LINES == 0  # whole chunks only: a transaction per chunk

    proc = subprocess.Popen([sys.executable, "-m", "daemon.inbox"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # the three identical bad lines at the end: one row that counts them
        assert wait_for(lambda: store.counts("task").total == n and store.quarantine_count() == 1, timeout=180)
        assert "lines 60001-60003: 3 alike" in store.quarantined(1)[0]["reason"]
        assert wait_for(lambda: not (inbox_dir / ".processing" / "big.jsonl").exists())
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert store.db.conn.execute("SELECT count(*) FROM traces").fetchone()[0] == n


def test_only_regular_files_are_ingested_and_the_rest_set_aside_unread(tmp_path):
    import threading

    from conch_dna.traces.store import TraceStore

    from daemon.inbox import REJECTED, Inbox

    home = tmp_path / "home"
    store = TraceStore(home / "conch.db")
    inbox = Inbox(store, home / "inbox", debounce_seconds=0)  # swept at once
    outside = tmp_path / "outside.jsonl"  # private data outside the home, behind a link
    outside.write_text(json.dumps({"secret": "not a trace"}) + "\n")
    os.mkfifo(inbox.directory / "fifo.jsonl")
    (inbox.directory / "link.jsonl").symlink_to(outside)
    (inbox.directory / "folder.jsonl").mkdir()
    good = {"domain": "task", "teacher": "t", "messages": [{"role": "user", "content": "Plan the day."},
                                                           {"role": "assistant", "content": "1. Wake."}]}
    (inbox.directory / "good.jsonl").write_text(json.dumps(good) + "\n")
    done = threading.Event()
    reports = []
    threading.Thread(target=lambda: (reports.extend(inbox.sweep()), done.set()), daemon=True).start()
    assert done.wait(60), "the sweep hung on a non-regular file"
    assert [r.stored for r in reports] == [1]
    assert store.counts("task").train + store.counts("task").heldout == 1
    assert store.quarantine_count() == 0  # the linked file's line was never read, so never quarantined
    reasons = sorted(p.read_text() for p in (inbox.directory / REJECTED).glob("*.reason.txt"))
    assert len(reasons) == 3 and any("a FIFO" in r for r in reasons) and any("symbolic link" in r for r in reasons)
    assert not list(inbox.directory.glob("*.jsonl")) and not list(inbox.processing.iterdir())


def test_the_inbox_keeps_a_bounded_summary_of_recent_files(tmp_path, monkeypatch):
    from conch_dna.traces.store import TraceStore

    import daemon.inbox as inbox_module
    from daemon.inbox import Inbox

    monkeypatch.setattr(inbox_module, "RECENT_REPORTS", 2)
    store = TraceStore(tmp_path / "home" / "conch.db")
    inbox = Inbox(store, tmp_path / "home" / "inbox", debounce_seconds=0)
    for i in range(3):
        trace = {"domain": "task", "teacher": "t", "messages": [{"role": "user", "content": f"Plan {i}."},
                                                                {"role": "assistant", "content": "1. Go."}]}
        (inbox.directory / f"f{i}.jsonl").write_text(json.dumps(trace) + "\n" + "not json\n")
    reports = inbox.sweep()
    assert [r.lines for r in reports] == [2, 2, 2]  # the caller gets every line's outcome
    assert [r.source for r in inbox.reports] == ["f1.jsonl", "f2.jsonl"]  # the inbox keeps the last two
    assert all(r.outcomes is None and r.stored == 1 and r.quarantined == 1 for r in inbox.reports)
