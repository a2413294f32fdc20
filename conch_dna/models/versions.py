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

from conch_dna.system.domains import validate_domain_name
from conch_dna.system.fsutil import atomic_write_json, private_dir, sync_dir

MANIFEST = "manifest.json"
CYCLE_LOCK = ".cycle.lock"  # held for a whole retrain cycle or a rollback of the domain
_VERSION = re.compile(r"^v(\d{4,})$")
_ANY = object()


WRITE_TRIES = 100


class VersionNameError(RuntimeError):
    """A candidate could not be given a version name."""


class DomainBusy(RuntimeError):
    """Another retrain cycle or rollback of the domain holds its lock."""


class StaleCandidate(RuntimeError):
    """The current version changed while the candidate was measured against it: not promoted."""


class ManifestError(ValueError):
    """A domain's manifest.json is unreadable or names something that is not a version; the
    message names the file and the problem. `conch kd rollback --to vNNNN` rewrites it."""


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
    """The domain's manifest, or None before its first promotion; ManifestError when it is not
    one this module wrote (bad JSON, no `current`, a path in place of a version name)."""
    path = domain_dir(home, domain) / MANIFEST
    try:
        manifest = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not readable JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise ManifestError(f"{path}: a manifest is a JSON object, got {type(manifest).__name__}")
    current = manifest.get("current")
    if not isinstance(current, str) or not _VERSION.match(current):
        raise ManifestError(f"{path}: 'current' must name a version like v0001, got {current!r}")
    if not isinstance(manifest.get("history"), list):
        raise ManifestError(f"{path}: 'history' must be a list")
    pinned = manifest.get("pinned", [])
    if not isinstance(pinned, list) or not all(isinstance(v, str) and _VERSION.match(v) for v in pinned):
        raise ManifestError(f"{path}: 'pinned' must be a list of versions like v0001")
    return manifest


def current_version(home: str | Path, domain: str) -> str | None:
    """The current version's name (None: the bare student); ManifestError for a broken manifest."""
    manifest = read_manifest(home, domain)
    return manifest["current"] if manifest else None


def is_version_name(name) -> bool:
    """Whether `name` is a version folder's name (v0001, v0002, ...), so never a path."""
    return isinstance(name, str) and bool(_VERSION.match(name))


def version_label(home: str | Path, domain: str) -> str:
    """The current version for a person: its name, "base", or what is wrong with the manifest."""
    try:
        return current_version(home, domain) or "base"
    except ManifestError as exc:
        return f"broken manifest ({exc})"


def current_adapter_path(home: str | Path, domain: str) -> Path | None:
    version = current_version(home, domain)
    return domain_dir(home, domain) / version if version else None


def write_version(home: str | Path, domain: str, candidate_dir: str | Path) -> str:
    """Give a finished candidate directory the next version name; returns that name.

    The next name is above every entry named like a version, folder or not: a stray file called v0003 is
    stepped over (v0004 is written), never renamed onto. Bounded: a folder whose names keep being taken
    raises VersionNameError after WRITE_TRIES tries."""
    d = private_dir(domain_dir(home, domain))
    for _ in range(WRITE_TRIES):
        taken = [int(m.group(1)) for p in d.iterdir() if (m := _VERSION.match(p.name))]
        name = f"v{max(taken, default=0) + 1:04d}"
        try:
            os.rename(candidate_dir, d / name)  # fails if the name was taken meanwhile
            sync_dir(d)
            return name
        except OSError:
            if os.path.lexists(d / name):
                continue
            raise
    raise VersionNameError(f"{domain}: could not give the candidate a version name in {d}: each new name was "
                           f"taken {WRITE_TRIES} times in a row")


def set_current(home: str | Path, domain: str, version: str, reason: str) -> dict:
    """Make `version` current by replacing the manifest atomically; the history is kept."""
    if not _VERSION.match(version) or not (domain_dir(home, domain) / version / "adapters.safetensors").is_file():
        raise FileNotFoundError(f"{domain}: version {version} does not exist")
    try:
        manifest = read_manifest(home, domain) or {"domain": domain, "history": []}
    except ManifestError as exc:  # setting a version is how a broken manifest is repaired
        manifest = {"domain": domain, "history": [{"version": None, "at": time.time(), "reason": str(exc)}]}
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
    """With `to`, also the repair of a broken manifest; without, the newest earlier version still kept."""
    existing = list_versions(home, domain)
    if to is not None and (not _VERSION.match(to) or to not in existing):
        raise ValueError(f"{domain}: no version {to!r}; versions: {', '.join(existing) or 'none'}")
    try:
        manifest = read_manifest(home, domain)
    except ManifestError:
        if to is None:
            raise
        manifest = {"current": "a broken manifest"}
    if not manifest:
        raise ValueError(f"{domain}: no version has been promoted, nothing to roll back")
    if to is None:
        earlier = [h.get("version") for h in manifest["history"] if isinstance(h, dict)]
        earlier = [v for v in earlier if v != manifest["current"] and v in existing]
        if not earlier:
            raise ValueError(f"{domain}: no version before {manifest['current']} is kept")
        to = earlier[-1]
    set_current(home, domain, to, f"rollback from {manifest['current']}")
    return to


def pin(home: str | Path, domain: str, version: str, pinned: bool = True) -> list[str]:
    """Keep `version` through pruning (pinned=False: no longer); returns the pinned versions."""
    with domain_lock(home, domain):
        manifest = read_manifest(home, domain)
        if not manifest:
            raise ValueError(f"{domain}: no version has been promoted, nothing to pin")
        if version not in list_versions(home, domain):
            raise ValueError(f"{domain}: no version {version!r}; versions: {', '.join(list_versions(home, domain))}")
        names = [v for v in manifest.get("pinned", []) if v != version] + ([version] if pinned else [])
        manifest["pinned"] = sorted(names, key=lambda n: int(n[1:]))
        atomic_write_json(domain_dir(home, domain) / MANIFEST, manifest)
        return manifest["pinned"]


def prune_versions(home: str | Path, domain: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` versions, never the current or a pinned one; returns those
    deleted. Call it holding the domain's lock. With a broken manifest it deletes nothing."""
    try:
        manifest = read_manifest(home, domain)
    except ManifestError:
        return []
    if not manifest:
        return []
    versions = list_versions(home, domain)
    kept = {manifest["current"], *versions[-keep:], *manifest.get("pinned", [])}
    gone = [v for v in versions if v not in kept]
    for version in gone:
        discard(domain_dir(home, domain) / version)
    return gone


def discard(candidate_dir: str | Path) -> None:
    shutil.rmtree(candidate_dir, ignore_errors=True)
