"""The inbox: a watchdog observer on $CONCH_HOME/inbox that ingests dropped *.jsonl files.

Producers write a file under a temporary name and rename it to *.jsonl (a file written in place is
claimed only once its size and mtime have stayed the same for the debounce time). A file to ingest is
first claimed by renaming it into inbox/.processing/, then ingested, streamed, a chunk of lines per
transaction, then removed. A crash at any point loses nothing: a claimed file that is still there is
ingested again at the next start, and ingesting the same content twice stores nothing twice. A file
that fails FAILURE_LIMIT times is set aside in corrupt/ with its reason. Filesystem events can be
lost, so a reconcile sweep runs at start and every `sweep_seconds`.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections import deque
from pathlib import Path

from conch_dna.system.fsutil import private_dir
from conch_dna.system.watching import stop_watching, watch
from conch_dna.traces.ingest import IngestReport, ingest_file
from conch_dna.traces.store import TraceStore

log = logging.getLogger("conch.inbox")
PROCESSING = ".processing"
RECENT_REPORTS = 100
REJECTED = "rejected"  # what is not a regular file (a FIFO, a folder, a link, a device), set aside unread
CORRUPT = "corrupt"  # a file whose ingest failed FAILURE_LIMIT times, set aside so the queue moves on
FAILURE_LIMIT = 3


def is_candidate(path: Path) -> bool:
    """A finished trace file: *.jsonl, not hidden, not a temporary or partial name."""
    name = path.name
    return name.endswith(".jsonl") and not name.startswith(".") and not name.endswith((".tmp", ".part"))


def _signature(path: Path) -> tuple | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a device"), (stat.S_ISBLK, "a device")):
        if test(mode):
            return name
    return "not a regular file"


class Inbox:
    def __init__(self, store: TraceStore, directory: str | Path, debounce_seconds: float = 0.2,
                 sweep_seconds: float = 180.0, on_report=None):
        self.store = store
        self.directory = private_dir(directory)
        self.processing = private_dir(self.directory / PROCESSING)
        self.debounce_seconds = debounce_seconds
        self.sweep_seconds = sweep_seconds
        self.on_report = on_report
        self._pending: dict[Path, tuple[float, tuple | None]] = {}  # path -> (last change seen, size and mtime)
        self._failures: dict[str, int] = {}  # claimed file -> failed ingests; bounded by the files present
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._observer = None
        self._worker = None
        # the latest files' counts, for a person or a test to look at; bounded, and without the per-line
        # outcomes, so a daemon that runs for months holds no list that grows with every line
        self.reports: deque[IngestReport] = deque(maxlen=RECENT_REPORTS)

    def notice(self, path: Path) -> None:
        """A filesystem event for `path`: ingest it once it has been quiet for the debounce time and
        its size and mtime are what they were then (a producer writing in place is not cut short)."""
        if path.parent == self.directory and is_candidate(path):
            with self._lock:
                self._pending[path] = (time.monotonic(), _signature(path))
            self._wake.set()

    def claim_and_ingest(self, path: Path) -> IngestReport | None:
        """Claim a file by renaming it into .processing/, ingest it, then remove it."""
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(mode):  # never opened: a FIFO would hang us, a link could point outside the home
            self.set_aside(path, f"not a regular file ({_kind(mode)}); it was not read")
            return None
        claimed = self.processing / path.name
        if path.parent != self.processing:
            if claimed.exists():  # an earlier file of the same name is not finished: keep both
                claimed = self.processing / f"{path.stem}.{time.time_ns()}.jsonl"
            try:
                os.rename(path, claimed)
            except FileNotFoundError:
                return None  # someone else claimed it, or it was a transient name
        try:
            report = ingest_file(self.store, claimed, source=path.name)
        except Exception as exc:
            self._failed(claimed, exc)
            raise
        self._failures.pop(claimed.name, None)
        claimed.unlink()
        self.reports.append(report)
        log.info("ingested %s: %d stored, %d duplicates, %d quarantined", path.name, report.stored,
                 report.duplicates, report.quarantined)
        if self.on_report:
            self.on_report(report)
        return report

    def _failed(self, claimed: Path, exc: Exception) -> None:
        """Count a failed ingest; the FAILURE_LIMIT-th sets the file aside in corrupt/ (its lines
        stored so far stay stored: ingest is idempotent), so the files behind it are reached."""
        failures = self._failures[claimed.name] = self._failures.get(claimed.name, 0) + 1
        if failures >= FAILURE_LIMIT:
            del self._failures[claimed.name]
            self.set_aside(claimed, f"ingest failed {failures} times; last: {type(exc).__name__}: {exc}", CORRUPT)

    def set_aside(self, path: Path, reason: str, folder: str = REJECTED) -> None:
        """Move `path` (the entry itself, never what a link points to) to rejected/ (or `folder`) with
        its reason."""
        rejected = private_dir(self.directory / folder)
        target = rejected / f"{path.name}.{time.time_ns()}"
        os.rename(path, target)
        (rejected / f"{target.name}.reason.txt").write_text(reason + "\n")
        os.chmod(rejected / f"{target.name}.reason.txt", 0o600)
        log.warning("inbox: set %s aside: %s", path.name, reason)

    def sweep(self) -> list[IngestReport]:
        """Ingest what a crash left claimed, then every finished file in the inbox that has been
        quiet for the debounce time (one written to now is left to the debounce)."""
        reports = []
        for path in sorted(self.processing.glob("*.jsonl")) + sorted(
                p for p in self.directory.iterdir() if is_candidate(p)):
            if path.parent == self.directory and not self._quiet(path):
                self.notice(path)
                continue
            report = self._safely(self.claim_and_ingest, path)  # one failing file never stops the rest
            if report:
                reports.append(report)
        return reports

    def _quiet(self, path: Path) -> bool:
        signature = _signature(path)
        return signature is None or time.time_ns() - signature[1] >= self.debounce_seconds * 1e9

    def _run(self) -> None:
        next_sweep = time.monotonic() + self.sweep_seconds
        while not self._stop.is_set():
            self._wake.wait(timeout=min(self.debounce_seconds, max(0.0, next_sweep - time.monotonic())))
            self._wake.clear()
            now = time.monotonic()
            with self._lock:
                due = []
                for p, (seen, signature) in list(self._pending.items()):
                    if now - seen < self.debounce_seconds:
                        continue
                    current = _signature(p)
                    if current != signature:  # still being written: wait for it to be quiet again
                        self._pending[p] = (now, current)
                        continue
                    due.append(p)
                    del self._pending[p]
                if self._pending:
                    self._wake.set()
            for path in due:
                self._safely(self.claim_and_ingest, path)
            if now >= next_sweep:
                self._safely(self.sweep)
                next_sweep = now + self.sweep_seconds
            if self._wake.is_set():
                time.sleep(self.debounce_seconds / 4)

    def _safely(self, fn, *args):
        try:
            return fn(*args)
        except Exception:  # noqa: BLE001 - the ingester never stops on one bad file
            log.exception("inbox: %s%s failed; will retry at the next sweep", fn.__name__, args)

    def start(self) -> Inbox:
        self._safely(self.sweep)
        self._observer = watch([self.directory], self.notice)
        self._worker = threading.Thread(target=self._run, name="conch-inbox", daemon=True)
        self._worker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        stop_watching(self._observer, self._worker)


def main() -> None:
    """Run the inbox alone until SIGTERM / SIGINT: `python -m daemon.inbox`."""
    import signal

    from conch_dna.system.home import conch_home

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    home = conch_home()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    inbox = Inbox(TraceStore(home / "conch.db"), home / "inbox").start()
    print("inbox ready", flush=True)
    stop.wait()
    inbox.stop()


if __name__ == "__main__":
    main()
