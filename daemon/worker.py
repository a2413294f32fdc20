"""The trainer worker: one retrain cycle in its own process (`python -m daemon.worker --domain D`), or, under
mlx.launch, one rank of a data-parallel cycle.

MLX is not thread-safe and a crash in training must not take the daemon down, so every cycle runs
here. SIGTERM stops training after the current step: the adapter so far is kept as a checkpoint,
the run is recorded as interrupted, the current adapter is untouched, and the next cycle of the
domain resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time

from conch_dna.lifecycle.cycle import retrain_domain
from conch_dna.settings.config import load_config
from conch_dna.system import distributed
from conch_dna.system.home import conch_home
from conch_dna.traces.runs import RunStatus
from conch_dna.training.callbacks import KDCallback


class JSONLines(KDCallback):
    """Training progress as JSON lines on stdout (the daemon's log); stops when `stopping` is set."""

    def __init__(self, domain: str, stopping: threading.Event):
        self.domain, self.stopping = domain, stopping

    def on_stage(self, domain: str, text: str) -> None:
        print(json.dumps({"event": "stage", "domain": domain or self.domain, "text": text}), flush=True)

    def on_train_report(self, report: dict) -> None:
        print(json.dumps({"event": "progress", "domain": self.domain, **report}), flush=True)

    def should_stop(self) -> bool:
        return self.stopping.is_set()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.worker")
    p.add_argument("--domain", required=True)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)

    stopping = threading.Event()  # checked between steps: the cycle checkpoints and returns
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    home = conch_home()
    config = load_config(home).with_iters(args.domain, args.iters)
    if distributed.size() > 1:
        end_if_stuck(stopping, config.distributed.timeout_s)
    # data-parallel (under mlx.launch): rank 0 speaks for the run; the others only hear whether to stop
    leader = distributed.is_leader()
    callbacks = JSONLines(args.domain, stopping) if leader else Quiet(stopping)
    result = retrain_domain(home, args.domain, config, args.force, callbacks)
    if leader:
        print(json.dumps({"event": "result", **result.__dict__}, default=str), flush=True)
    return 0 if result.status != RunStatus.FAILED else 1


def end_if_stuck(stopping: threading.Event, grace_s: float) -> None:
    """A rank of a data-parallel run still here `grace_s` after it was asked to stop is stuck (mlx.launch
    would wait for it for ever, and the daemon for mlx.launch): it ends itself."""
    def give_up() -> None:
        stopping.wait()
        time.sleep(grace_s)
        print(f"conch: rank {distributed.rank()} did not stop within {grace_s:.0f} s of being asked to",
              file=sys.stderr, flush=True)
        os._exit(distributed.EXIT_RANK_FAILED)

    threading.Thread(target=give_up, name="conch-stop-grace", daemon=True).start()


class Quiet(KDCallback):
    """A rank other than 0: nothing said, a stop heard."""

    def __init__(self, stopping: threading.Event):
        self.stopping = stopping

    def should_stop(self) -> bool:
        return self.stopping.is_set()


if __name__ == "__main__":
    sys.exit(main())
