"""What a domain's failed runs lead to: a growing wait before the next try and, past a limit,
setting aside the traces they keep failing on."""

from __future__ import annotations

from itertools import takewhile

from conch_dna.settings.config import Config
from conch_dna.traces.runs import NOT_THE_TRACES
from conch_dna.traces.store import TraceStore


def retry_at(store: TraceStore, domain: str, config: Config) -> float | None:
    """When the daemon may try a domain again whose last runs failed (None: no failures, now).

    After n failures in a row it waits check_minutes · 2^(n-1), at most max_backoff_minutes, so a
    failure that does not go away (a missing model, a full disk) costs a model load a day, not one
    every check (systemd's restart back-off, a queue's retry delay).
    """
    streak = store.failure_streak(domain)
    if not streak:
        return None
    wait = min(config.check_minutes * 2 ** (len(streak) - 1), config.max_backoff_minutes)
    return streak[0].finished_at + wait * 60


def set_aside_if_stuck(store: TraceStore, domain: str, config: Config) -> str | None:
    """After failure_limit failed runs in a row on the same traces, move the domain past them
    (a dead letter: kept, counted, with the last error) so new traces are trained again.
    Returns the reason recorded, or None. Call it holding the domain's lock (a checkpoint of the
    traces set aside is dropped by the next cycle, which finds them consumed)."""
    streak = [run for run in store.failure_streak(domain) if run.decision != NOT_THE_TRACES]
    if not streak:
        return None
    upto = streak[0].upto_rowid
    same = len(list(takewhile(lambda run: run.upto_rowid == upto, streak)))
    mark = store.trained_upto(domain)
    if upto is None or same < config.failure_limit or upto <= mark:
        return None
    reason = f"{same} runs in a row failed on the traces after #{mark} up to #{upto}; last: {streak[0].reason}"
    traces = store.set_aside(domain, mark, upto, reason)
    return f"set aside {traces} train traces: {reason}"
