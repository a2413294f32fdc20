"""Bounded growth: versions pruned (never the current or a pinned one), the teacher cache evicted
least recently used first, logs rotated while a writer holds them open, old quarantine purged."""

import json
import os
import time

from conch_dna.models.versions import list_versions, pin, promote, prune_versions, read_manifest, rollback
from conch_dna.system.fsutil import rotate
from conch_dna.training.targets.teacher import TeacherCache

import numpy as np

from tests.conftest import run_module


def promote_n(tmp_path, home, n):
    for i in range(n):
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "adapters.safetensors").write_bytes(b"w%d" % i)
        (d / "adapter_config.json").write_text("{}")
        promote(home, "task", d, f"round {i}")


def test_pruning_keeps_the_newest_the_current_and_the_pinned(tmp_path):
    home = tmp_path / "home"
    promote_n(tmp_path, home, 8)
    assert pin(home, "task", "v0002") == ["v0002"]
    rollback(home, "task", to="v0004")
    assert prune_versions(home, "task", keep=3) == ["v0001", "v0003", "v0005"]
    assert list_versions(home, "task") == ["v0002", "v0004", "v0006", "v0007", "v0008"]
    assert read_manifest(home, "task")["current"] == "v0004"  # untouched, and still loadable
    assert (home / "adapters_kd" / "task" / "v0004" / "adapters.safetensors").read_bytes() == b"w3"
    assert pin(home, "task", "v0002", pinned=False) == []
    assert prune_versions(home, "task", keep=1) == ["v0002", "v0006", "v0007"]
    assert list_versions(home, "task") == ["v0004", "v0008"]


def test_a_broken_manifest_prunes_nothing(tmp_path):
    home = tmp_path / "home"
    promote_n(tmp_path, home, 3)
    (home / "adapters_kd" / "task" / "manifest.json").write_text('{"current": "v0001", "history": [], "pinned": 5}')
    assert prune_versions(home, "task", keep=1) == [] and len(list_versions(home, "task")) == 3


def test_the_teacher_cache_evicts_the_least_recently_used_first(tmp_path):
    cache = TeacherCache(tmp_path / "cache")
    ids, lps = np.zeros((50, 8), np.int32), np.zeros((50, 8), np.float16)
    for i in range(6):
        cache.put(f"{i:02d}" * 32, ids, lps)
        os.utime(cache.path(f"{i:02d}" * 32), (1000 + i, 1000 + i))  # written in this order, long ago
    cache.put_answer("a" * 64, "an answer")
    os.utime(cache.answer_path("a" * 64), (999, 999))
    assert cache.get("00" * 32) is not None  # used now: the newest
    one = cache.path("00" * 32).stat().st_size
    total = cache.size_bytes()
    assert cache.evict(total - 1) == 1 and cache.get_answer("a" * 64) is None  # the oldest: the answer
    assert cache.evict(3 * one) == 3
    kept = sorted(p.stem[:2] for p in (tmp_path / "cache").rglob("*.topk"))
    assert kept == ["00", "04", "05"]
    assert cache.size_bytes() <= 3 * one and cache.evict(3 * one) == 0


def test_a_log_held_open_by_its_writer_is_rotated_and_the_writer_goes_on(tmp_path):
    path = tmp_path / "daemon.err.log"
    writer = open(path, "a")  # as launchd holds StandardErrorPath
    try:
        for round_ in range(5):
            writer.write(f"round {round_} " + "x" * 100 + "\n")
            writer.flush()
            assert rotate(path, max_bytes=50, keep=3)
            assert not rotate(path, max_bytes=50, keep=3)  # empty now: nothing to do
        writer.write("after\n")
        writer.flush()
    finally:
        writer.close()
    assert path.read_text() == "after\n"  # at the start of the emptied file, not after a hole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["daemon.err.log", "daemon.err.log.1",
                                                          "daemon.err.log.2", "daemon.err.log.3"]
    assert (tmp_path / "daemon.err.log.1").read_text().startswith("round 4")
    assert (tmp_path / "daemon.err.log.3").read_text().startswith("round 2")
    assert oct((tmp_path / "daemon.err.log.1").stat().st_mode & 0o777) == "0o600"


def test_the_daemons_check_rotates_its_logs(tmp_path):
    from conch_dna.settings.config import Config

    from daemon.service import LOG_MAX_BYTES, Daemon

    home = tmp_path / "home"
    logs = home / "logs"
    logs.mkdir(parents=True)
    (logs / "worker.log").write_bytes(b"y" * (LOG_MAX_BYTES + 1))
    daemon = Daemon(home, Config(domains=["task"]))
    assert daemon.check() == []
    assert (logs / "worker.log").stat().st_size == 0 and (logs / "worker.log.1").stat().st_size == LOG_MAX_BYTES + 1


def test_old_quarantine_is_purged_by_command(tmp_path):
    from conch_dna.settings.config import Config
    from conch_dna.traces.store import TraceStore

    home = tmp_path / "home"
    store = TraceStore.for_home(home, Config())
    store.quarantine([(1, "old", b"{"), (2, "old", b"{")], "a.jsonl", "h1")
    with store.write() as conn:
        conn.execute("UPDATE quarantine SET quarantined_at = ?", (time.time() - 10 * 86400,))
    store.quarantine([(1, "new", b"{")], "b.jsonl", "h2")
    proc = run_module("conch_dna.cli", "traces", "purge-quarantine", "--older-than", "7", "--json",
                      env={"CONCH_HOME": str(home)})
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"purged": 2}
    assert [q["reason"] for q in store.quarantined()] == ["new"]
