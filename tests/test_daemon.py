"""The daemon as a real process on the tiny kit: ingest, retrain, validate, promote; and its faults."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH, corpus
from conch_dna.models.versions import current_version, list_versions, read_manifest
from conch_dna.settings.config import load_config
from conch_dna.traces.store import TraceStore

from tests.conftest import Hooks, retrain, run_module

ROOT = Path(__file__).resolve().parents[1]


def write_config(home: Path, **extra) -> None:
    home.mkdir(parents=True, exist_ok=True)
    settings = {"teacher": TEACHER_PATH, "student": STUDENT_PATH, "domains": ["debug", "memory"],
                "retrain_threshold": 24, "check_minutes": 0.02, "min_heldout": 4, "heldout_fraction": 0.25,
                "replay_count": 8, **extra}
    lines = [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    # off-policy: these tests are about the service, and on the kit on-policy KD does not pay (README)
    lines += ["[kd]", "num_iters = 40", "learning_rate = 1e-3", "lora_rank = 8", "max_answer_tokens = 64",
              "steps_per_save = 10", "on_policy = 0"]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def teacher_traces(domain: str, n: int, seed: int) -> list[str]:
    return [json.dumps({"domain": domain, "teacher": TEACHER_PATH, "messages": d})
            for d in corpus.dialogues(n, seed=seed, domains=[domain])]


def noise_traces(domain: str, n: int, seed: int) -> list[str]:
    return [json.dumps({"domain": domain, "teacher": TEACHER_PATH, "messages": d})
            for d in corpus.noise_dialogues(domain, n, seed)]


def drop(home: Path, name: str, lines: list[str]) -> None:
    inbox = home / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    tmp = inbox / f".{name}.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.rename(tmp, inbox / name)


def start_daemon(home: Path) -> subprocess.Popen:
    env = {**os.environ, "CONCH_HOME": str(home), "PYTHONPATH": str(ROOT)}
    log = open(home / "daemon-test.log", "w")  # noqa: SIM115 - a file, never a pipe nobody drains
    return subprocess.Popen([sys.executable, "-m", "conch_dna.cli", "daemon", "run"], env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def wait_for(condition, timeout: float, proc: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (value := condition()):
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}")
        time.sleep(0.25)
    raise AssertionError("timed out")


def status(home: Path) -> dict:
    proc = run_module("conch_dna.cli", "kd", "status", "--json", env={"CONCH_HOME": str(home)})
    assert proc.returncode == 0, proc.stderr
    return {d["domain"]: d for d in json.loads(proc.stdout)["domains"]} | {"_": json.loads(proc.stdout)}


def test_daemon_ingests_retrains_promotes_and_rejects_noise(tmp_path):
    home = tmp_path / "home"
    write_config(home)
    daemon = start_daemon(home)
    try:
        drop(home, "good.jsonl", teacher_traces("debug", 48, seed=5))
        wait_for(lambda: current_version(home, "debug") == "v0001", 240, daemon)
        s = status(home)
        assert s["_"]["daemon"]["running"] is True
        assert s["debug"]["version"] == "v0001" and s["debug"]["metrics"]["kl"] > 0
        assert s["debug"]["last_run"]["status"] == "promoted"
        assert s["memory"]["version"] == "base"

        drop(home, "noise.jsonl", noise_traces("debug", 48, seed=6))
        runs = lambda: TraceStore.for_home(home, load_config(home)).runs("debug")  # noqa: E731
        wait_for(lambda: len(runs()) == 2 and runs()[0].status != "running", 240, daemon)
        last = runs()[0]
        assert last.status == "rejected", last
        assert current_version(home, "debug") == "v0001" and list_versions(home, "debug") == ["v0001"]
        assert not list((home / "adapters_kd" / "debug").glob(".candidate-*"))
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0
    assert not (home / "daemon.json").exists()


def test_too_few_heldout_traces_needs_force(tmp_path):
    home = tmp_path / "home"
    write_config(home, min_heldout=1000)
    store = TraceStore.for_home(home, load_config(home))
    from conch_dna.traces.ingest import ingest_bytes

    ingest_bytes(store, "\n".join(teacher_traces("memory", 30, seed=9)).encode(), "m.jsonl")
    result = retrain(home, "memory", 5)
    assert result.status == "rejected" and "--force" in result.reason
    assert current_version(home, "memory") is None
    forced = retrain(home, "memory", 5, force=True)
    assert forced.status == "promoted" and current_version(home, "memory") == "v0001"
    assert "forced" in read_manifest(home, "memory")["history"][0]["reason"]


def test_worker_killed_mid_training_is_a_failed_run_and_the_next_check_retries(tmp_path):
    home = tmp_path / "home"
    write_config(home)
    config = home / "config.toml"
    config.write_text(config.read_text().replace("num_iters = 40", "num_iters = 100000"))
    daemon = start_daemon(home)
    try:
        drop(home, "good.jsonl", teacher_traces("debug", 48, seed=5))
        state = lambda: json.loads((home / "daemon.json").read_text()) if (home / "daemon.json").exists() else {}  # noqa: E731,E501
        wait_for(lambda: (state().get("running") or {}).get("progress"), 240, daemon)
        worker_pid = TraceStore.for_home(home, load_config(home)).runs("debug")[0].pid
        os.kill(worker_pid, signal.SIGKILL)
        runs = lambda: TraceStore.for_home(home, load_config(home)).runs("debug")  # noqa: E731
        wait_for(lambda: runs()[-1].status == "failed", 60, daemon)
        assert "killed by signal 9" in runs()[-1].reason
        assert current_version(home, "debug") is None  # nothing half-written became current
        wait_for(lambda: len(runs()) >= 2, 60, daemon)  # the next check retries
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=300) == 0  # SIGTERM mid-training: a clean exit
    assert all(r.status != "running" for r in runs())
    assert runs()[0].status == "interrupted", runs()[0]  # SIGTERM: recorded, not lost


def test_interrupted_cycle_keeps_a_checkpoint_and_the_next_one_resumes(tmp_path):
    home = tmp_path / "home"
    write_config(home, min_heldout=1000)
    store = TraceStore.for_home(home, load_config(home))
    from conch_dna.traces.ingest import ingest_bytes

    ingest_bytes(store, "\n".join(teacher_traces("memory", 30, seed=4)).encode(), "m.jsonl")
    stop = []
    first = retrain(home, "memory", 30, callbacks=Hooks(lambda r: stop.append(r["iteration"]), lambda: bool(stop)))
    assert first.status == "interrupted" and "step 10" in first.reason
    resume = json.loads((home / "adapters_kd" / "memory" / ".resume.json").read_text())
    assert resume["iteration"] == 10
    assert (home / "adapters_kd" / "memory" / ".resume" / "adapters.safetensors").is_file()
    assert (home / "adapters_kd" / "memory" / ".resume" / "optimizer.safetensors").is_file()  # Adam's moments
    assert current_version(home, "memory") is None

    second = retrain(home, "memory", 30, force=True)
    assert second.status == "promoted"
    history = TraceStore.for_home(home, load_config(home)).runs("memory")[0].history
    assert [h["iteration"] for h in history] == [20, 30]  # steps 1-10 were not done again
    version = home / "adapters_kd" / "memory" / current_version(home, "memory")
    assert (version / "adapters.safetensors").is_file() and not list(version.glob("checkpoint_*"))
    assert not (home / "adapters_kd" / "memory" / ".resume.json").exists()


def test_captured_topk_is_used_without_a_teacher_pass(tmp_path):
    from conch_dna.models.chat import encode_chat
    from conch_dna.models.loading import tokenizer_fingerprint
    from conch_dna.training.targets.teacher import TeacherCache, TeacherScorer

    from mlx_lm import load

    _, tokenizer = load(STUDENT_PATH)
    chat = corpus.dialogues(1, seed=3, domains=["memory"])[0]
    tokens, offset = encode_chat(tokenizer, chat)
    n = len(tokens) - offset
    assert n > 3
    answer = tokens[offset:]
    rows = [[t] + [x for x in range(6) if x != t][:4] for t in answer[:-1]]  # no row for the final "\n"
    topk = {"token_ids": rows, "logprobs": [[-0.1, -3, -4, -5, -6]] * len(rows),
            "tokenizer": tokenizer_fingerprint(tokenizer)}
    scorer = TeacherScorer(TEACHER_PATH, TeacherCache(tmp_path), top_k=8, vocab_limit=len(tokenizer))
    ex = scorer.example(chat, tokenizer, topk, tokenizer_fingerprint(tokenizer))
    assert scorer.forward_passes == 0 and not scorer.loaded
    assert ex.topk_ids.shape == (n, 8) and (ex.topk_ids[:, 0] == answer).all()
    assert ex.topk_logprobs[-1, 0] == 0  # the template's own last token: certain
    assert (ex.topk_logprobs[:-1, 5:] == -30).all()  # padded buckets carry no teacher mass
    # another tokenizer's capture, or one that does not cover the answer, costs a teacher pass
    scorer.example(chat, tokenizer, {**topk, "tokenizer": "other"}, tokenizer_fingerprint(tokenizer))
    scorer.example(chat, tokenizer, {**topk, "token_ids": rows[1:] + rows[:1]}, tokenizer_fingerprint(tokenizer))
    assert scorer.forward_passes == 1  # the same chat: the misaligned one was served from the cache


PROMOTER = """
import sys, os
from pathlib import Path
from conch_dna.models.versions import promote
home, work = Path(sys.argv[1]), Path(sys.argv[2])
i = 0
while True:
    c = work / f"c{i}"
    c.mkdir(parents=True)
    (c / "adapters.safetensors").write_bytes(os.urandom(200_000))
    (c / "adapter_config.json").write_text('{"i": %d}' % i)
    promote(home, "task", c, f"round {i}")
    i += 1
"""


def test_killed_mid_promotion_the_manifest_is_old_or_new_never_broken(tmp_path):
    for attempt in range(4):
        home, work = tmp_path / f"h{attempt}", tmp_path / f"w{attempt}"
        proc = subprocess.Popen([sys.executable, "-c", PROMOTER, str(home), str(work)],
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        wait_for(lambda: len(list_versions(home, "task")) >= 3, 120)  # noqa: B023
        time.sleep(random.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manifest = read_manifest(home, "task")  # parses: never a torn file
        current = home / "adapters_kd" / "task" / manifest["current"]
        assert (current / "adapters.safetensors").stat().st_size == 200_000
        assert json.loads((current / "adapter_config.json").read_text())["i"] >= 0
        assert manifest["history"][-1]["version"] == manifest["current"]


def test_kd_cli_retrain_history_pin_prune_rollback_without_daemon(tmp_path):
    home = tmp_path / "home"
    write_config(home, min_heldout=1000, keep_versions=1)  # too few held-out: --force promotes whatever
    env = {"CONCH_HOME": str(home)}

    def conch(*args):
        return run_module("conch_dna.cli", *args, env=env)

    drop(home, "m.jsonl", teacher_traces("memory", 30, seed=3))
    assert conch("traces", "import", str(home / "inbox" / "m.jsonl")).returncode == 0
    for round_ in range(3):
        proc = conch("kd", "retrain", "--domain", "memory", "--iters", "5", "--force")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "memory: promoted" in proc.stdout
        if round_ == 0:
            assert "pinned: v0001" in conch("kd", "pin", "--domain", "memory", "--version", "v0001").stdout
    history = json.loads(conch("kd", "history", "--domain", "memory", "--json").stdout)
    assert [h["version"] for h in history] == ["v0003", "v0002", "v0001"]
    assert list_versions(home, "memory") == ["v0001", "v0003"]  # keep 1 + the current + the pinned
    table = conch("kd", "history", "--domain", "memory").stdout
    assert table.count("promoted") == 3 and "v0002" in table
    proc = conch("kd", "rollback", "--domain", "memory")
    assert proc.returncode == 0 and "v0001 is current again" in proc.stdout  # v0002 is gone: the one before
    from conch_dna.training.true_kd import get_kd_adapter_path

    assert get_kd_adapter_path("memory", home).name == "v0001"
    status_table = conch("kd", "status").stdout
    assert "memory" in status_table and "v0001" in status_table and "daemon: not running" in status_table
    for args, words in [(("kd", "retrain", "--domain", "../x"), "invalid domain name"),
                        (("kd", "rollback", "--domain", "memory", "--to", "v0002"), "no version 'v0002'"),
                        (("kd", "pin", "--domain", "memory", "--version", "v0009"), "no version 'v0009'"),
                        (("kd", "retrain", "--domain", "memory", "--iters", "0"), "--iters must be at least 1"),
                        (("traces", "purge-quarantine", "--older-than", "-1"), "--older-than must be 0 or more")]:
        bad = conch(*args)
        assert bad.returncode == 2 and words in bad.stdout, (args, bad.stdout)


def test_kd_retrain_asks_the_running_daemon(tmp_path):
    home = tmp_path / "home"
    write_config(home, retrain_threshold=10_000, min_heldout=1000)  # the daemon never starts one itself
    drop(home, "m.jsonl", teacher_traces("memory", 30, seed=8))
    daemon = start_daemon(home)
    try:
        wait_for(lambda: (home / "daemon.json").exists() and not list((home / "inbox").glob("*.jsonl")), 60, daemon)
        proc = run_module("conch_dna.cli", "kd", "retrain", "--domain", "memory", "--iters", "5", "--force",
                          env={"CONCH_HOME": str(home)})
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "asked the running daemon" in proc.stdout and "memory: promoted" in proc.stdout
        run = TraceStore.for_home(home, load_config(home)).runs("memory")[0]
        assert run.pid != os.getpid() and run.status == "promoted"  # trained by the daemon's worker
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=30) == 0


def test_worker_never_imports_a_daemon_package_from_the_current_directory(tmp_path):
    from daemon.service import worker_command

    hostile = tmp_path / "cwd"
    (hostile / "daemon").mkdir(parents=True)
    (hostile / "daemon" / "__init__.py").write_text("")
    (hostile / "daemon" / "worker.py").write_text(f"open({str(tmp_path / 'pwned')!r}, 'w').write('x')\n")
    cmd = worker_command("task")
    done = subprocess.run([*cmd[: cmd.index("daemon.worker") + 1], "--help"], cwd=hostile, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "--domain" in done.stdout, done.stderr
    assert not (tmp_path / "pwned").exists()


def test_a_stale_state_file_whose_pid_was_reused_is_not_a_running_daemon(tmp_path):
    import fcntl

    from conch_dna.lifecycle.status import LOCK_FILE, STATE_FILE, read_state

    home = tmp_path / "home"
    home.mkdir()
    (home / STATE_FILE).write_text(json.dumps({"pid": os.getpid(), "running": None}))  # alive, not a daemon
    assert read_state(home) is None
    (home / LOCK_FILE).touch()
    assert read_state(home) is None  # a lock file nobody holds
    with open(home / LOCK_FILE, "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert read_state(home)["pid"] == os.getpid()


def test_malformed_retrain_requests_are_answered_and_block_nothing(tmp_path):
    from daemon.service import Daemon

    home = tmp_path / "home"
    daemon = Daemon(home)
    requests = home / "requests"
    requests.mkdir(mode=0o700)
    bad = {"1-list.json": b"[1, 2]", "2-bytes.json": b"\xff\xfe not json", "3-domain.json": b'{"domain": "../etc"}',
           "4-unknown.json": b'{"domain": "legal"}', "5-iters.json": b'{"domain": "task", "iters": "many"}',
           "6-none.json": b"{}"}
    for name, raw in bad.items():
        (requests / name).write_bytes(raw)
    daemon.take_requests()
    answers = {p.name: json.loads(p.read_text()) for p in requests.glob("*.done.json")}
    assert sorted(answers) == sorted(n.replace(".json", ".done.json") for n in bad)
    assert all(a["status"] == "failed" and a["reason"].startswith("bad request") for a in answers.values())
    assert "iters must be a positive integer" in answers["5-iters.done.json"]["reason"]
    assert not [p for p in requests.glob("*.json") if not p.name.endswith(".done.json")]
