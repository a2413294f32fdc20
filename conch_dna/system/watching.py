"""Watching folders with watchdog: one callback per changed path, and a clean stop."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer


class _Handler(FileSystemEventHandler):
    def __init__(self, on_path: Callable[[Path], None]):
        self.on_path = on_path

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type not in ("created", "moved", "modified", "closed"):
            return
        self.on_path(Path(getattr(event, "dest_path", "") or event.src_path))


def watch(folders: Iterable[str | Path], on_path: Callable[[Path], None]) -> Observer:
    """A started observer calling on_path(path) for each file created, moved in, written or closed
    in one of `folders` (not recursive). Events can be lost: callers also poll."""
    observer = Observer()
    handler = _Handler(on_path)
    for folder in folders:
        observer.schedule(handler, str(folder), recursive=False)
    observer.start()
    return observer


def stop_watching(observer: Observer | None, *threads: threading.Thread | None, timeout: float = 5.0) -> None:
    """Stop the observer and wait (up to `timeout` each) for it and the given threads to end."""
    if observer is not None:
        observer.stop()
        observer.join(timeout=timeout)
    for thread in threads:
        if thread is not None:
            thread.join(timeout=timeout)
