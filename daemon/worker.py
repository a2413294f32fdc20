"""The trainer worker: one retrain cycle in its own process (`python -m daemon.worker --domain D`).

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

from conch_dna.cycle import retrain_domain
from conch_dna.home import conch_home


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.worker")
    p.add_argument("--domain", required=True)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)

    stopping = threading.Event()  # checked between steps: the cycle checkpoints and returns
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())

    def progress(report: dict) -> None:
        print(json.dumps({"event": "progress", "domain": args.domain, **report}), flush=True)

    result = retrain_domain(conch_home(), args.domain, iters=args.iters, force=args.force,
                            on_report=progress, should_stop=stopping.is_set)
    print(json.dumps({"event": "result", **result.__dict__}, default=str), flush=True)
    return 0 if result.status != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
