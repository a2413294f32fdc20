"""Writing state files so that a crash never leaves a half-written one, readable by the user alone."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path


def private_dir(path: str | Path) -> Path:
    """Create a directory (and parents) readable by its owner alone; return it."""
    path = Path(path)
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    for p in reversed(missing):  # mkdir(parents=True) would give the parents the umask's mode
        p.mkdir(mode=0o700, exist_ok=True)
    return missing[0] if missing else path


def open_private(path: str | Path, mode: str = "a"):
    """Open a file for writing (a log, say) as its owner's alone, whatever the umask."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if mode == "a" else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)  # a file made earlier with a looser mode
    return os.fdopen(fd, mode)


def sync(fd: int) -> None:
    """Put a file's data on disk; macOS's fsync stops at the drive's cache, F_FULLFSYNC does not."""
    if sys.platform == "darwin":
        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    else:
        os.fsync(fd)


def sync_dir(path: str | Path) -> None:
    """Put a folder's entries on disk, so that a rename into it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        sync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[str], None]) -> Path:
    """Call write(tmp) on a temporary file beside `path`, sync it, rename it over `path`, and sync
    the folder: after a power cut `path` is the old file or the new one, never an empty one.

    The temporary name keeps the real suffix, since some writers (mx.save_safetensors) append one.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o600)
        with open(tmp, "rb") as f:
            sync(f.fileno())
        os.replace(tmp, path)
        sync_dir(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def rotate(path: str | Path, max_bytes: int, keep: int = 3) -> bool:
    """Once `path` outgrows max_bytes, move its contents to path.1 (path.1 to path.2, ... up to
    path.<keep>) and empty it. Copy, then truncate (logrotate's copytruncate): a writer that holds
    the file open in append mode (launchd's StandardErrorPath) goes on writing at its new end.
    Returns whether it rotated."""
    path = Path(path)
    try:
        if path.stat().st_size <= max_bytes:
            return False
    except FileNotFoundError:
        return False
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{n + 1}"))
    shutil.copyfile(path, path.with_name(f"{path.name}.1"))
    os.chmod(path.with_name(f"{path.name}.1"), 0o600)
    os.truncate(path, 0)
    return True
