"""The clients of a retrain that runs elsewhere: a running daemon asked to retrain a domain (through its
requests folder), and the ranks of a data-parallel retrain under mlx.launch (rank 0's JSON events read as
they come). Each returns the run's (status, reason); what to show of its progress is the caller's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from conch_dna.lifecycle.status import read_state
from conch_dna.settings.config import load_config
from conch_dna.traces.store import TraceStore

from daemon.service import request_retrain, worker_command


class DaemonGone(RuntimeError):
    """The daemon stopped before it answered a request."""


def retrain_through_daemon(home: Path, domain: str, iters: int | None, force: bool,
                           poll_s: float = 0.5) -> tuple[str, str]:
    """Ask the running daemon to retrain `domain` and wait for its answer; DaemonGone if it stops first."""
    answer = request_retrain(home, domain, iters, force)
    while not answer.exists():
        if not read_state(home):
            raise DaemonGone("the daemon stopped before answering")
        time.sleep(poll_s)
    result = json.loads(answer.read_text())
    answer.unlink(missing_ok=True)
    return str(result.get("status", result.get("event"))), result.get("reason", "")


def retrain_in_parallel(home: Path, domain: str, iters: int | None, force: bool, parallel,
                        on_event: Callable[[dict], None] = lambda event: None,
                        on_stop: Callable[[], None] = lambda: None) -> tuple[str, str]:
    """The worker under mlx.launch, one rank per process; rank 0's stage and progress events go to
    `on_event` as they come. Ctrl-C here is one SIGTERM to the launcher (`on_stop` is told), which passes it
    on: the ranks checkpoint, and the next retrain resumes."""
    cmd = worker_command(domain, iters, force, parallel)
    started = time.time()
    # a session of its own, so that Ctrl-C here becomes one SIGTERM to the launcher, which passes it on
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "CONCH_HOME": str(home)},
                            start_new_session=True)
    result = {"status": "failed", "reason": "the ranks exited without a result"}
    lines = iter(proc.stdout)
    while True:
        try:
            line = next(lines, None)
        except KeyboardInterrupt:
            on_stop()
            proc.send_signal(signal.SIGTERM)
            continue
        if line is None:
            break
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "result":
            result = event
        elif isinstance(event, dict):
            on_event(event)
    code = proc.wait()
    if "event" not in result:  # rank 0 ended without a word (a rank that hung): its run record says why
        latest = next(iter(TraceStore.for_home(home, load_config(home)).runs(domain, 1)), None)
        if latest is not None and latest.started_at >= started:
            result = {"status": str(latest.status), "reason": latest.reason}
    if code and result.get("status") != "failed":
        result = {"status": "failed", "reason": f"a rank exited with status {code}"}
    return str(result.get("status")), result.get("reason") or ""
