"""mlx.launch for a data-parallel worker (`python -m daemon.launch <mlx.launch's arguments>`): the same
launcher, except that a SIGTERM reaches the ranks it started on this machine, which checkpoint and stop
as a lone worker does, instead of ending the launcher under them (they would go on writing to pipes
nobody reads, and rank 0 would never tell the daemon how its run ended).

A rank on another Mac hears of it when its peers stop: its next collective fails and it exits.
"""

from __future__ import annotations

import os
import signal
import sys


def _pass_on(signum, frame) -> None:
    # the launcher's group holds the ranks started here, and nothing else (see main)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        os.killpg(os.getpgrp(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, _pass_on)


def main() -> int:
    try:
        os.setpgid(0, 0)  # a group of its own, so that passing a signal on never reaches the daemon
    except OSError:  # already a group (or session) leader
        pass
    signal.signal(signal.SIGTERM, _pass_on)
    from mlx._distributed_utils.launch import main as launch

    return launch() or 0


if __name__ == "__main__":
    sys.exit(main())
