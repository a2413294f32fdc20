"""Time and count bounds on the API's connections, so slow or idle clients cannot stop the service.

uvicorn reads headers with no deadline and takes every connection the kernel hands it: a few thousand
clients that each send a header line now and then hold every file descriptor of the process (the daemon's,
when it hosts the API), and nothing else can open a file. Here each connection must send a request's
headers within `header_timeout_s` of opening (or of its previous answer), and at most `max_connections`
are open: one more closes the connection that has waited longest for its headers, so a client that asks at
once is answered however many are trickling; only when every connection is busy answering is the newcomer
closed. The process's soft limit on open files is raised to its hard limit at start (macOS gives launchd
agents 256), and the cap is held `FD_RESERVE` below it for the inbox, the store, models and logs.
"""

from __future__ import annotations

import logging
import resource
import threading
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("conch.serve")
FD_RESERVE = 128  # descriptors kept for the rest of the process: the inbox, SQLite, models, logs, the MLX thread


def raise_open_file_limit(wanted: int = 10240) -> int:
    """Raise the soft limit on open files towards the hard one (macOS caps it at 10240); the soft limit after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def connection_cap(wanted: int) -> int:
    """At most `wanted` connections, and never so many that the process has fewer than FD_RESERVE
    descriptors left for its own work."""
    soft = raise_open_file_limit()
    return max(1, min(wanted, soft - FD_RESERVE)) if soft != resource.RLIM_INFINITY else wanted


class RateLimitedLog(logging.Filter):
    """Lets a record through at most once per `every_s` per message; says how many were held back."""

    def __init__(self, every_s: float = 60.0):
        super().__init__()
        self.every_s, self._last, self._held, self._lock = every_s, {}, {}, threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg if isinstance(record.msg, str) else repr(record.msg))
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -1e18) < self.every_s:
                self._held[key] = self._held.get(key, 0) + 1
                return False
            self._last[key] = now
            held = self._held.pop(key, 0)
        if held:
            record.msg = f"{record.getMessage()} ({held} more like it in the last {self.every_s:.0f} s not logged)"
            record.args = ()
        return True


_rate_limit = RateLimitedLog()


def rate_limit_server_logs() -> None:
    """uvicorn's and asyncio's per-connection complaints (an accept that failed, a malformed request) at most
    once a minute each: a flood of bad clients must not fill the disk with the log."""
    for name in ("asyncio", "uvicorn.error", "conch.serve.connections"):
        logger = logging.getLogger(name)
        if _rate_limit not in logger.filters:
            logger.addFilter(_rate_limit)


class Waiting:
    """The connections that have not yet sent a whole request's headers, oldest first; shared by one
    server's protocols (all on its event loop)."""

    def __init__(self, max_connections: int, header_timeout_s: float):
        self.max_connections, self.header_timeout_s = max_connections, header_timeout_s
        self.protocols: dict = {}  # protocol -> its deadline's timer handle; insertion order is age
        self.evicted = self.timed_out = self.refused = 0


def guarded_protocol(waiting: Waiting) -> type:
    """An H11Protocol class with the header deadline and the connection cap of `waiting`."""
    clog = logging.getLogger("conch.serve.connections")

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._seen_cycle = None
            self._wait_for_headers()
            if len(self.connections) > waiting.max_connections:
                oldest = next((p for p in waiting.protocols if p is not self), None)
                if oldest is not None:
                    waiting.evicted += 1
                    clog.warning("over %d connections: closing the one that waited longest for its headers",
                                 waiting.max_connections)
                    oldest._close()
                else:  # every other connection is answering a request: this one waits for nobody
                    waiting.refused += 1
                    clog.warning("over %d connections, all busy: refusing a new one", waiting.max_connections)
                    self._close()

        def _wait_for_headers(self) -> None:
            self._stop_waiting()
            waiting.protocols[self] = self.loop.call_later(waiting.header_timeout_s, self._header_timeout)

        def _stop_waiting(self) -> None:
            timer = waiting.protocols.pop(self, None)
            if timer is not None:
                timer.cancel()

        def _header_timeout(self) -> None:
            if self in waiting.protocols:
                waiting.timed_out += 1
                clog.warning("a client sent no whole request within %.0f s: closing it", waiting.header_timeout_s)
                self._close()

        def _close(self) -> None:
            self._stop_waiting()
            if not self.transport.is_closing():
                self.transport.abort()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._seen_cycle:  # a request's headers are in
                self._seen_cycle = self.cycle
                self._stop_waiting()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.cycle is not self._seen_cycle:  # a pipelined request was already read and has begun
                self._seen_cycle = self.cycle
            elif not self.transport.is_closing():  # kept alive: the next request's headers have their deadline
                self._wait_for_headers()

        def connection_lost(self, exc) -> None:
            self._stop_waiting()
            super().connection_lost(exc)

    return GuardedH11Protocol
