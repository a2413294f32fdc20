"""A process that used the neurons exits with status 0: no thread that touched MLX is left to die
inside a C++ destructor while the interpreter finalizes (conch_dna.system.mlx_thread says why)."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from conch_dna.kit import STUDENT_PATH
from conch_dna.system.mlx_thread import MLXThread, MLXThreadClosed

import httpx
import mlx.core as mx
import pytest

ROOT = Path(__file__).resolve().parents[1]

# Makes a thread left behind abort the process every time rather than now and then: the main thread
# keeps the GIL from the script's end until the interpreter finalizes, and gives it away only then
# (a __del__ that runs while modules are torn down), so a thread still waiting for it to run its
# thread-local destructors is made to exit there, inside one.
PRELUDE = """
import sys, threading, time
class SleepsWhileFinalizing:
    def __del__(self):
        time.sleep(0.05)
guard = SleepsWhileFinalizing()
def keep_the_gil_until_exit():
    sys.setswitchinterval(30.0)
"""

REGISTRY = PRELUDE + """
from neurons import NeuronRegistry
registry = NeuronRegistry(sys.argv[1])
DOMAINS = ["thinking", "task", "action", "reflection", "debug", "memory", "task", "thinking"]
answers = []
def ask(domain):
    answers.append(registry.get(domain).generate("Plan how to send the email.", max_tokens=MAX_TOKENS))
"""

SCRIPTS = {
    "used then closed": REGISTRY.replace("MAX_TOKENS", "8") + """
threads = [threading.Thread(target=ask, args=(d,)) for d in DOMAINS]
[t.start() for t in threads]
[t.join() for t in threads]
assert len(answers) == 8 and all(answers), answers
registry.close()
registry.close()
keep_the_gil_until_exit()
""",
    "used and never closed": REGISTRY.replace("MAX_TOKENS", "8") + """
ask("task")
assert answers[0]
keep_the_gil_until_exit()
""",
    "neurons.get at module level": PRELUDE + """
import os
os.environ["CONCH_HOME"] = sys.argv[1]
import neurons
assert neurons.get("thinking").generate("Why does ice float?", max_tokens=8)
keep_the_gil_until_exit()
""",
    "8 calls in flight when the script returns": REGISTRY.replace("MAX_TOKENS", "48") + """
threads = [threading.Thread(target=ask, args=(d,)) for d in DOMAINS]
[t.start() for t in threads]
while registry.stats()["running"] == 0:  # the calls are decoding when the script returns
    time.sleep(0.01)
keep_the_gil_until_exit()
""",
}


def kit_home(path: Path) -> Path:
    path.mkdir()
    (path / "config.toml").write_text(f'student = "{STUDENT_PATH}"\n[server]\nmax_tokens = 512\n')
    return path


def assert_clean_exit(name: str, code: int, stderr: str) -> None:
    assert code == 0, f"{name}: exit status {code}\n{stderr}"
    assert "terminate called" not in stderr, f"{name}:\n{stderr}"
    assert "Traceback" not in stderr, f"{name}:\n{stderr}"


def test_a_process_that_used_the_neurons_exits_with_status_0(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    runs = {name: subprocess.Popen([sys.executable, "-c", script, str(kit_home(tmp_path / f"home{i}"))],
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i, (name, script) in enumerate(SCRIPTS.items())}
    for name, run in runs.items():
        _, stderr = run.communicate(timeout=300)
        assert_clean_exit(name, run.returncode, stderr)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_conch_serve_stopped_by_sigterm_mid_stream_finishes_the_stream_and_exits_0(tmp_path):
    home, port = kit_home(tmp_path / "home"), free_port()
    server = subprocess.Popen([sys.executable, "-m", "conch_dna.cli", "serve", "--port", str(port)],
                              env={**os.environ, "PYTHONPATH": str(ROOT), "CONCH_HOME": str(home)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        while True:
            assert server.poll() is None, server.communicate()[1]
            try:
                httpx.get(f"{url}/models", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        events = []
        body = {"model": "task", "stream": True, "max_tokens": 512,
                "messages": [{"role": "user", "content": "Plan how to send the email."}]}
        with httpx.stream("POST", f"{url}/chat/completions", json=body, timeout=120) as response:
            for line in filter(None, response.iter_lines()):
                events.append(line)
                if len(events) == 2:
                    server.send_signal(signal.SIGTERM)
        _, stderr = server.communicate(timeout=120)
    finally:
        if server.poll() is None:
            server.kill()
    assert events[-1] == "data: [DONE]", events[-3:]  # the answer in flight was finished, not cut
    assert_clean_exit("conch serve", server.returncode, stderr)


def test_an_mlx_thread_runs_its_close_hook_last_and_refuses_work_after_close():
    thread = MLXThread("test")
    ran = []
    thread.on_close = lambda: ran.append("closed")
    assert thread.call(lambda: mx.sum(mx.arange(4)).item()) == 6
    thread.submit(ran.append, "queued before close")
    thread.close()
    thread.close()
    assert ran == ["queued before close", "closed"]
    assert thread.closed and not thread._thread.is_alive()
    with pytest.raises(MLXThreadClosed, match="closed"):
        thread.call(ran.append, "after close")
