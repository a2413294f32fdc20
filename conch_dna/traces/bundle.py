"""Teacher-cache bundles: a home's teacher targets and answers in one self-describing tar, to train elsewhere.

The teacher runs where it fits (a big machine scores the traces: `conch kd retrain` or the daemon
there); `conch teacher-cache export` writes its cache as a bundle; `conch teacher-cache import` on the
training machine copies the bundle's entries into that home's cache, where a retrain finds every
target and runs no teacher pass (with `measure_on_policy = false`, since the on-policy held-out KL
needs the teacher to score the new student's answers). Entries are keyed by the teacher id, k and the
token ids, so both homes must name the same teacher in config.toml: import refuses a bundle made
with another. A bundle holds private data (the traces' token ids are in the targets, answers are
text): it is written 0600, and what import reads is checked name by name, never extracted as is.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from conch_dna.system.fsutil import atomic_write, atomic_write_json, private_dir
from conch_dna.training.targets.teacher import HIDDEN_SUFFIX, LEGACY_SUFFIX, TARGET_SUFFIX, TeacherCache
from conch_dna.training.targets.topk_codec import decode_topk, encode_topk

import numpy as np
from safetensors.numpy import load

BUNDLE_FORMAT = "conch-teacher-cache/1"
MANIFEST = "manifest.json"
MAX_ENTRY_BYTES = 64 * 2**20  # one target of 64 MiB is ~500k answer tokens: anything larger is not ours
_TARGET = re.compile(r"targets/([0-9a-f]{64})\.topk")
_ANSWER = re.compile(r"answers/([0-9a-f]{64})\.json")
_HIDDEN = re.compile(r"hidden/([0-9a-f]{64})\.hidden")


class BundleError(ValueError):
    """A bundle that cannot be imported (not a bundle, another format, another teacher)."""


@dataclass
class BundleSummary:
    targets: int  # target entries written (export) or added (import)
    answers: int
    hidden: int = 0  # hidden-state entries (the layer-wise loss's targets)
    skipped: int = 0  # import: entries this cache had already
    rejected: list[str] | None = None  # import: "member: reason" of entries not taken

    def as_dict(self) -> dict:
        return {"targets": self.targets, "answers": self.answers, "hidden": self.hidden, "skipped": self.skipped,
                "rejected": self.rejected or []}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o600, int(time.time())
    tar.addfile(info, io.BytesIO(data))


def export_bundle(cache: TeacherCache, path: str | Path, teacher: str) -> BundleSummary:
    """Write every target and answer of `cache` (made with `teacher`) to a bundle at `path`.

    Targets still in the raw form of older caches are packed on the way out.
    """
    summary = BundleSummary(0, 0)

    def write(tmp):
        with tarfile.open(tmp, "w") as tar:
            _add(tar, MANIFEST, json.dumps({"format": BUNDLE_FORMAT, "teacher": teacher,
                                            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode())
            for _, _, entry in sorted(cache.entries(), key=lambda e: e[2].name):
                key = entry.name.split(".")[0]
                if entry.suffix == TARGET_SUFFIX or entry.suffix == LEGACY_SUFFIX:
                    target = cache.get(key)
                    if target is None:
                        continue  # torn, or evicted meanwhile
                    _add(tar, f"targets/{key}{TARGET_SUFFIX}", encode_topk(*target))
                    summary.targets += 1
                elif entry.suffix == HIDDEN_SUFFIX:
                    _add(tar, f"hidden/{key}{HIDDEN_SUFFIX}", entry.read_bytes())
                    summary.hidden += 1
                elif (answer := cache.get_answer(key)) is not None:
                    _add(tar, f"answers/{key}.json", json.dumps({"answer": answer}).encode())
                    summary.answers += 1

    atomic_write(Path(path), write)
    return summary


def read_manifest(tar: tarfile.TarFile) -> dict:
    try:
        member = tar.getmember(MANIFEST)
        manifest = json.loads(tar.extractfile(member).read())
    except (KeyError, AttributeError, ValueError) as exc:
        raise BundleError(f"no readable {MANIFEST}: not a teacher-cache bundle ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else manifest
        raise BundleError(f"bundle format is {found!r}; this conch reads {BUNDLE_FORMAT!r}")
    if not isinstance(manifest.get("teacher"), str):
        raise BundleError(f"{MANIFEST} names no teacher")
    return manifest


def import_bundle(cache: TeacherCache, path: str | Path, teacher: str) -> BundleSummary:
    """Add a bundle's entries to `cache`, whose runs use `teacher`; entries it has already are kept.

    Raises BundleError for a file that is not a bundle, or one made with another teacher. A member
    that is not a target or an answer under its expected name, not a plain file, too large, or whose
    content does not decode is not taken: it is listed in the summary's `rejected`, with the reason.
    """
    try:
        tar = tarfile.open(path, "r")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{path}: not a teacher-cache bundle ({exc})") from None
    with tar:
        manifest = read_manifest(tar)
        if manifest["teacher"] != teacher:
            raise BundleError(f"the bundle's targets were made by teacher {manifest['teacher']!r}; this home's "
                              f"teacher is {teacher!r} (set `teacher` in config.toml to the bundle's to use them)")
        summary = BundleSummary(0, 0, rejected=[])
        for member in tar:
            if member.name == MANIFEST:
                continue
            reason = _import_member(cache, tar, member, summary)
            if reason:
                summary.rejected.append(f"{member.name}: {reason}")
    return summary


def _import_member(cache: TeacherCache, tar: tarfile.TarFile, member: tarfile.TarInfo, summary) -> str | None:
    """Copy one member into the cache; returns why not, or None."""
    target, answer, hidden = (_TARGET.fullmatch(member.name), _ANSWER.fullmatch(member.name),
                              _HIDDEN.fullmatch(member.name))
    if not (target or answer or hidden):
        return ("not a target (targets/<64 hex>.topk), an answer (answers/<64 hex>.json) or hidden states "
                "(hidden/<64 hex>.hidden)")
    if not member.isreg():
        return "not a plain file"
    if member.size > MAX_ENTRY_BYTES:
        return f"{member.size} bytes, more than any target ({MAX_ENTRY_BYTES})"
    key = (target or answer or hidden).group(1)
    destination = cache.path(key) if target else cache.hidden_path(key) if hidden else cache.answer_path(key)
    if destination.exists() or (target and destination.with_suffix(LEGACY_SUFFIX).exists()):
        summary.skipped += 1
        return None
    data = tar.extractfile(member).read()
    if target:
        try:
            decode_topk(data)
        except ValueError as exc:
            return str(exc)
        private_dir(destination.parent)
        atomic_write(destination, lambda tmp: Path(tmp).write_bytes(data))
        summary.targets += 1
    elif hidden:
        try:
            states = load(data)["hidden"]
            if states.ndim != 3 or states.dtype != np.float16:
                raise ValueError(f"hidden states of shape {states.shape} and {states.dtype}")
        except Exception as exc:  # noqa: BLE001 - whatever the bytes are, they are not taken
            return f"not hidden states ({exc})"
        private_dir(destination.parent)
        atomic_write(destination, lambda tmp: Path(tmp).write_bytes(data))
        summary.hidden += 1
    else:
        try:
            text = json.loads(data)["answer"]
            if not isinstance(text, str):
                raise TypeError("the answer is not a string")
        except (ValueError, KeyError, TypeError) as exc:
            return f"not an answer ({exc})"
        private_dir(destination.parent)
        atomic_write_json(destination, {"answer": text})
        summary.answers += 1
    return None
