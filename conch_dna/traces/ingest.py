"""Ingesting traces, from JSONL files or one at a time from agent code (`record`): every line ends
up stored, a duplicate, or quarantined with a reason."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import reprlib
import stat
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from conch_dna.models.structured import StructureError, response_format_of
from conch_dna.settings.config import load_config
from conch_dna.system.home import DB_FILE, conch_home
from conch_dna.traces.store import TraceStore
from conch_dna.traces.trace import MAX_LINE_BYTES, TraceError, parse_trace_line


@dataclass
class IngestReport:
    source: str
    stored: int = 0
    duplicates: int = 0
    quarantined: int = 0
    lines: int = 0
    # per line (stored / duplicate / quarantined), kept only when asked for (ingest_bytes): a file
    # streamed from disk may hold millions of lines
    outcomes: list[str] | None = None

    def count(self, outcome: str) -> None:
        self.lines += 1
        field = _COUNTER[outcome]
        setattr(self, field, getattr(self, field) + 1)
        if self.outcomes is not None:
            self.outcomes.append(outcome)


_COUNTER = {"stored": "stored", "duplicate": "duplicates", "quarantined": "quarantined"}
CHUNK_LINES = 1000  # lines per transaction: a crash loses none, re-ingesting stores none twice
QUARANTINE_HEAD_BYTES = 1024  # an oversized line is kept by its first KB


def split_lines(data: bytes) -> list[bytes]:
    """The lines of a JSONL file; a final newline ends the last line rather than starting one."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def read_lines(f: BinaryIO, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[bytes, int]]:
    """(line, its full length) for each line of a binary file, holding at most `limit` + 1 bytes of a
    line: a longer one comes back cut to its first QUARANTINE_HEAD_BYTES, its length telling why."""
    while chunk := f.readline(limit + 1):
        if len(chunk) > limit and not chunk.endswith(b"\n"):
            head, length = chunk[:QUARANTINE_HEAD_BYTES], len(chunk)
            while not chunk.endswith(b"\n") and (chunk := f.readline(limit + 1)):
                length += len(chunk)
            yield head, length - chunk.endswith(b"\n")
            continue
        line = chunk[:-1] if chunk.endswith(b"\n") else chunk
        line = line[:-1] if line.endswith(b"\r") else line
        yield line, len(line)


def kept_bytes(raw: bytes, length: int) -> bytes:
    """What the quarantine keeps of a line: all of it, or the first KB of an oversized one."""
    return raw[:QUARANTINE_HEAD_BYTES] if length > MAX_LINE_BYTES else raw


def prepare_line(store: TraceStore, raw: bytes, length: int | None = None) -> tuple[tuple | None, str | None]:
    """(the row to store, None), or (None, the reason to quarantine it): never raises for a line's content."""
    if length is not None and length > MAX_LINE_BYTES:
        return None, f"line of {length} bytes is over the {MAX_LINE_BYTES}-byte limit (its first KB is kept)"
    try:
        return store.row(parse_trace_line(raw, store.domains)), None
    except TraceError as exc:
        return None, str(exc)
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - whatever a line does, it is kept, with why
        return None, f"cannot be stored: {type(exc).__name__}: {exc}"[:2000]


def ingest_lines(store: TraceStore, lines: Iterable[tuple[bytes, int]], source: str, source_hash: str,
                 report: IngestReport) -> IngestReport:
    """Store or quarantine every line, CHUNK_LINES per transaction.

    Re-ingesting the same content is harmless: traces are keyed by content and quarantined lines
    by (file hash, line number), so a crash between chunks, or between commit and cleanup, stores
    nothing twice and loses nothing.
    """
    rows, kinds, bad = [], [], []
    alike = _AlikeRun()

    def commit():
        with store.write() as conn:
            fresh = iter(store.add_rows(rows, source, conn))
            store.quarantine(bad, source, source_hash, conn)
        for kind in kinds:
            report.count(kind or ("stored" if next(fresh) else "duplicate"))
        rows.clear(), kinds.clear(), bad.clear()

    for number, (raw, length) in enumerate(lines, start=1):
        row, reason = prepare_line(store, raw, length)
        if row is None:
            if (ended := alike.add(number, reason, kept_bytes(raw, length))) is not None:
                bad.append(ended)
            kinds.append("quarantined")
        else:
            if (ended := alike.end()) is not None:
                bad.append(ended)
            rows.append(row)
            kinds.append(None)
        if len(kinds) >= CHUNK_LINES:
            commit()
    if (ended := alike.end()) is not None:
        bad.append(ended)
    if kinds or bad:
        commit()
    return report


class _AlikeRun:
    """Consecutive bad lines that are alike (blank, or the same bytes for the same reason) kept as one
    quarantine row, by the first line's number: a body of a million newlines is one row, not a million.
    The run may span transactions; a crash before its row is written re-reads the lines, which come out
    as the same row (keyed by the file's hash and that first line)."""

    def __init__(self):
        self.key = self.first = self.last = self.reason = self.raw = None

    def add(self, number: int, reason: str, raw: bytes) -> tuple[int, str, bytes] | None:
        """Take a bad line; the row of the run it ends, if it ends one."""
        key = ("blank", reason) if not raw.strip() else (raw, reason)
        if key == self.key:
            self.last = number
            return None
        ended = self.end()
        self.key, self.first, self.last, self.reason, self.raw = key, number, number, reason, raw
        return ended

    def end(self) -> tuple[int, str, bytes] | None:
        if self.key is None:
            return None
        n = self.last - self.first + 1
        reason = self.reason if n == 1 else f"{self.reason} (lines {self.first}-{self.last}: {n} alike, kept once)"
        row, self.key = (self.first, reason, self.raw), None
        return row


def ingest_bytes(store: TraceStore, data: bytes, source: str) -> IngestReport:
    """Ingest a file's content held in memory; the report has every line's outcome."""
    lines = ((line, len(line)) for line in split_lines(data))
    return ingest_lines(store, lines, source, hashlib.sha256(data).hexdigest(), IngestReport(source, outcomes=[]))


@contextmanager
def open_regular_file(path: str | Path, follow_links: bool = False) -> Iterator[BinaryIO]:
    """A regular file opened for reading; a FIFO, folder or device (or a link, unless follow_links)
    raises ValueError without being read.

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
        yield f


def ingest_file(store: TraceStore, path: str | Path, source: str | None = None,
                follow_links: bool = False) -> IngestReport:
    """Ingest a regular file (see open_regular_file), streamed: memory stays bounded whatever its size.

    It is read twice: once for its hash (what its quarantined lines are keyed by), once to ingest.
    The inbox never follows links, a person may.
    """
    path = Path(path)
    with open_regular_file(path, follow_links) as f:
        digest = hashlib.sha256()
        while block := f.read(1 << 20):
            digest.update(block)
        f.seek(0)
        return ingest_lines(store, read_lines(f), source or path.name, digest.hexdigest(),
                            IngestReport(source or path.name))


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
           meta: dict | None = None, store: TraceStore | None = None, tools: list[dict] | None = None,
           response_format: dict | None = None) -> str | None:
    """Keep one teacher answer as a trace; agent code calls this after each EGO call.

    `messages`: the OpenAI-style chat, the teacher's assistant answer last (text, or tool_calls
    with content None). `tools`: the OpenAI function tools the request offered; `response_format`: the
    form the answer was asked in (OpenAI's, or a pydantic model class). `topk`: optional
    {"token_ids": [[int] * k] * n, "logprobs": [[float] * k] * n, "tokenizer": fingerprint}, one
    row per answer token. `store` defaults to $CONCH_HOME's (home_store()).
    Returns the trace id, or None when the trace is invalid: then it is quarantined with the
    reason (never silently dropped) and the agent carries on.
    """
    store = store or home_store()
    data = {"domain": domain, "messages": messages, "teacher": teacher, "topk": topk, "meta": meta or {}}
    if tools:
        data["tools"] = tools
    if isinstance(response_format, type):  # a pydantic model class: its schema (a dict is checked with the trace)
        try:
            response_format = response_format_of(response_format)
        except StructureError as exc:
            response_format = {"refused": str(exc)}  # the trace is then quarantined, with that reason in it
    if response_format is not None:
        data["response_format"] = response_format
    try:
        raw = json.dumps(data, ensure_ascii=False, default=str).encode("utf-8")
    except (Exception, RecursionError) as exc:  # noqa: BLE001 - e.g. a circular meta: kept as text, with why
        raw = reprlib.repr(data).encode("utf-8", "backslashreplace")
        store.quarantine([(0, f"not JSON-serialisable: {type(exc).__name__}: {exc}", raw)], "record()",
                         hashlib.sha256(raw).hexdigest())
        return None
    row, reason = prepare_line(store, raw, len(raw))
    if row is None:
        store.quarantine([(0, reason, kept_bytes(raw, len(raw)))], "record()", hashlib.sha256(raw).hexdigest())
        return None
    store.add_rows([row], "record()")
    return row[0]
