"""Adapter versions of a domain: immutable v<NNNN>/ directories and one manifest naming the current one.

    $CONCH_HOME/adapters_kd/<domain>/v0001/   adapters.safetensors, adapter_config.json, kd_metrics.json
    $CONCH_HOME/adapters_kd/<domain>/manifest.json   {"current": "v0002", "history": [...]}

A version directory is complete before it gets its name (written under a temporary name, then
renamed), and the manifest is replaced atomically, so a crash at any point leaves the old current
version or the new one, never a broken one.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from conch_dna.domains import validate_domain_name
from conch_dna.fsutil import atomic_write_json, private_dir

MANIFEST = "manifest.json"
CYCLE_LOCK = ".cycle.lock"  # held for a whole retrain cycle or a rollback of the domain
_VERSION = re.compile(r"^v(\d{4,})$")
_ANY = object()


class DomainBusy(RuntimeError):
    """Another retrain cycle or rollback of the domain holds its lock."""


class StaleCandidate(RuntimeError):
    """The current version changed while the candidate was measured against it: not promoted."""


@contextmanager
def domain_lock(home: str | Path, domain: str) -> Iterator[None]:
    """One retrain cycle or rollback of a domain at a time (flock: released if the holder dies)."""
    fd = os.open(private_dir(domain_dir(home, domain)) / CYCLE_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DomainBusy(f"{domain}: another retrain or rollback of this domain is running") from None
        yield
    finally:
        os.close(fd)


def domain_dir(home: str | Path, domain: str) -> Path:
    return Path(home) / "adapters_kd" / validate_domain_name(domain)


def list_versions(home: str | Path, domain: str) -> list[str]:
    d = domain_dir(home, domain)
    if not d.is_dir():
        return []
    names = [p.name for p in d.iterdir() if p.is_dir() and _VERSION.match(p.name)]
    return sorted(names, key=lambda n: int(n[1:]))


def read_manifest(home: str | Path, domain: str) -> dict | None:
    path = domain_dir(home, domain) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def current_version(home: str | Path, domain: str) -> str | None:
    manifest = read_manifest(home, domain)
    return manifest["current"] if manifest else None


def current_adapter_path(home: str | Path, domain: str) -> Path | None:
    version = current_version(home, domain)
    return domain_dir(home, domain) / version if version else None


def write_version(home: str | Path, domain: str, candidate_dir: str | Path) -> str:
    """Give a finished candidate directory the next version name; returns that name."""
    d = private_dir(domain_dir(home, domain))
    while True:
        existing = list_versions(home, domain)
        name = f"v{(int(existing[-1][1:]) + 1) if existing else 1:04d}"
        try:
            os.rename(candidate_dir, d / name)  # fails if the name was taken meanwhile
            return name
        except OSError:
            if (d / name).exists():
                continue
            raise


def set_current(home: str | Path, domain: str, version: str, reason: str) -> dict:
    """Make `version` current by replacing the manifest atomically; the history is kept."""
    if not (domain_dir(home, domain) / version / "adapters.safetensors").is_file():
        raise FileNotFoundError(f"{domain}: version {version} does not exist")
    manifest = read_manifest(home, domain) or {"domain": domain, "history": []}
    manifest["history"].append({"version": version, "at": time.time(), "reason": reason})
    manifest.update(current=version, updated_at=time.time())
    atomic_write_json(domain_dir(home, domain) / MANIFEST, manifest)
    return manifest


def promote(home: str | Path, domain: str, candidate_dir: str | Path, reason: str, expected_current=_ANY) -> str:
    """Write the candidate as a new immutable version, then switch the manifest to it.

    `expected_current`: the version (or None for the bare student) the candidate was measured
    against; if the manifest names another one now, StaleCandidate is raised and nothing changes
    (compare-and-swap, as `git update-ref <ref> <new> <old>` does).
    """
    if expected_current is not _ANY and current_version(home, domain) != expected_current:
        raise StaleCandidate(f"{domain}: the current version became {current_version(home, domain) or 'base'} "
                             f"while the candidate was measured against {expected_current or 'base'}")
    version = write_version(home, domain, candidate_dir)
    set_current(home, domain, version, reason)
    return version


def rollback(home: str | Path, domain: str, to: str | None = None) -> str:
    """Make an earlier version current again (default: the one before the current); DomainBusy while
    a retrain cycle of the domain runs."""
    with domain_lock(home, domain):
        return _rollback(home, domain, to)


def _rollback(home: str | Path, domain: str, to: str | None) -> str:
    manifest = read_manifest(home, domain)
    if not manifest:
        raise ValueError(f"{domain}: no version has been promoted, nothing to roll back")
    if to is None:
        earlier = [h["version"] for h in manifest["history"] if h["version"] != manifest["current"]]
        if not earlier:
            raise ValueError(f"{domain}: {manifest['current']} is the only version ever promoted")
        to = earlier[-1]
    if not _VERSION.match(to) or to not in list_versions(home, domain):
        raise ValueError(f"{domain}: no version {to!r}; versions: {', '.join(list_versions(home, domain))}")
    set_current(home, domain, to, f"rollback from {manifest['current']}")
    return to


def discard(candidate_dir: str | Path) -> None:
    shutil.rmtree(candidate_dir, ignore_errors=True)
