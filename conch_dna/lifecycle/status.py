"""What `conch kd status` reports: per domain counts, version, metrics and last run, and whether the
daemon runs (its state file, written by the daemon, read by anyone)."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from conch_dna.lifecycle.acceptance import read_acceptance
from conch_dna.lifecycle.failures import retry_at
from conch_dna.models.adapters import KD_METRICS_FILE
from conch_dna.models.versions import domain_dir, version_label
from conch_dna.traces.runs import format_words, tool_words
from conch_dna.traces.store import TraceStore

STATE_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"  # held (flock, exclusive) by the running daemon for its whole life


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def daemon_holds_lock(home: str | Path) -> bool:
    """Whether a daemon holds the home's lock: the truth about whether one runs, where a stale state
    file's pid may since have been given to another process."""
    try:
        fd = os.open(Path(home) / LOCK_FILE, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # conflicts with the daemon's exclusive lock
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing drops a shared lock we got
    return False


def read_state(home: str | Path) -> dict | None:
    """The running daemon's state file, or None when no daemon runs (its lock is not held)."""
    try:
        state = json.loads((Path(home) / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return state if pid_alive(state.get("pid")) and daemon_holds_lock(home) else None


def metric_cells(metrics: dict | None) -> tuple[str, str, str, str, str]:
    """A version's held-out KL, on-policy KL, top-1, tool calls (the share right, the share that parse) and
    answers asked in a response_format (the share that validate, free and held) as table cells; "-" where
    unmeasured."""
    own = (metrics or {}).get("on_policy")
    return (f"{metrics['kl']:.4f}" if metrics else "-", f"{own['kl']:.4f}" if own else "-",
            f"{metrics['agreement']:.1%}" if metrics else "-", tool_words((metrics or {}).get("tool_calls")),
            format_words((metrics or {}).get("formats")))


def kd_status_data(home, config) -> dict:
    """What `conch kd status --json` prints: per domain counts, version, metrics, last run; the daemon."""
    store = TraceStore.for_home(home, config)
    state = read_state(home)
    domains = []
    answered = {(r["domain"], r["version"]): r for r in store.auto_answers()}
    for c in store.stats():
        version = version_label(home, c.domain)
        metrics_file = domain_dir(home, c.domain) / version / KD_METRICS_FILE
        metrics = None
        if version.startswith("v") and metrics_file.exists():
            metrics = json.loads(metrics_file.read_text()).get("heldout_after")
        runs = store.runs(c.domain, limit=1)
        last = runs[0] if runs else None
        set_aside = store.set_asides(c.domain)
        rule = read_acceptance(domain_dir(home, c.domain) / version) if version.startswith("v") else None
        domains.append({
            "domain": c.domain, "train": c.train, "heldout": c.heldout, "new": c.new_train,
            "threshold": config.threshold(c.domain), "version": version,
            "metrics": metrics,
            "auto": auto_figures(answered.get((c.domain, version)), rule),
            "failures_in_a_row": len(store.failure_streak(c.domain)),
            "retry_at": retry_at(store, c.domain, config),
            "set_aside_traces": sum(b["traces"] for b in set_aside),
            "last_set_aside": set_aside[0] if set_aside else None,
            "last_run": {k: last.as_dict()[k] for k in ("id", "status", "reason", "started_at", "finished_at",
                                                        "version")} if last else None,
        })
    return {"home": str(home), "daemon": {"running": state is not None, "pid": state and state["pid"],
                                          "next_check": state and state.get("next_check"),
                                          "training": state and state.get("running")},
            "domains": domains}


def auto_figures(counts: dict | None, rule: dict | None) -> dict:
    """auto/<domain> on one version: calls served by the student, deferred, served unverified; the share the
    student served and the share its rule expected; the teacher's seconds on deferred calls and, at their mean,
    the seconds the served calls saved; of the deferred calls compared, the share the student had right."""
    c = {k: (counts or {}).get(k, 0) for k in ("served", "deferred", "unverified", "compared", "agreed")}
    teacher_s = (counts or {}).get("teacher_seconds", 0.0)
    calls = c["served"] + c["deferred"] + c["unverified"]
    return {**c, "calls": calls, "teacher_seconds": teacher_s,
            "share_served": c["served"] / calls if calls else None,
            "expected_share": rule.get("expected_share") if rule else None,
            "teacher_seconds_saved": c["served"] * teacher_s / c["deferred"] if c["deferred"] else None,
            "would_have_been_right": c["agreed"] / c["compared"] if c["compared"] else None}


def auto_words(auto: dict) -> str:
    """auto/'s figures of a version in a few characters: served of calls (share; expected share)."""
    expected = f"expected {auto['expected_share']:.0%}" if auto.get("expected_share") is not None else "no rule"
    if not auto["calls"]:
        return f"- ({expected})"
    return f"{auto['served']} of {auto['calls']} ({auto['share_served']:.0%}; {expected})"
