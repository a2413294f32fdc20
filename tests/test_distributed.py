"""Data-parallel retrains on MLX's distributed engine: two local processes over the ring backend on
loopback (started by mlx.launch, as on two Macs) train what one process trains, score each trace once
between them, and a rank that dies mid-run fails the run cleanly; the next run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from conch_dna.settings.config import DistributedSettings, load_config
from conch_dna.traces.ingest import ingest_bytes
from conch_dna.traces.store import TraceStore

import numpy as np
import pytest
from safetensors.numpy import load_file
from test_daemon import teacher_traces, write_config

from daemon.service import worker_command

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "daemon.launch", "--backend", "ring", "-n", "2", "--python", sys.executable]

DISTIL = """
import json, sys
from pathlib import Path
from conch_dna.system import distributed
from conch_dna.kit import TEACHER_PATH, STUDENT_PATH, corpus
from conch_dna.training.true_kd import DistillOptions, KDConfig, TrueKnowledgeDistiller
out = Path(sys.argv[1])
config = KDConfig(num_iters=8, batch_size=4, learning_rate=1e-3, lora_rank=8, on_policy=0.0, steps_per_report=4,
                  max_answer_tokens=32)
distiller = TrueKnowledgeDistiller(TEACHER_PATH, STUDENT_PATH, config, output_dir=out,
                                   cache_dir=out / f"cache-{distributed.rank()}")
prompts = corpus.prompts("task", 24, seed=3)
result = distiller.distill_domain("task", prompts[:18], prompts[18:], DistillOptions(adapter_dir=out / "adapter",
                                                                                  measure_on_policy=False))
(out / f"rank{distributed.rank()}.json").write_text(json.dumps({
    "ranks": distributed.size(), "local_passes": distiller.teachers.forward_passes,
    "passes": result.teacher_forward_passes, "before": result.heldout_before, "after": result.heldout_after}))
"""

FAILS = """
import json, os, signal, sys, threading, time
from conch_dna.system import distributed
from conch_dna.settings.config import load_config
from conch_dna.lifecycle.cycle import retrain_domain
from conch_dna.system.home import conch_home
from conch_dna.training.callbacks import KDCallback
from daemon.worker import end_if_stuck

stopping = threading.Event()  # as the worker: mlx.launch signals the ranks left when one ends
signal.signal(signal.SIGTERM, lambda *_: stopping.set())
home = conch_home()
config = load_config(home)
end_if_stuck(stopping, config.distributed.timeout_s)


class FailsAt(KDCallback):  # rank 1 dies, or hangs, as soon as a report says it is past the step
    def on_train_report(self, report):
        if distributed.rank() == 1 and report["iteration"] >= int(sys.argv[3]):
            if sys.argv[2] == "dies":
                os._exit(9)
            while True:
                time.sleep(0.1)

result = retrain_domain(home, sys.argv[1], config, False, FailsAt())
if distributed.is_leader():
    print(json.dumps({"status": str(result.status), "reason": result.reason}), flush=True)
"""


def run(cmd: list[str], home: Path | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **({"CONCH_HOME": str(home)} if home else {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def test_two_ranks_train_what_one_process_trains_and_score_each_trace_once(tmp_path):
    script = tmp_path / "distil.py"
    script.write_text(DISTIL)
    one = run([sys.executable, str(script), str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run([*LAUNCH, str(script), str(tmp_path / "two")])
    assert two.returncode == 0, two.stderr[-3000:]
    alone = json.loads((tmp_path / "one" / "rank0.json").read_text())
    ranks = [json.loads((tmp_path / "two" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert alone["ranks"] == 1 and [r["ranks"] for r in ranks] == [2, 2]
    # 1 process x batch 4 against 2 ranks x 2 rows of the same batches: the same adapter after 8 steps, up to
    # the order the ranks' gradients are summed in. The bound comes from what Adam does with that: each step
    # moves a weight by at most about lr (its update is m/sqrt(v), of size 1 or less), so 8 steps reach at most
    # 8 lr; a reordered float32 sum changes a gradient in its last bits, which Adam turns into a visible change
    # only where that gradient is itself near zero. Held to 1% of the reach (observed: at most 0.2%), and the
    # adapter's whole movement (lora_b starts at zero, so its norm is its movement) to 0.1%.
    a, b = (load_file(str(tmp_path / side / "adapter" / "adapters.safetensors")) for side in ("one", "two"))
    reach = 8 * 1e-3
    assert a.keys() == b.keys() and max(float(np.abs(a[k] - b[k]).max()) for k in a) < 0.01 * reach
    moved = [k for k in a if k.endswith("lora_b")]
    assert np.sqrt(sum(float(np.square(a[k] - b[k]).sum()) for k in moved)) < \
        1e-3 * np.sqrt(sum(float(np.square(a[k]).sum()) for k in moved))
    # the held-out metrics reduced across the ranks: before training the same weights, only summed in another
    # order (float32 over a few hundred tokens: ~1e-6 relative); after it, weights that differ as above
    for side, rel in (("before", 1e-5), ("after", 1e-3)):
        for key in ("kl", "ce", "agreement"):
            assert ranks[0][side][key] == pytest.approx(alone[side][key], rel=rel), (side, key)
            assert ranks[1][side][key] == ranks[0][side][key]
        assert ranks[0][side]["tokens"] == alone[side]["tokens"]
    # one teacher pass per trace in total: each rank scored its share
    assert alone["passes"] == ranks[0]["passes"] == ranks[1]["passes"] == sum(r["local_passes"] for r in ranks)
    assert all(0 < r["local_passes"] < alone["local_passes"] for r in ranks)


def test_a_rank_that_dies_or_hangs_fails_the_run_cleanly_and_the_next_run_resumes(tmp_path):
    home = tmp_path / "home"
    write_config(home)
    config_text = (home / "config.toml").read_text().replace("steps_per_save = 10", "steps_per_save = 10\n"
                                                                                     "steps_per_report = 2")
    (home / "config.toml").write_text(config_text)
    store = TraceStore.for_home(home, load_config(home))
    assert ingest_bytes(store, "\n".join(teacher_traces("debug", 40, 1)).encode(), "t.jsonl").stored == 39
    script = tmp_path / "fails.py"
    script.write_text(FAILS)
    died = run([*LAUNCH, str(script), "debug", "dies", "14"], home)
    said = [line for line in died.stdout.splitlines() if line.startswith("{")]
    assert said, died.stdout + died.stderr[-3000:]
    result = json.loads(said[-1])
    assert result["status"] == "failed" and "a rank is gone" in result["reason"], died.stdout + died.stderr[-2000:]
    assert "resumes from its checkpoint at step 10" in result["reason"]
    (run_record,) = store.runs("debug")
    assert run_record.status == "failed" and run_record.version is None  # nothing half-written is current
    folder = home / "adapters_kd" / "debug"
    assert not list(folder.glob("v0*")) and not list(folder.glob(".candidate-*"))
    assert json.loads((folder / ".resume.json").read_text())["iteration"] == 10
    # the next run resumes; rank 1 hangs at step 12: rank 0 gives up on it after the timeout, says why and
    # keeps the checkpoint; told to stop, the hung rank ends itself after the same time
    config_text = (home / "config.toml").read_text() + "\n[distributed]\ntimeout_s = 5\n"
    (home / "config.toml").write_text(config_text)
    hung = run([*LAUNCH, str(script), "debug", "hangs", "12"], home)
    assert "did not stop within 5 s" in hung.stderr, hung.stderr[-3000:]  # the hung rank, told to stop
    failed = store.runs("debug")[0]
    assert failed.status == "failed" and "a rank did not answer" in failed.reason, failed.reason
    assert "resumes from the checkpoint at step 10 again" in failed.reason
    assert json.loads((folder / ".resume.json").read_text())["iteration"] == 10
    assert not list(folder.glob("v0*")) and not list(folder.glob(".candidate-*"))
    # the next run, through the CLI over two local ranks, goes on from step 10 on the same traces
    again = run([sys.executable, "-m", "conch_dna.cli", "kd", "retrain", "--domain", "debug", "--ranks", "2"], home)
    assert "resuming from" in again.stdout and "at step 10" in again.stdout, again.stdout + again.stderr[-2000:]
    assert store.runs("debug")[0].status in ("promoted", "rejected") and not (folder / ".resume.json").exists()


def test_the_worker_is_launched_once_per_rank_when_the_config_says_so():
    assert worker_command("task")[:4] == [sys.executable, "-I", "-m", "daemon.worker"]
    local = worker_command("task", 8, True, DistributedSettings(local_ranks=2))
    assert local[:4] == [sys.executable, "-I", "-m", "daemon.launch"]  # mlx.launch, passing SIGTERM on
    assert local[4:8] == ["--backend", "ring", "-n", "2"] and local[-5:] == ["--domain", "task", "--iters", "8",
                                                                               "--force"]
    assert local[-6].endswith("daemon/worker.py")
    hosts = worker_command("task", parallel=DistributedSettings(hostfile="/etc/conch/hosts.json", backend="jaccl"))
    assert hosts[4:8] == ["--backend", "jaccl", "--hostfile", "/etc/conch/hosts.json"]
    assert not DistributedSettings().enabled and not DistributedSettings(local_ranks=1).enabled


STOPS = """
import signal, sys, time, os
stopping = []
signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
print(f"rank {os.environ['MLX_RANK']} ready", flush=True)
while not stopping:
    time.sleep(0.05)
print(f"rank {os.environ['MLX_RANK']} stopped", flush=True)
"""


def test_a_sigterm_to_the_launcher_reaches_every_rank_and_the_launcher_waits_for_them(tmp_path):
    script = tmp_path / "stops.py"
    script.write_text(STOPS)
    proc = subprocess.Popen([*LAUNCH, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    ready = {proc.stdout.readline().strip() for _ in range(2)}
    assert ready == {"rank 0 ready", "rank 1 ready"}
    proc.send_signal(signal.SIGTERM)  # as the daemon stops its worker
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert sorted(out.split("\n")[:-1]) == ["rank 0 stopped", "rank 1 stopped"]


PLAN = """
import json, resource, sys
from pathlib import Path
from conch_dna.lifecycle.cycle import _Cycle
from conch_dna.lifecycle.plan import decode_plan, encode_plan
from conch_dna.settings.config import load_config
from conch_dna.system import distributed
from conch_dna.system.home import conch_home
home = conch_home()
blob = b""
if distributed.is_leader():
    cycle = _Cycle(home, "task", load_config(home), True, None)
    picked = cycle.select()
    blob = encode_plan(cycle.plan(picked, {"established": picked.held[:3]}))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
got = distributed.broadcast_bytes(blob, "the plan", chunk=1 << 20)
grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
plan = decode_plan(got)
first = plan["train"][0]
print(json.dumps({"rank": distributed.rank(), "bytes": len(got), "grew": grew, "train": len(plan["train"]),
                  "held": len(plan["held"]), "established": [t["rowid"] for t in plan["groups"]["established"]],
                  "held_rowids": [t["rowid"] for t in plan["held"][:3]], "first_rowid": first["rowid"],
                  "first_topk": first["topk"]["logprobs"][:2].astype(float).tolist(),
                  "first_messages": first["messages"]}), flush=True)
"""


def test_a_plan_of_2000_traces_costs_each_rank_about_the_traces_size_in_the_store(tmp_path):
    """Rank 0 sends the run's plan packed (top-k as the store keeps it, not as JSON numbers) and broadcast in
    chunks (not gathered padded): each rank receives the plan once, at most twice the traces' size in the store,
    and holds little more while it arrives; the held-out set is capped as the train side is."""
    home = tmp_path / "home"
    write_config(home, domains=["task"], max_traces_per_run=2000, max_heldout_per_run=40, heldout_fraction=0.1)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2300):
        n = 64
        lines.append(json.dumps({"domain": "task", "teacher": "t", "messages": [
            {"role": "user", "content": f"Plan step {i} of the day."}, {"role": "assistant", "content": f"Do {i}."}],
            "topk": {"token_ids": rng.integers(0, 500, (n, 8)).tolist(),
                     "logprobs": np.round(-rng.random((n, 8)) * 5, 3).tolist(), "tokenizer": "kit"}}))
    store = TraceStore.for_home(home, load_config(home))
    assert ingest_bytes(store, ("\n".join(lines) + "\n").encode(), "plan").stored == 2300
    out = run([*LAUNCH, str(_script(tmp_path, PLAN))], home)
    assert out.returncode == 0, out.stderr[-3000:]
    ranks = sorted((json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")),
                   key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == [0, 1]
    zero, one = ranks
    assert zero["train"] == 2000 and zero["held"] == 40  # the cap on both sides
    assert one == {**zero, "rank": 1, "grew": one["grew"]}  # the same plan on both ranks
    assert set(one["established"]) == set(one["held_rowids"])  # a group travels as row ids of the held-out
    in_store = store.db.conn.execute(
        "SELECT SUM(length(messages) + COALESCE(length(tools), 0) + length(topk_ids) + length(topk_logprobs)) "
        "FROM (SELECT * FROM traces WHERE split = 'train' ORDER BY rowid LIMIT 2000)").fetchone()[0]
    assert one["bytes"] <= 2 * in_store
    assert one["grew"] <= 2 * in_store  # what the follower held to receive it: the plan, and one chunk


def _script(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "script.py"
    path.write_text(text)
    return path
