"""Ingesting traces, from JSONL files or one at a time from agent code (`record`): every line ends
up stored, a duplicate, or quarantined with a reason."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path

from conch_dna.config import load_config
from conch_dna.home import DB_FILE, conch_home
from conch_dna.store import TraceStore
from conch_dna.traces import TraceError, parse_trace_line


@dataclass
class IngestReport:
    source: str
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    outcomes: list[str] = field(default_factory=list)  # per line: stored / duplicate / quarantined

    @property
    def lines(self) -> int:
        return len(self.outcomes)


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a JSONL file; a final newline ends the last line rather than starting one."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def ingest_bytes(store: TraceStore, data: bytes, source: str) -> IngestReport:
    """Ingest one file's content in one transaction: all of it lands, or none of it does.

    Re-ingesting the same content is harmless: traces are keyed by content and quarantined
    lines by (file hash, line number), so a crash between commit and cleanup stores nothing twice.
    """
    source_hash = hashlib.sha256(data).hexdigest()
    report = IngestReport(source)
    traces, kinds, bad = [], [], []
    for number, raw in enumerate(split_lines(data), start=1):
        try:
            traces.append(parse_trace_line(raw, store.domains))
            kinds.append(None)
        except TraceError as exc:
            bad.append((number, str(exc), raw))
            kinds.append("quarantined")
    with store.write() as conn:
        fresh = iter(store.add(traces, source, conn))
        store.quarantine(bad, source, source_hash, conn)
    for kind in kinds:
        outcome = kind or ("stored" if next(fresh) else "duplicate")
        report.outcomes.append(outcome)
    report.stored = report.outcomes.count("stored")
    report.duplicates = report.outcomes.count("duplicate")
    report.quarantined = report.outcomes.count("quarantined")
    return report


def read_regular_file(path: str | Path, follow_links: bool = False) -> bytes:
    """A regular file's bytes; a FIFO, folder or device (or a link, unless follow_links) raises
    ValueError without being read.

    O_NOFOLLOW and O_NONBLOCK make the open itself safe (no link followed, no wait for a FIFO's
    writer), and fstat checks what was opened, not what the name pointed to a moment before.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | (0 if follow_links else os.O_NOFOLLOW))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; only regular files are ingested") from None
        raise
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file; only regular files are ingested")
        return f.read()


def ingest_file(store: TraceStore, path: str | Path, source: str | None = None,
                follow_links: bool = False) -> IngestReport:
    """Ingest a regular file (see read_regular_file); the inbox never follows links, a person may."""
    path = Path(path)
    return ingest_bytes(store, read_regular_file(path, follow_links), source or path.name)


_stores: dict[str, TraceStore] = {}
_stores_lock = threading.Lock()


def home_store() -> TraceStore:
    """The TraceStore of $CONCH_HOME with the home's config.toml settings (its domains and held-out
    fraction, as the daemon opens it), opened once per process."""
    home = conch_home()
    with _stores_lock:
        key = str(home / DB_FILE)
        if key not in _stores:
            _stores[key] = TraceStore.for_home(home, load_config(home))
        return _stores[key]


def record(domain: str, messages: list[dict], teacher: str, topk: dict | None = None,
           meta: dict | None = None, store: TraceStore | None = None) -> str | None:
    """Keep one teacher answer as a trace; agent code calls this after each EGO call.

    `messages`: the OpenAI-style chat, the teacher's assistant answer last. `topk`: optional
    {"token_ids": [[int] * k] * n, "logprobs": [[float] * k] * n, "tokenizer": fingerprint}, one
    row per answer token. `store` defaults to $CONCH_HOME's (home_store()).
    Returns the trace id, or None when the trace is invalid: then it is quarantined with the
    reason (never silently dropped) and the agent carries on.
    """
    store = store or home_store()
    data = {"domain": domain, "messages": messages, "teacher": teacher, "topk": topk,
            "meta": meta or {}}
    raw = json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
    try:
        trace = parse_trace_line(raw, store.domains)
    except TraceError as exc:
        store.quarantine([(0, str(exc), raw)], "record()", hashlib.sha256(raw).hexdigest())
        return None
    store.add([trace], "record()")
    return trace.trace_id()
