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
import signal
import sys
import threading

from conch_dna import distributed
from conch_dna.config import load_config
from conch_dna.cycle import retrain_domain
from conch_dna.home import conch_home
from conch_dna.runs import RunStatus
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
    # data-parallel (under mlx.launch): rank 0 speaks for the run; the others only hear whether to stop
    leader = distributed.is_leader()
    callbacks = JSONLines(args.domain, stopping) if leader else Quiet(stopping)
    result = retrain_domain(home, args.domain, config, args.force, callbacks)
    if leader:
        print(json.dumps({"event": "result", **result.__dict__}, default=str), flush=True)
    return 0 if result.status != RunStatus.FAILED else 1


class Quiet(KDCallback):
    """A rank other than 0: nothing said, a stop heard."""

    def __init__(self, stopping: threading.Event):
        self.stopping = stopping

    def should_stop(self) -> bool:
        return self.stopping.is_set()


if __name__ == "__main__":
    sys.exit(main())
