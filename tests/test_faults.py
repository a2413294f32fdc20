"""Faults in time: runs that keep failing back off and set their traces aside; the daemon's lock,
battery deferral and stale runs; a broken manifest or resume file never stops a domain."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH, corpus
from conch_dna.lifecycle.cycle import RESUME_FILE, pending, retrain_domain
from conch_dna.lifecycle.failures import retry_at, set_aside_if_stuck
from conch_dna.models.versions import domain_dir
from conch_dna.settings.config import load_config
from conch_dna.traces.runs import RunStatus
from conch_dna.traces.store import TraceStore

import pytest

from daemon.service import Daemon
from tests.test_daemon import write_config

MISSING_STUDENT = "/nowhere/student"  # loading it fails at once: a run that fails the same way every time


def failing_home(tmp_path, n=24, student=MISSING_STUDENT, **extra):
    home = tmp_path / "home"
    write_config(home, student=student, retrain_threshold=8, **extra)
    store = TraceStore.for_home(home, load_config(home))
    add_traces(store, n, seed=1)
    return home, store


def add_traces(store, n, seed):
    from conch_dna.traces.trace import Trace

    traces = [Trace.model_validate({"domain": "debug", "teacher": TEACHER_PATH, "messages": d})
              for d in corpus.dialogues(n, seed=seed, domains=["debug"])]
    store.add(traces, "test")


@pytest.fixture
def batch_fails(monkeypatch):
    """Runs that fail on their traces (a batch the engine cannot train on): the failures that count towards
    setting the traces aside; a model that does not load is not the traces' fault (tests/test_stopping.py).
    The message is the student's, so a run with another student fails another way."""
    from conch_dna.training.true_kd import TrueKnowledgeDistiller

    def fails(self, domain, prompts, *args, **kwargs):
        raise ValueError(f"cannot train {self.student_model_id} on this batch")

    monkeypatch.setattr(TrueKnowledgeDistiller, "distill_domain", fails)


def test_a_batch_that_keeps_failing_is_set_aside_after_failure_limit_runs_and_new_traces_train_again(
        tmp_path, batch_fails):
    home, store = failing_home(tmp_path, failure_limit=3, student=STUDENT_PATH)
    config = load_config(home)
    batch = pending(store, "debug")
    assert batch > 0 and set_aside_if_stuck(store, "debug", config) is None  # no failure yet
    for attempt in (1, 2):
        result = retrain_domain(home, "debug", config)
        assert result.status is RunStatus.FAILED and "set aside" not in result.reason
        assert pending(store, "debug") == batch and len(store.failure_streak("debug")) == attempt
        other = store.start_run("memory")  # another domain's runs are not this one's streak
        store.finish_run(other, RunStatus.REJECTED)
    elsewhere = config.model_copy(update={"student": TEACHER_PATH})  # the third fails another way
    third = retrain_domain(home, "debug", elsewhere)
    assert third.status is RunStatus.FAILED and f"set aside {batch} train traces" in third.reason
    [aside] = store.set_asides("debug")
    assert aside["traces"] == batch and aside["after_rowid"] == 0 and "3 runs in a row" in aside["reason"]
    assert f"cannot train {TEACHER_PATH}" in aside["reason"]  # the last error travels with the batch
    assert pending(store, "debug") == 0  # the domain is past them; they are still stored
    assert store.counts("debug").train == batch
    for _ in range(3):  # forced runs on traces already set aside set nothing more aside
        retrain_domain(home, "debug", config, force=True)
    assert len(store.set_asides("debug")) == 1

    add_traces(store, 24, seed=2)  # new traces: trained again, and set aside only after three more failures
    fresh = pending(store, "debug")
    assert fresh > 0
    for _ in range(2):
        assert "set aside" not in retrain_domain(home, "debug", config).reason
    assert pending(store, "debug") == fresh and len(store.set_asides("debug")) == 1
    assert f"set aside {fresh} train traces" in retrain_domain(home, "debug", config).reason
    latest = store.set_asides("debug")[0]
    assert latest["after_rowid"] == aside["upto_rowid"] and latest["traces"] == fresh


def test_failures_on_different_batches_are_not_one_batch(tmp_path, batch_fails):
    home, store = failing_home(tmp_path, failure_limit=2, student=STUDENT_PATH)
    config = load_config(home)
    retrain_domain(home, "debug", config)
    add_traces(store, 24, seed=3)  # the next run sees more traces: another batch
    assert "set aside" not in retrain_domain(home, "debug", config).reason
    assert "set aside" in retrain_domain(home, "debug", config).reason  # two on this one


def test_the_wait_doubles_after_each_failure_up_to_its_cap(tmp_path):
    home, store = failing_home(tmp_path, check_minutes=10, max_backoff_minutes=35)
    config = load_config(home)
    assert retry_at(store, "debug", config) is None
    waits = []
    for _ in range(4):
        retrain_domain(home, "debug", config)
        last = store.runs("debug", limit=1)[0]
        waits.append(round((retry_at(store, "debug", config) - last.finished_at) / 60, 6))
    assert waits == [10, 20, 35, 35]
    other = store.start_run("memory")  # another domain's run ends no streak of this one
    store.finish_run(other, RunStatus.REJECTED)
    assert round((retry_at(store, "debug", config) - last.finished_at) / 60, 6) == 35
    # a run that does not fail ends the streak
    with store.write() as conn:
        conn.execute("UPDATE runs SET status = ? WHERE id = (SELECT max(id) FROM runs WHERE domain = 'debug')",
                     (RunStatus.REJECTED.value,))
    assert retry_at(store, "debug", config) is None


def laptop(root, mains_online: bool):
    for name, kind, online in (("BAT0", "Battery", None), ("AC", "Mains", int(mains_online))):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        (d / "type").write_text(kind + "\n")
        if online is not None:
            (d / "online").write_text(f"{online}\n")
    return root


def test_the_daemon_waits_on_battery_then_backs_off_a_failing_domain(tmp_path, caplog):
    home, store = failing_home(tmp_path)
    caplog.set_level(logging.INFO, "conch.daemon")
    power = laptop(tmp_path / "power", mains_online=False)
    daemon = Daemon(home, power_supply=power)
    assert daemon.check() == [] and store.runs("debug") == []
    assert "on battery" in caplog.text

    laptop(power, mains_online=True)
    assert daemon.check() == ["debug"]  # a real worker process, which fails to load the student
    [run] = store.runs("debug")
    assert run.status is RunStatus.FAILED and MISSING_STUDENT in run.reason
    assert daemon.check() == [] and daemon.check() == []  # backing off: no model loaded again
    assert len(store.runs("debug")) == 1
    assert caplog.text.count("next try at") == 1  # said once, not at every check
    with store.write() as conn:  # the wait passes
        conn.execute("UPDATE runs SET finished_at = finished_at - 3600")
    assert daemon.check() == ["debug"] and len(store.runs("debug")) == 2


def test_a_second_daemon_is_refused_and_stale_runs_are_failed_at_start(tmp_path):
    home, store = failing_home(tmp_path)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = store.start_run("debug", upto_rowid=3)
    with store.write() as conn:
        conn.execute("UPDATE runs SET pid = ? WHERE id = ?", (dead.pid, stale))
    ours = store.start_run("memory")  # a run of this very process is alive: left alone
    first = Daemon(home, load_config(home).model_copy(update={"check_minutes": 600})).start()
    try:
        runs = {r.id: r for r in store.runs()}
        assert runs[stale].status is RunStatus.FAILED and "died" in runs[stale].reason
        assert runs[ours].status is RunStatus.RUNNING
        with pytest.raises(RuntimeError, match=f"another conch daemon already runs on .*pid {os.getpid()}"):
            Daemon(home).start()
    finally:
        first.stop()


@pytest.mark.parametrize("state", ['{"iteration": 3, "upto_rowid": 4, "iters": 40}', "{broken", '["a list"]'])
def test_a_stale_or_broken_resume_file_never_blocks_a_domain(tmp_path, state):
    home, store = failing_home(tmp_path)
    store.mark_trained("debug", 10)  # the resume file's traces were consumed since
    folder = domain_dir(home, "debug")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESUME_FILE).write_text(state)
    result = retrain_domain(home, "debug", load_config(home))
    assert result.status is RunStatus.FAILED and MISSING_STUDENT in result.reason  # it ran: it got to the model
    [run] = store.runs("debug")
    assert run.upto_rowid == store.max_rowid("debug")  # on the traces after the mark, not the stale ones
    if state.startswith('{"'):
        assert not (folder / RESUME_FILE).exists()


def test_a_broken_manifest_skips_the_cycle_and_consumes_nothing(tmp_path):
    home, store = failing_home(tmp_path)
    folder = domain_dir(home, "debug")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"current": "../../elsewhere", "history": []}))
    before = pending(store, "debug")
    result = retrain_domain(home, "debug", load_config(home))
    assert result.status is RunStatus.SKIPPED and "conch kd rollback --domain debug" in result.reason
    assert pending(store, "debug") == before and store.runs("debug") == []


# -- what survives a full disk and a power cut ------------------------------------------------------

FULL_DISK_INGEST = """
import resource, signal, sys
from pathlib import Path
from conch_dna.traces.store import TraceStore
from daemon.inbox import Inbox
home, limit = Path(sys.argv[1]), int(sys.argv[2])
store = TraceStore(home / "conch.db")
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
inbox = Inbox(store, home / "inbox", debounce_seconds=0)
inbox.sweep()
print(store.counts("task").total)
"""


def test_a_full_disk_fails_the_ingest_and_the_next_sweep_stores_every_line_once(tmp_path):
    from daemon.inbox import Inbox
    from tests.test_inbox import trace_line

    home = tmp_path / "home"
    store = TraceStore(home / "conch.db")
    inbox = Inbox(store, home / "inbox", debounce_seconds=0)
    (inbox.directory / "big.jsonl").write_text("".join(trace_line(i) + "\n" for i in range(3000)))
    limit = (home / "conch.db").stat().st_size + 200_000  # room for part of the file only
    full = subprocess.run([sys.executable, "-c", FULL_DISK_INGEST, str(home), str(limit)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert full.returncode == 0, full.stderr
    assert "full" in full.stderr or "File too large" in full.stderr or "disk I/O" in full.stderr, full.stderr
    stored_while_full = int(full.stdout)
    assert stored_while_full < 3000  # it really ran out of room
    assert list(inbox.processing.glob("*.jsonl")) or list(inbox.directory.glob("*.jsonl"))  # the file is kept
    inbox.sweep()  # room again
    assert store.counts("task").total == 3000 and store.quarantine_count() == 0
    assert not list(inbox.processing.iterdir()) and not list(inbox.directory.glob("*.jsonl"))


def test_commits_and_renames_are_on_disk_before_they_count(tmp_path, monkeypatch):
    """What a power cut needs: SQLite commits with synchronous=FULL; a state file's data is synced
    before its rename and its folder after it."""
    from conch_dna.system.fsutil import atomic_write_text

    store = TraceStore(tmp_path / "conch.db")
    assert store.db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert store.db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    if not Path("/proc/self/fd").is_dir():
        pytest.skip("needs /proc to name the synced files")
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    target = tmp_path / "state" / "daemon.json"
    target.parent.mkdir()
    atomic_write_text(target, "{}")
    assert len(synced) == 2 and Path(synced[0]).parent == target.parent and synced[0] != str(target)
    assert synced[1] == str(target.parent)  # the rename itself, after the data
