"""Stopping is not failing: Ctrl-C or SIGTERM on a local `conch kd retrain` keeps a checkpoint, records the run
as interrupted, and never counts towards setting the traces aside; a version name taken by a file is stepped
over; a failure that is not the traces' own (a model that does not load) never sets them aside."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conch_dna.lifecycle.failures import set_aside_if_stuck
from conch_dna.models.versions import list_versions, write_version
from conch_dna.settings.config import load_config
from conch_dna.traces.runs import RunStatus
from conch_dna.traces.store import TraceStore

import pytest

from tests.test_daemon import drop, teacher_traces, write_config

ROOT = Path(__file__).resolve().parents[1]


def store_of(home: Path) -> TraceStore:
    return TraceStore.for_home(home, load_config(home))


def conch(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "conch_dna.cli", *args], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "CONCH_HOME": str(home), "PYTHONPATH": str(ROOT)})


def retrain_until_step(home: Path, step: int) -> subprocess.Popen:
    """`conch kd retrain` started, once its run has saved the checkpoint of `step` (the test's progress
    mark: what it waits for is the run's own checkpoint, not a time)."""
    proc = subprocess.Popen([sys.executable, "-m", "conch_dna.cli", "kd", "retrain", "--domain", "memory",
                             "--force"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "CONCH_HOME": str(home), "PYTHONPATH": str(ROOT)})
    folder = home / "adapters_kd" / "memory"
    deadline = time.monotonic() + 300
    while not list(folder.glob(f".candidate-*/checkpoint_{step}")):
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, "no checkpoint"
        time.sleep(0.05)
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_local_retrain_is_interrupted_keeps_its_checkpoint_and_is_not_a_failure(tmp_path, sig):
    home = tmp_path / "home"
    write_config(home, failure_limit=1)  # one counted failure would set the traces aside
    (home / "config.toml").write_text((home / "config.toml").read_text().replace("num_iters = 40",
                                                                                 "num_iters = 80"))
    drop(home, "m.jsonl", teacher_traces("memory", 40, seed=5))
    assert conch(home, "traces", "import", str(home / "inbox" / "m.jsonl")).returncode == 0
    proc = retrain_until_step(home, 10)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    assert "stopping at the next step" in out and "memory: interrupted: interrupted at step" in out
    store = store_of(home)
    [run] = store.runs("memory")
    assert run.status is RunStatus.INTERRUPTED and "resumes from its checkpoint" in run.reason
    assert store.failure_streak("memory") == [] and store.set_asides("memory") == []
    state = json.loads((home / "adapters_kd" / "memory" / ".resume.json").read_text())
    stopped_at = state["iteration"]
    assert stopped_at >= 10 and (home / "adapters_kd" / "memory" / ".resume").is_dir()
    assert not list((home / "adapters_kd" / "memory").glob(".candidate-*"))  # nothing half-written is kept
    # the next run resumes there and finishes
    again = conch(home, "kd", "retrain", "--domain", "memory", "--force")
    assert again.returncode == 0 and "memory: promoted" in again.stdout, again.stdout + again.stderr
    assert store.runs("memory")[0].history[0]["iteration"] > stopped_at


def test_failures_that_are_not_the_traces_never_set_them_aside(tmp_path):
    home = tmp_path / "home"
    write_config(home, failure_limit=2)
    drop(home, "m.jsonl", teacher_traces("memory", 40, seed=6))
    assert conch(home, "traces", "import", str(home / "inbox" / "m.jsonl")).returncode == 0
    config = home / "config.toml"
    good = config.read_text()
    config.write_text(good.replace(json.dumps(str(load_config(home).teacher)), json.dumps(str(tmp_path / "typo"))))
    for _ in range(3):
        failed = conch(home, "kd", "retrain", "--domain", "memory", "--iters", "2", "--force")
        assert failed.returncode == 1 and "memory: failed" in failed.stdout, failed.stdout
    store = store_of(home)
    assert [r.status for r in store.runs("memory")] == [RunStatus.FAILED] * 3
    assert store.set_asides("memory") == [] and set_aside_if_stuck(store, "memory", load_config(home)) is None
    assert len(store.failure_streak("memory")) == 3  # the wait before the next try still grows


def test_a_version_name_taken_by_a_file_is_stepped_over(tmp_path):
    home = tmp_path / "home"
    folder = home / "adapters_kd" / "task"
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapters.safetensors").write_bytes(b"x")
    assert write_version(home, "task", tmp_path / "a") == "v0001"
    (folder / "v0002").write_text("not a version")
    named = []  # on a thread with a deadline: the old code looped for ever here
    worker = threading.Thread(target=lambda: named.append(write_version(home, "task", tmp_path / "b")), daemon=True)
    worker.start()
    worker.join(60)
    assert named == ["v0003"]
    assert list_versions(home, "task") == ["v0001", "v0003"] and (folder / "v0002").read_text() == "not a version"
