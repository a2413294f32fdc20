"""Where state lives: $CONCH_HOME (default ~/.conch), one folder for all of it."""

from __future__ import annotations

import os
from pathlib import Path


def conch_home() -> Path:
    """$CONCH_HOME, default ~/.conch: config.toml, conch.db, inbox/, teacher_cache/, adapters_kd/, logs/."""
    return Path(os.environ.get("CONCH_HOME", "~/.conch")).expanduser()
