"""The trainer worker: one retrain cycle in its own process (`python -m daemon.worker --domain D`).

MLX is not thread-safe and a crash in training must not take the daemon down, so every cycle runs
here. SIGTERM stops training at the next step: the run is recorded as interrupted and the current
adapter is untouched; the daemon's next check retries it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys

from conch_dna.cycle import retrain_domain
from conch_dna.home import conch_home


class Interrupted(BaseException):
    """SIGTERM arrived: stop training now."""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.worker")
    p.add_argument("--domain", required=True)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--force", action="store_true")
    args = p.parse_args(argv)

    def stop(*_):
        raise Interrupted("interrupted by SIGTERM")

    signal.signal(signal.SIGTERM, stop)

    def progress(report: dict) -> None:
        print(json.dumps({"event": "progress", "domain": args.domain, **report}), flush=True)

    try:
        result = retrain_domain(conch_home(), args.domain, iters=args.iters, force=args.force,
                                on_report=progress)
    except Interrupted:
        print(json.dumps({"event": "interrupted", "domain": args.domain}), flush=True)
        return 0
    print(json.dumps({"event": "result", **result.__dict__}, default=str), flush=True)
    return 0 if result.status != "failed" else 1


if __name__ == "__main__":
    sys.exit(main())
