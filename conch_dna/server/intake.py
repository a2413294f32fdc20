"""`POST /v1/traces`: JSONL trace lines from agents elsewhere, bounded (lines, bytes per client an hour, free
disk) and then through the inbox's ingest: the same validation, dedup and quarantine."""

import asyncio
import hashlib
import logging
import shutil
import time
from pathlib import Path

import conch_dna.server.wire as wire
from conch_dna.settings.config import Config
from conch_dna.traces.ingest import ingest_bytes
from conch_dna.traces.store import TraceStore

from starlette.requests import Request
from starlette.responses import JSONResponse

log = logging.getLogger("conch.serve")
REASONS_SHOWN = 100  # refused lines of a POST of traces whose reasons the answer gives; the rest are counted


class TraceIntake:
    """The traces agents post to this home."""

    def __init__(self, home: Path, config: Config, store: TraceStore):
        self.home, self.config, self.store = home, config, store
        self._writes = _ByteBudget(config.server.traces_mb_per_hour * 2**20, 3600.0)

    async def post(self, request: Request, read_body) -> JSONResponse:
        """POST /v1/traces: JSONL trace lines from an agent elsewhere, through the inbox's ingest (the same
        validation, dedup and quarantine); the answer counts each outcome and gives each refused line's reason."""
        settings = self.config.server
        if not settings.accept_traces:
            raise wire.APIError(403, "this server takes no traces ([server] accept_traces = false)",
                                code="traces_refused")
        client = request.client.host if request.client else "unknown"
        free_mb = shutil.disk_usage(self.home).free / 2**20
        if free_mb < settings.min_free_disk_mb:
            raise wire.APIError(507, f"the home's disk has {free_mb:.0f} MB free, under [server] min_free_disk_mb "
                                f"= {settings.min_free_disk_mb}: no traces are taken until there is more",
                                type="server_error", code="disk_full")
        data = await read_body(request, settings.max_traces_mb * 2**20)
        if (lines := data.count(b"\n") + (not data.endswith(b"\n") and bool(data))) > settings.max_trace_lines:
            raise wire.APIError(413, f"{lines} lines are over this server's limit of {settings.max_trace_lines} a "
                                "request ([server] max_trace_lines): send them in parts", code="too_many_lines")
        if (wait := self._writes.take(client, len(data))) is not None:
            raise wire.APIError(429, f"{client} has sent its [server] traces_mb_per_hour = "
                                f"{settings.traces_mb_per_hour:g}; try again in {wait:.0f} s", code="rate_limited",
                                headers={"retry-after": str(int(wait) + 1)})
        report = await asyncio.to_thread(ingest_bytes, self.store, data, f"POST /v1/traces from {client}")
        reasons = await asyncio.to_thread(self.store.quarantine_reasons, hashlib.sha256(data).hexdigest())
        log.info("POST /v1/traces from %s: %d stored, %d duplicates, %d quarantined", client, report.stored,
                 report.duplicates, report.quarantined)
        shown = sorted(reasons.items())[:REASONS_SHOWN]
        return JSONResponse({"lines": report.lines, "stored": report.stored, "duplicates": report.duplicates,
                             "quarantined": report.quarantined, "outcomes": report.outcomes,
                             "reasons": {str(k): v for k, v in shown},
                             "reasons_not_shown": max(0, len(reasons) - len(shown))})


class _ByteBudget:
    """Bytes each client may write in a window (a token bucket refilled over `window_s`)."""

    def __init__(self, per_window: float, window_s: float):
        self.per_window, self.window_s, self._buckets = per_window, window_s, {}

    def take(self, client: str, n: int) -> float | None:
        """Spend `n` of the client's bytes; None if it had them, else the seconds until it will."""
        now = time.monotonic()
        level, at = self._buckets.get(client, (self.per_window, now))
        level = min(self.per_window, level + (now - at) * self.per_window / self.window_s)
        if n > level:
            self._buckets[client] = (level, now)
            return (n - level) * self.window_s / self.per_window
        self._buckets[client] = (level - n, now)
        if len(self._buckets) > 10_000:  # clients seen long ago are full again: forget them
            self._buckets = {c: v for c, v in self._buckets.items() if now - v[1] < self.window_s}
        return None
