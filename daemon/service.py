"""The Conch DNA daemon: inbox ingestion, a scheduled check per domain, one trainer worker at a time.

    conch daemon run            (launchd / systemd run exactly this)

- The inbox watcher ingests dropped JSONL files (daemon.inbox).
- An APScheduler job checks every `check_minutes` whether a domain has at least its threshold
  of new train traces, and retrains it in a worker subprocess (daemon.worker), one at a time.
- `conch kd retrain` while the daemon runs writes a request file into $CONCH_HOME/requests/;
  the daemon runs it in the same single worker queue (nothing listens on the network).
- SIGTERM / SIGINT: stop taking work, interrupt the worker (the current adapter is untouched),
  exit 0. A worker that dies is recorded as a failed run and the next check retries.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

from conch_dna.lifecycle.cycle import pending
from conch_dna.lifecycle.failures import retry_at, set_aside_if_stuck
from conch_dna.lifecycle.status import LOCK_FILE, STATE_FILE, pid_alive, read_state
from conch_dna.models.versions import DomainBusy, discard, domain_dir, domain_lock
from conch_dna.settings.config import Config, DistributedSettings, load_config
from conch_dna.system.domains import check_domain
from conch_dna.system.fsutil import atomic_write_json, open_private, private_dir, rotate
from conch_dna.system.home import INBOX_DIR, LOGS_DIR, REQUESTS_DIR
from conch_dna.system.power import POWER_SUPPLY, on_battery
from conch_dna.traces.runs import RunStatus
from conch_dna.traces.store import TraceStore

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler

from daemon.inbox import Inbox

log = logging.getLogger("conch.daemon")
CHECK_JOB = "conch-check"
LOG_MAX_BYTES = 8 << 20  # each log in logs/ is rotated past this, keeping three old ones
REQUESTS_JOB = "conch-requests"


def worker_command(domain: str, iters: int | None = None, force: bool = False,
                   parallel: DistributedSettings | None = None) -> list[str]:
    """The worker's command line. -I: the interpreter ignores the current directory and PYTHON*
    variables, so a `daemon/` package in whatever folder the service starts from is never imported.
    With `parallel` enabled, mlx.launch (daemon.launch, which passes a SIGTERM on to the ranks) starts it
    once per rank (hosts from the host file, or that many processes here), each rank running this worker
    file with the same interpreter. The worker gets a session of its own: signals reach it from the
    daemon alone, and a kill reaches every process it started here."""
    args = ["--domain", domain, *(["--iters", str(iters)] if iters else []), *(["--force"] if force else [])]
    if not (parallel and parallel.enabled):
        return [sys.executable, "-I", "-m", "daemon.worker", *args]
    where = ["--hostfile", parallel.hostfile] if parallel.hostfile else ["-n", str(parallel.local_ranks)]
    return [sys.executable, "-I", "-m", "daemon.launch", "--backend", parallel.backend, *where,
            "--python", sys.executable, str(Path(__file__).with_name("worker.py")), *args]


def request_retrain(home: str | Path, domain: str, iters: int | None, force: bool) -> Path:
    """Ask the running daemon for a retrain; returns the path its answer will be written to."""
    requests = private_dir(Path(home) / REQUESTS_DIR)
    rid = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"
    atomic_write_json(requests / f"{rid}.json", {"domain": domain, "iters": iters, "force": force})
    return requests / f"{rid}.done.json"


class Daemon:
    """`power_supply`: where Linux lists batteries and adapters (macOS asks pmset)."""

    def __init__(self, home: str | Path, config: Config | None = None, power_supply: Path = POWER_SUPPLY):
        self.home = private_dir(home)
        self.power_supply = power_supply
        self.config = config or load_config(self.home)
        self.store = TraceStore.for_home(self.home, self.config)
        self.inbox = Inbox(self.store, self.home / INBOX_DIR)
        self.scheduler = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(max_workers=1)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 6 * 3600})
        self._stopping = threading.Event()
        self._worker: subprocess.Popen | None = None
        self._worker_lock = threading.Lock()
        self._running: dict | None = None
        self._lock_file = None
        self._told_backoff: dict[str, float] = {}  # domain -> the retry time last logged

    # -- lifecycle -----------------------------------------------------------------------------

    def acquire_lock(self) -> None:
        self._lock_file = open(self.home / LOCK_FILE, "a+")  # noqa: SIM115 - held for the daemon's life
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = read_state(self.home)
            raise RuntimeError(f"another conch daemon already runs on {self.home}"
                               + (f" (pid {other['pid']})" if other else "")) from None

    def start(self) -> Daemon:
        self.acquire_lock()
        failed = self.store.fail_stale_runs("the worker process died before the run finished", pid_alive)
        if failed:
            log.warning("recorded %d interrupted run(s) as failed", failed)
        self._clean_candidates()
        self.inbox.start()
        self.scheduler.add_job(self.check, "interval", minutes=self.config.check_minutes, id=CHECK_JOB,
                               next_run_time=datetime.now() + timedelta(seconds=1))
        self.scheduler.add_job(self.take_requests, "interval", seconds=1, id=REQUESTS_JOB)
        self.scheduler.start()
        self._write_state()
        log.info("daemon started on %s (pid %d)", self.home, os.getpid())
        return self

    def stop(self, timeout: float = 25.0) -> None:
        """Stop taking work, interrupt the worker, and return within `timeout` seconds (and
        the time the scheduler's job needs to read the worker's last lines): every thread the
        daemon started is joined."""
        with self._worker_lock:  # no worker can start after this
            self._stopping.set()
            worker = self._worker
        if worker and worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(worker.pid, signal.SIGKILL)  # its session: mlx.launch's ranks too
        self.scheduler.shutdown(wait=True)
        self.inbox.stop()
        (self.home / STATE_FILE).unlink(missing_ok=True)
        log.info("daemon stopped")

    def _clean_candidates(self) -> None:
        for domain in self.config.domains:
            for leftover in domain_dir(self.home, domain).glob(".candidate-*"):
                discard(leftover)

    def _write_state(self) -> None:
        if self._stopping.is_set():
            return
        job = self.scheduler.get_job(CHECK_JOB)
        atomic_write_json(self.home / STATE_FILE, {
            "pid": os.getpid(), "home": str(self.home),
            "next_check": job.next_run_time.timestamp() if job and job.next_run_time else None,
            "running": self._running, "updated_at": time.time()})

    # -- work ----------------------------------------------------------------------------------

    def tidy(self) -> None:
        """Keep what grows bounded: the logs (launchd's included) and the store's WAL file."""
        for path in (self.home / LOGS_DIR).glob("*.log"):
            if rotate(path, LOG_MAX_BYTES):
                log.info("rotated %s", path.name)
        self.store.checkpoint()

    def check(self) -> list[str]:
        """Retrain every domain whose new train traces reached its threshold; returns those run."""
        self.tidy()
        ran = []
        for domain in self.config.domains:
            if self._stopping.is_set():
                break
            if pending(self.store, domain) < self.config.threshold(domain):
                continue
            due = retry_at(self.store, domain, self.config)
            if due is not None and time.time() < due:
                if self._told_backoff.get(domain) != due:
                    self._told_backoff[domain] = due
                    log.warning("%s: its last runs failed; next try at %s", domain, time.strftime(
                        "%Y-%m-%d %H:%M", time.localtime(due)))
                continue
            if on_battery(self.power_supply) and not self.config.train_on_battery:
                log.info("%s is due but the machine is on battery; waiting", domain)
                break
            self.run_worker(domain)
            ran.append(domain)
        self._write_state()
        return ran

    def take_requests(self) -> None:
        requests = self.home / REQUESTS_DIR
        if self._stopping.is_set() or not requests.is_dir():
            return
        for path in sorted(requests.glob("*.json")):
            if path.name.endswith(".done.json"):
                continue
            try:
                domain, iters, force = self.parse_request(path.read_bytes())
            except Exception as exc:  # noqa: BLE001 - any bad request is answered, and never blocks those behind it
                result = {"status": RunStatus.FAILED.value, "reason": f"bad request: {exc}"}
            else:
                result = self.run_worker(domain, iters, force)
            atomic_write_json(path.with_name(path.name.replace(".json", ".done.json")), result)
            path.unlink(missing_ok=True)

    def parse_request(self, raw: bytes) -> tuple[str, int | None, bool]:
        """(domain, iters, force) of a retrain request file; ValueError naming what is wrong."""
        req = json.loads(raw)
        if not isinstance(req, dict):
            raise ValueError(f"a request is a JSON object, got {type(req).__name__}")
        domain = check_domain(req.get("domain"), self.config.domains) if isinstance(req.get("domain"), str) \
            else None
        if domain is None:
            raise ValueError("the request names no domain")
        iters = req.get("iters")
        if iters is not None and (isinstance(iters, bool) or not isinstance(iters, int) or iters < 1):
            raise ValueError(f"iters must be a positive integer, got {iters!r}")
        return domain, iters, bool(req.get("force"))

    def run_worker(self, domain: str, iters: int | None = None, force: bool = False) -> dict:
        """One retrain cycle in a worker subprocess; waits for it and returns its result event."""
        cmd = worker_command(domain, iters, force, self.config.distributed)
        env = {**os.environ, "CONCH_HOME": str(self.home)}
        log.info("retraining %s", domain)
        self._running = {"domain": domain, "started_at": time.time(), "progress": None}
        self._write_state()
        result: dict = {"status": RunStatus.FAILED.value, "reason": "the worker exited without a result",
                        "domain": domain}
        with self._worker_lock, open_private(private_dir(self.home / LOGS_DIR) / "worker.log") as worker_log:
            if self._stopping.is_set():
                self._running = None
                return {"status": RunStatus.FAILED.value, "reason": "the daemon is stopping", "domain": domain}
            self._worker = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=worker_log, text=True,
                                            start_new_session=True)
        for line in self._worker.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "progress":
                self._running["progress"] = event
                self._write_state()
            elif event.get("event") in ("result", "interrupted"):
                result = event
        code = self._worker.wait()
        self._worker, self._running = None, None
        # Killed before it reported: its run is still 'running' in the store. Killed after (a stop
        # signal while it was exiting), its result and recorded run stand.
        if code < 0 and "event" not in result:
            self.store.fail_stale_runs(f"the worker was killed by signal {-code}", pid_alive)
            self._clean_candidates()
            result = {"status": RunStatus.FAILED.value, "reason": f"worker killed by signal {-code}", "domain": domain}
            if not self._stopping.is_set():  # killed again and again on the same traces (OOM): set them aside
                try:
                    with domain_lock(self.home, domain):
                        set_aside = set_aside_if_stuck(self.store, domain, self.config)
                except DomainBusy:
                    set_aside = None
                if set_aside:
                    result["reason"] += f"; {set_aside}"
        log.info("%s: %s (%s)", domain, result.get("status", result.get("event")), result.get("reason"))
        self._write_state()
        return result


def run_forever(home: str | Path, companion: Callable[[], Callable[[], None]] | None = None) -> int:
    """`conch daemon run`: run until SIGTERM / SIGINT, then exit 0.

    `companion`, if given, is started once the daemon holds its lock (e.g. `conch serve`); it
    returns the function that stops it, which runs before the daemon stops."""
    os.umask(0o077)  # whatever the daemon or its workers write (logs included) is the user's alone
    private_dir(Path(home) / LOGS_DIR)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # a check skipped while a training runs is the design (one training at a time), not news
    logging.getLogger("apscheduler").setLevel(logging.ERROR)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    daemon = Daemon(home).start()
    print(f"conch daemon running on {daemon.home} (pid {os.getpid()})", flush=True)
    try:
        stop_companion = companion() if companion else None
    except Exception:
        daemon.stop()
        raise
    stop.wait()
    if stop_companion:
        stop_companion()
    daemon.stop()
    return 0
