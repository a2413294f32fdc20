"""Where state lives: $CONCH_HOME (default ~/.conch), one folder for all of it, and its layout."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_TOML = "config.toml"
DB_FILE = "conch.db"
INBOX_DIR = "inbox"
TEACHER_CACHE_DIR = "teacher_cache"
ADAPTERS_DIR = "adapters_kd"  # <domain>/v0001/..., the manifest naming the current one
LOGS_DIR = "logs"
REQUESTS_DIR = "requests"  # `conch kd retrain` asking a running daemon
NEURONS_DIR = "neurons"  # <pid>.json: each serving registry's figures, for `conch doctor`
MODELS_DIR = "models"  # models conch builds itself (`conch models pair`)


def conch_home() -> Path:
    """$CONCH_HOME, default ~/.conch: config.toml, conch.db, inbox/, teacher_cache/, adapters_kd/, logs/."""
    return Path(os.environ.get("CONCH_HOME", "~/.conch")).expanduser()
