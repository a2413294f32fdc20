"""TraceStore: every teacher trace and every quarantined line, in one SQLite file (WAL)."""

from __future__ import annotations

import json
import logging
import os
import random
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from conch_dna.system.domains import DOMAINS
from conch_dna.system.fsutil import private_dir
from conch_dna.system.home import DB_FILE
from conch_dna.traces.runs import RunRecord, RunStatus
from conch_dna.traces.trace import Trace

import numpy as np
import sqlite_utils

log = logging.getLogger("conch.store")
SCHEMA_VERSION = 9
BUSY_TIMEOUT_MS = 30_000
WAL_LIMIT_BYTES = 64 << 20  # the WAL file is truncated back to this after a checkpoint


def _create_v1(db: sqlite_utils.Database) -> None:
    db["traces"].create({
        "id": str, "domain": str, "split": str, "teacher": str, "messages": str,
        "topk_ids": bytes, "topk_logprobs": bytes, "topk_k": int, "tokenizer": str,
        "created_at": str, "ingested_at": float, "source": str, "meta": str,
    }, pk="id")
    db["traces"].create_index(["domain", "split"])
    db["quarantine"].create({
        "id": int, "source": str, "source_hash": str, "line": int, "reason": str, "raw": bytes,
        "quarantined_at": float,
    }, pk="id")
    db["quarantine"].create_index(["source_hash", "line"], unique=True)
    db["training_marks"].create({"domain": str, "last_rowid": int, "at": float}, pk="domain")


def _add_runs_v2(db: sqlite_utils.Database) -> None:
    db["runs"].create({
        "id": int, "domain": str, "status": str, "started_at": float, "finished_at": float,
        "upto_rowid": int, "new_traces": int, "replay_traces": int, "heldout_traces": int,
        "iters": int, "current_metrics": str, "candidate_metrics": str, "decision": str,
        "reason": str, "version": str, "history": str, "pid": int,
    }, pk="id")
    db["runs"].create_index(["domain", "started_at"])


def _add_settings_v3(db: sqlite_utils.Database) -> None:
    db["settings"].create({"key": str, "value": str}, pk="key")


def _add_set_aside_v4(db: sqlite_utils.Database) -> None:
    db["set_aside"].create({"id": int, "domain": str, "after_rowid": int, "upto_rowid": int, "traces": int,
                            "reason": str, "at": float}, pk="id")


def _add_run_phases_v5(db: sqlite_utils.Database) -> None:
    db["runs"].add_column("samples_generated", int)
    db["runs"].add_column("phase_seconds", str)


def _add_run_settings_v6(db: sqlite_utils.Database) -> None:
    db["runs"].add_column("kd_settings", str)


def _add_trace_tools_v7(db: sqlite_utils.Database) -> None:
    db["traces"].add_column("tools", str)  # the tools a chat offered, as JSON; NULL for a text chat


def _add_trace_response_format_v8(db: sqlite_utils.Database) -> None:
    db["traces"].add_column("response_format", str)  # the form the answer was asked in, as JSON; NULL: free text


def _add_auto_answers_v9(db: sqlite_utils.Database) -> None:
    # auto/<domain>'s calls per domain and version: who answered, what the teacher's answers cost
    db["auto_answers"].create({"domain": str, "version": str, "served": int, "deferred": int, "unverified": int,
                               "compared": int, "agreed": int, "teacher_seconds": float, "updated_at": float},
                              pk=("domain", "version"))


# version -> the function that brings version - 1 up to it
MIGRATIONS = {1: _create_v1, 2: _add_runs_v2, 3: _add_settings_v3, 4: _add_set_aside_v4, 5: _add_run_phases_v5,
              6: _add_run_settings_v6, 7: _add_trace_tools_v7, 8: _add_trace_response_format_v8,
              9: _add_auto_answers_v9}


@dataclass
class DomainCounts:
    domain: str
    total: int
    train: int
    heldout: int
    new_train: int  # train traces since the last successful training run of the domain


def _encode_topk(trace: Trace):
    if trace.topk is None:
        return None, None, None, None
    ids = np.asarray(trace.topk.token_ids, np.int32)
    lps = np.asarray(trace.topk.logprobs, np.float16)
    if ids.ndim != 2 or ids.shape != lps.shape or ids.shape[1] == 0 or not np.isfinite(lps).all():
        raise ValueError(f"topk of shape {ids.shape} cannot be stored as [tokens, k]")
    return ids.tobytes(), lps.tobytes(), ids.shape[1], trace.topk.tokenizer


class TraceStore:
    """One SQLite file; safe to use from many threads and processes at once.

    `domains` are the ones traces may have; `heldout_fraction` decides each new trace's split.
    Open a home's store with `TraceStore.for_home(home, config)`: the settings the daemon uses.
    Raises RuntimeError for a database written by a newer conch.
    """

    def __init__(self, path: str | Path, domains=DOMAINS, heldout_fraction: float = 0.1,
                 max_quarantine_mb: float | None = None):
        self.path = Path(path)
        self.domains = tuple(domains)
        self.heldout_fraction = heldout_fraction
        # the quarantine keeps at most this much (raw lines and reasons), the oldest forgotten first:
        # what any file, agent or client sends cannot grow it without bound
        self.max_quarantine_bytes = int(max_quarantine_mb * 2**20) if max_quarantine_mb else None
        private_dir(self.path.parent)
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
        self._local = threading.local()
        self._migrate()
        self.heldout_fraction = self._pin_heldout_fraction(heldout_fraction)

    @classmethod
    def for_home(cls, home: str | Path, config) -> TraceStore:
        """The store of a home (`<home>/conch.db`) with its config's domains and held-out fraction."""
        return cls(Path(home) / DB_FILE, config.domains, config.heldout_fraction, config.max_quarantine_mb)

    @property
    def db(self) -> sqlite_utils.Database:
        """This thread's connection (sqlite3 connections must not cross threads)."""
        db = getattr(self._local, "db", None)
        if db is None:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            # FULL: a commit is on disk before it returns, so an inbox file deleted after its commit
            # is never lost to a power cut; macOS needs F_FULLFSYNC for that (fullfsync).
            conn.execute("PRAGMA synchronous = FULL")
            if sys.platform == "darwin":
                conn.execute("PRAGMA fullfsync = ON")
                conn.execute("PRAGMA checkpoint_fullfsync = ON")
            conn.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
            # trace ids are random hashes: their index wants more than the default 2 MB of cache
            conn.execute("PRAGMA cache_size = -65536")
            db = self._local.db = sqlite_utils.Database(conn)
        return db

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE), so writers queue on the busy
        timeout instead of failing with 'database is locked' half way through."""
        conn = self.db.conn
        for attempt in range(50):
            try:
                conn.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                time.sleep(min(0.5, 0.005 * 2**attempt) * random.random())
        else:
            raise sqlite3.OperationalError(f"{self.path} stayed locked for too long")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _migrate(self) -> None:
        # Opening is frequent (status, the demo view, the daemon): take the write lock only when a
        # migration is due, and check the version again under it.
        if self.schema_version() == SCHEMA_VERSION:
            return
        with self.write() as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise RuntimeError(f"{self.path} has schema version {version}; this conch knows up "
                                   f"to {SCHEMA_VERSION}: upgrade conch-dna")
            for v in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[v](self.db)
                conn.execute(f"PRAGMA user_version = {v}")

    def _pin_heldout_fraction(self, requested: float) -> float:
        """The held-out fraction the store was created with; it travels with the data, so that a
        config changed later cannot put one prompt on both sides of the split."""
        query = "SELECT value FROM settings WHERE key = 'heldout_fraction'"
        row = self.db.conn.execute(query).fetchone()
        if row is None:
            with self.write() as conn:  # the first opener writes it; a racing one reads the winner's
                conn.execute("INSERT OR IGNORE INTO settings (key, value) VALUES ('heldout_fraction', ?)",
                             (repr(float(requested)),))
                row = conn.execute(query).fetchone()
        pinned = float(row[0])
        if pinned != requested:
            log.warning("%s keeps heldout_fraction = %s, the fraction its traces were split with (asked: %s)",
                        self.path, pinned, requested)
        return pinned

    def schema_version(self) -> int:
        return self.db.conn.execute("PRAGMA user_version").fetchone()[0]

    # -- writing -------------------------------------------------------------------------------

    def row(self, trace: Trace) -> tuple:
        """The row a trace is stored as, id first; raises for a trace that cannot be stored, so a
        caller can quarantine that one trace instead of failing a whole batch."""
        return (trace.trace_id(), trace.domain, trace.split(self.heldout_fraction), trace.teacher,
                trace.chat_json, trace.tools_json, trace.response_format_json, *_encode_topk(trace),
                trace.created_at.isoformat() if trace.created_at else None,
                json.dumps(trace.meta, ensure_ascii=False) if trace.meta else "{}")

    def add(self, traces: Iterable[Trace], source: str, conn: sqlite3.Connection | None = None) -> list[bool]:
        """Store traces; for each, True if it is new, False if the same trace is already stored.

        Pass `conn` to take part in a transaction the caller holds (see write()).
        """
        return self.add_rows([self.row(t) for t in traces], source, conn)

    def add_rows(self, rows: list[tuple], source: str, conn: sqlite3.Connection | None = None) -> list[bool]:
        """add() for rows made by row(): for each, True if it is new, False if already stored."""
        if conn is None:
            with self.write() as own:
                return self.add_rows(rows, source, own)
        ids = [r[0] for r in rows]
        known: set[str] = set()
        for i in range(0, len(ids), 500):
            chunk = ids[i : i + 500]
            known.update(r[0] for r in conn.execute(
                f"SELECT id FROM traces WHERE id IN ({','.join('?' * len(chunk))})", chunk))
        now, new_rows, fresh = time.time(), [], []
        for row in rows:
            is_new = row[0] not in known
            fresh.append(is_new)
            if is_new:
                known.add(row[0])
                new_rows.append((*row[:-1], now, source, row[-1]))
        conn.executemany(
            "INSERT INTO traces (id, domain, split, teacher, messages, tools, response_format, topk_ids, topk_logprobs,"
            " topk_k, tokenizer, created_at, ingested_at, source, meta) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            new_rows)
        return fresh

    def quarantine(self, items: Iterable[tuple[int, str, bytes]], source: str, source_hash: str,
                   conn: sqlite3.Connection | None = None) -> None:
        """Keep bad lines (line number, reason, raw bytes); the same line of the same file once."""
        items = list(items)
        if conn is None:
            with self.write() as own:
                return self.quarantine(items, source, source_hash, own)
        now = time.time()
        conn.executemany(
            "INSERT OR IGNORE INTO quarantine (source, source_hash, line, reason, raw, quarantined_at)"
            " VALUES (?,?,?,?,?,?)", [(source, source_hash, n, reason, raw, now) for n, reason, raw in items])
        if items and self.max_quarantine_bytes is not None:
            self._bound_quarantine(conn, self.max_quarantine_bytes)

    @staticmethod
    def _bound_quarantine(conn: sqlite3.Connection, max_bytes: int) -> int:
        """Forget the oldest quarantined lines beyond `max_bytes` of raw bytes and reasons; how many.
        (length() of a blob reads no content: the scan stays cheap.)"""
        return conn.execute(
            "DELETE FROM quarantine WHERE id IN (SELECT id FROM (SELECT id, SUM(length(raw) + length(reason))"
            " OVER (ORDER BY id DESC) AS newer FROM quarantine) WHERE newer > ?)", (max_bytes,)).rowcount

    def quarantine_bytes(self) -> int:
        """What the quarantine holds: its raw lines' and reasons' bytes."""
        return self.db.conn.execute(
            "SELECT COALESCE(SUM(length(raw) + length(reason)), 0) FROM quarantine").fetchone()[0]

    def trained_upto(self, domain: str) -> int:
        """The last trace rowid a completed training run of the domain consumed (0: none yet)."""
        row = self.db.conn.execute("SELECT last_rowid FROM training_marks WHERE domain = ?", (domain,)).fetchone()
        return row[0] if row else 0

    def mark_trained(self, domain: str, upto_rowid: int) -> None:
        """Record that a training run of the domain consumed every trace up to upto_rowid."""
        with self.write() as conn:
            conn.execute("INSERT INTO training_marks (domain, last_rowid, at) VALUES (?,?,?) "
                         "ON CONFLICT(domain) DO UPDATE SET last_rowid = excluded.last_rowid, at = excluded.at",
                         (domain, upto_rowid, time.time()))

    def set_aside(self, domain: str, after_rowid: int, upto_rowid: int, reason: str) -> int:
        """Move a domain past the train traces (after_rowid, upto_rowid] that its runs keep failing
        on, and record why; the traces stay stored (export them with `conch traces export`).
        Returns how many train traces were set aside."""
        with self.write() as conn:
            traces = conn.execute("SELECT count(*) FROM traces WHERE domain = ? AND split = 'train' AND rowid > ?"
                                  " AND rowid <= ?", (domain, after_rowid, upto_rowid)).fetchone()[0]
            conn.execute("INSERT INTO set_aside (domain, after_rowid, upto_rowid, traces, reason, at)"
                         " VALUES (?,?,?,?,?,?)", (domain, after_rowid, upto_rowid, traces, reason, time.time()))
            conn.execute("INSERT INTO training_marks (domain, last_rowid, at) VALUES (?,?,?) ON CONFLICT(domain)"
                         " DO UPDATE SET last_rowid = max(last_rowid, excluded.last_rowid), at = excluded.at",
                         (domain, upto_rowid, time.time()))
        return traces

    def set_asides(self, domain: str) -> list[dict]:
        """The batches set aside for a domain, newest first."""
        rows = self.db.conn.execute("SELECT after_rowid, upto_rowid, traces, reason, at FROM set_aside"
                                    " WHERE domain = ? ORDER BY id DESC", (domain,))
        return [dict(zip(("after_rowid", "upto_rowid", "traces", "reason", "at"), r)) for r in rows]

    def purge_quarantine(self, before: float) -> int:
        """Forget quarantined lines kept before `before` (a timestamp); returns how many."""
        with self.write() as conn:
            return conn.execute("DELETE FROM quarantine WHERE quarantined_at < ?", (before,)).rowcount

    # -- reading -------------------------------------------------------------------------------

    def counts(self, domain: str) -> DomainCounts:
        row = self.db.conn.execute(
            "SELECT count(*), coalesce(sum(split = 'train'), 0), coalesce(sum(split = 'heldout'), 0),"
            " coalesce(sum(split = 'train' AND rowid > coalesce((SELECT last_rowid FROM training_marks"
            " WHERE domain = ?), 0)), 0) FROM traces WHERE domain = ?", (domain, domain)).fetchone()
        return DomainCounts(domain, *row)

    def stats(self) -> list[DomainCounts]:
        return [self.counts(d) for d in self.domains]

    def max_rowid(self, domain: str) -> int:
        return self.db.conn.execute("SELECT coalesce(max(rowid), 0) FROM traces WHERE domain = ?",
                                    (domain,)).fetchone()[0]

    def chats(self, domain: str, split: str = "train", since_rowid: int = 0,
              limit: int | None = None) -> list[dict]:
        """{"messages": [...]} of each trace, oldest first, with "tools" where the chat offered some
        (mlx-lm's chat data format) and "response_format" where the answer was asked in one."""
        sql = ("SELECT messages, tools, response_format FROM traces WHERE domain = ? AND split = ? AND rowid > ? "
               "ORDER BY rowid" + (f" LIMIT {int(limit)}" if limit else ""))
        return [{"messages": json.loads(m), **({"tools": json.loads(t)} if t else {}),
                 **({"response_format": json.loads(f)} if f else {})}
                for m, t, f in self.db.conn.execute(sql, (domain, split, since_rowid))]

    def quarantined(self, limit: int = 100) -> list[dict]:
        rows = self.db.conn.execute(
            "SELECT source, line, reason, raw, quarantined_at FROM quarantine ORDER BY id DESC LIMIT ?", (limit,))
        return [{"source": s, "line": n, "reason": r, "raw": raw.decode("utf-8", "backslashreplace")[:200],
                 "quarantined_at": at} for s, n, r, raw, at in rows]

    def quarantine_reasons(self, source_hash: str) -> dict[int, str]:
        """Line number -> reason, of the lines of one file (by its hash) that were quarantined."""
        rows = self.db.conn.execute("SELECT line, reason FROM quarantine WHERE source_hash = ?", (source_hash,))
        return dict(rows.fetchall())

    def quarantine_count(self) -> int:
        return self.db.conn.execute("SELECT count(*) FROM quarantine").fetchone()[0]

    # -- training runs -------------------------------------------------------------------------

    def start_run(self, domain: str, **fields) -> int:
        with self.write() as conn:
            cur = conn.execute(
                "INSERT INTO runs (domain, status, started_at, pid, upto_rowid, new_traces, replay_traces,"
                " heldout_traces, iters) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (domain, RunStatus.RUNNING.value, time.time(), os.getpid(), fields.get("upto_rowid"),
                 fields.get("new_traces"), fields.get("replay_traces"), fields.get("heldout_traces"),
                 fields.get("iters")))
            return cur.lastrowid

    def finish_run(self, run_id: int, status: RunStatus, **fields) -> None:
        """Close a run with its status and RunRecord fields (metrics, decision, reason, ...)."""
        values = {k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in fields.items()}
        values.update(status=RunStatus(status).value, finished_at=time.time())
        with self.write() as conn:
            conn.execute(f"UPDATE runs SET {', '.join(f'{k} = ?' for k in values)} WHERE id = ?",
                         (*values.values(), run_id))

    def fail_stale_runs(self, reason: str, alive=lambda pid: False) -> int:
        """Runs left 'running' by a process that died are recorded as failed."""
        running = self.db.conn.execute("SELECT id, pid FROM runs WHERE status = ?", (RunStatus.RUNNING.value,))
        stale = [(i, pid) for i, pid in running if not alive(pid)]
        for run_id, _ in stale:
            self.finish_run(run_id, RunStatus.FAILED, reason=reason)
        return len(stale)

    def failure_streak(self, domain: str) -> list[RunRecord]:
        """The domain's finished runs since its last one that did not fail, newest first."""
        streak = []
        for run in self.runs(domain, limit=64):
            if run.status is RunStatus.RUNNING:
                continue
            if run.status is not RunStatus.FAILED:
                break
            streak.append(run)
        return streak

    def runs(self, domain: str | None = None, limit: int = 20) -> list[RunRecord]:
        """The newest runs first, of one domain or all."""
        sql = (f"SELECT {', '.join(RunRecord.columns())} FROM runs" + (" WHERE domain = ?" if domain else "")
               + " ORDER BY id DESC LIMIT ?")
        records = []
        for row in self.db.conn.execute(sql, (domain, limit) if domain else (limit,)):
            values = dict(zip(RunRecord.columns(), row))
            for k in ("current_metrics", "candidate_metrics", "history", "phase_seconds", "kd_settings"):
                values[k] = json.loads(values[k]) if values[k] else None
            records.append(RunRecord(**values))
        return records

    # -- auto/<domain>'s answers ----------------------------------------------------------------

    def count_auto_answer(self, domain: str, version: str, outcome: str, teacher_seconds: float = 0.0,
                          agreed: bool | None = None) -> None:
        """One more call of `auto/<domain>` answered on `version`: outcome "served" (the student's answer),
        "deferred" (the teacher's) or "unverified" (the student's, the teacher having failed); `agreed`,
        for a deferred call whose teacher answer is known, whether the student's answer was the same."""
        if outcome not in ("served", "deferred", "unverified"):
            raise ValueError(f"unknown auto/ outcome {outcome!r}")
        with self.write() as conn:
            conn.execute("INSERT OR IGNORE INTO auto_answers VALUES (?, ?, 0, 0, 0, 0, 0, 0.0, 0.0)", (domain, version))
            conn.execute(f"UPDATE auto_answers SET {outcome} = {outcome} + 1, compared = compared + ?, "
                         "agreed = agreed + ?, teacher_seconds = teacher_seconds + ?, updated_at = ? "
                         "WHERE domain = ? AND version = ?",
                         (agreed is not None, bool(agreed), teacher_seconds, time.time(), domain, version))

    def auto_answers(self, domain: str | None = None) -> list[dict]:
        """auto/'s counts per domain and version, oldest version first."""
        sql = "SELECT * FROM auto_answers" + (" WHERE domain = ?" if domain else "") + " ORDER BY domain, version"
        cur = self.db.conn.execute(sql, (domain,) if domain else ())
        names = [c[0] for c in cur.description]
        return [dict(zip(names, row)) for row in cur]

    def traces_of(self, domain: str, split: str, since_rowid: int = 0, upto_rowid: int | None = None,
                  sample: int | None = None, limit: int | None = None) -> list[dict]:
        """Trace rows (chat, tools + top-k) of a domain's split, oldest first; `sample` draws that many at
        random instead; `limit` keeps the first that many."""
        sql = "SELECT rowid, messages, tools, response_format, topk_ids, topk_logprobs, topk_k, tokenizer " \
              "FROM traces WHERE domain = ? AND split = ? AND rowid > ?"
        args: list = [domain, split, since_rowid]
        if upto_rowid is not None:
            sql += " AND rowid <= ?"
            args.append(upto_rowid)
        sql += " ORDER BY random() LIMIT ?" if sample is not None else " ORDER BY rowid LIMIT ?"
        args.append(sample if sample is not None else (limit if limit is not None else -1))
        out = []
        for rowid, messages, tools, form, ids, lps, k, tok in self.db.conn.execute(sql, args):
            topk = None
            if ids is not None:
                topk = {"token_ids": np.frombuffer(ids, np.int32).reshape(-1, k),
                        "logprobs": np.frombuffer(lps, np.float16).reshape(-1, k), "tokenizer": tok}
            out.append({"rowid": rowid, "messages": json.loads(messages), "tools": json.loads(tools) if tools else None,
                        "response_format": json.loads(form) if form else None, "topk": topk})
        return out

    def checkpoint(self) -> None:
        """Copy the WAL into the database where no reader needs it (the file then shrinks to
        journal_size_limit); a reader that holds it open only delays this to the next call."""
        self.db.conn.execute("PRAGMA wal_checkpoint(PASSIVE)")

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.conn.close()
            self._local.db = None
