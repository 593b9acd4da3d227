"""Where Conveyor keeps what it makes on disk: converted models, vLLM's caches, logs, the embedded Redis."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    """``$CONVEYOR_DATA_DIR``, else ``~/.cache/conveyor``."""
    configured = os.environ.get("CONVEYOR_DATA_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "conveyor"
