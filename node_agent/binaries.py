"""Where the C++ binaries (tokenbus-replica, tokenbus-proxy) are: $TOKENBUS_BIN_DIR, else <repo>/build/bin."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent  # the parent of the node_agent package


def bin_dir() -> Path:
    env = os.environ.get("TOKENBUS_BIN_DIR")
    return Path(env) if env else REPO_ROOT / "build" / "bin"
